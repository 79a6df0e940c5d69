from django.apps import AppConfig


class JobsConfig(AppConfig):
    name = "citadel.jobs"
    label = "jobs"
