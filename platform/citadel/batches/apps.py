from django.apps import AppConfig


class BatchesConfig(AppConfig):
    name = "citadel.batches"
    default_auto_field = "django.db.models.BigAutoField"
