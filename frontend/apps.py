from django.apps import AppConfig


class FrontendConfig(AppConfig):
    name = "frontend"
    label = "frontend"

    def ready(self):
        from frontend import session_info  # noqa: F401  (connects its user_logged_in receiver)
