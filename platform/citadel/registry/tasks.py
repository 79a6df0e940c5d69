"""Housekeeping run by beat: workers whose heartbeat stopped are marked offline."""

from datetime import timedelta

from celery import shared_task
from django.conf import settings
from django.utils import timezone

from citadel.registry.models import Worker
from citadel.registry.services import worker_offline


@shared_task(name="citadel.registry.workers_mark_stale", soft_time_limit=30, time_limit=60,
             ignore_result=True)
def workers_mark_stale() -> int:
    cutoff = timezone.now() - timedelta(seconds=settings.CITADEL_WORKER_STALE_SECONDS)
    stale = list(Worker.objects.filter(status=Worker.Status.ONLINE, last_heartbeat__lt=cutoff)
                 .values_list("name", flat=True))
    for name in stale:
        worker_offline(name=name, reason="heartbeat stopped")
    return len(stale)


@shared_task(name="citadel.registry.model_import", bind=True, acks_late=True, soft_time_limit=6 * 3600,
             time_limit=6 * 3600 + 60, max_retries=0, ignore_result=True)
def model_import(self, import_id: int) -> None:
    """Read, hash and register a model folder on this worker host (citadel.registry.imports); sent to
    the chosen pool's queue. Idempotent: a finished import is left alone."""
    import socket

    from citadel.registry.imports import model_import_run

    model_import_run(import_id=import_id, worker_name=self.request.hostname or socket.gethostname())
