from django.apps import AppConfig


class AccountsConfig(AppConfig):
    name = "citadel.accounts"
    label = "accounts"

    def ready(self):
        from citadel.accounts import checks, schema, signals  # noqa: F401 - deploy checks, schema, login auditing
