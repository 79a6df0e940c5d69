from django.contrib import admin

from citadel.registry.models import Deployment, Model, Worker, WorkerPool

admin.site.register(Model)
admin.site.register(WorkerPool)
admin.site.register(Deployment)
admin.site.register(Worker)
