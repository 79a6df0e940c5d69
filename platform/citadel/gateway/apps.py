from django.apps import AppConfig


class GatewayConfig(AppConfig):
    name = "citadel.gateway"
    label = "gateway"
