from django.apps import AppConfig


class QuotasConfig(AppConfig):
    name = "citadel.quotas"
    default_auto_field = "django.db.models.BigAutoField"
