"""Citadel's control plane: the Django project package and its apps.

The Celery app is imported here so that `shared_task` binds to it in every process.
"""

from citadel.celery import app as celery_app

__all__ = ["celery_app"]
