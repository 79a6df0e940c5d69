from django.apps import AppConfig


class UsageConfig(AppConfig):
    name = "citadel.usage"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        from django.db.backends.signals import connection_created

        from citadel.usage.metrics import connection_timer_install

        connection_created.connect(connection_timer_install, dispatch_uid="citadel-audit-append-timer")
