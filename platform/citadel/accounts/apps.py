from django.apps import AppConfig


class AccountsConfig(AppConfig):
    name = "citadel.accounts"
    label = "accounts"

    def ready(self):
        from citadel.accounts import schema, signals  # noqa: F401 - schema extension, login auditing
