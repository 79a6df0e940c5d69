"""Audit housekeeping run by beat: signed checkpoints of the chain's head, retention purges."""

from celery import shared_task
from django.conf import settings

from citadel.audit.services import Actor, audit_purge, checkpoint_create


@shared_task(name="citadel.audit.checkpoint", soft_time_limit=60, time_limit=120, ignore_result=True)
def audit_checkpoint() -> int | None:
    """Sign the head when it moved since the last checkpoint; returns the signed sequence."""
    checkpoint = checkpoint_create()
    return checkpoint.sequence if checkpoint else None


@shared_task(name="citadel.audit.retention_purge", soft_time_limit=1800, time_limit=3600, ignore_result=True)
def audit_retention_purge() -> int:
    """Purge records past their retention: CITADEL_AUDIT_RETENTION_DAYS (0 keeps everything) or their data
    class's own audit_retention_days, except held ones (see audit_purge)."""
    from citadel.residency.models import DataClass

    days = settings.CITADEL_AUDIT_RETENTION_DAYS
    if days <= 0 and not DataClass.objects.filter(audit_retention_days__gt=0).exists():
        return 0
    checkpoint_create()
    purge = audit_purge(older_than_days=days, actor=Actor.system("retention"))
    return purge.deleted_count if purge else 0
