from django.contrib import admin

from citadel.jobs.models import InferenceJob


@admin.register(InferenceJob)
class InferenceJobAdmin(admin.ModelAdmin):
    list_display = ["id", "kind", "status", "model", "pool", "worker_name", "created_at"]
    list_filter = ["status", "kind"]
    readonly_fields = [field.name for field in InferenceJob._meta.fields]
