from django.apps import AppConfig


class SsoConfig(AppConfig):
    name = "citadel.sso"
    default_auto_field = "django.db.models.BigAutoField"
