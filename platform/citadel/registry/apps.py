from django.apps import AppConfig


class RegistryConfig(AppConfig):
    name = "citadel.registry"
    label = "registry"
