from django.apps import AppConfig


class AuditConfig(AppConfig):
    name = "citadel.audit"
    label = "audit"

    def ready(self):
        from citadel.audit import signals  # noqa: F401 - audits changes made in Django's admin
