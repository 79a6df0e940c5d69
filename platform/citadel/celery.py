"""The Celery app. Queues: `control` for housekeeping, one `pool.<name>` queue per worker pool."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "citadel.settings.local")

app = Celery("citadel")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


def pool_queue(pool_name: str) -> str:
    """The queue a worker pool consumes; the only place the naming rule lives."""
    return f"pool.{pool_name}"
