from django.apps import AppConfig


class AuditConfig(AppConfig):
    name = "citadel.audit"
    label = "audit"
