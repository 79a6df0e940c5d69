"""Writes for usage metering. Each function is safe to call twice for the same work: the ledger's
unique `source` turns a retry into a no-op, so redelivered tasks and recovery sweeps never bill twice."""

from django.db import transaction
from django.utils import timezone

from citadel.usage.models import UsageRecord


def usage_record(*, kind: str, source: str, model_name: str, api_key_id=None, team_id=None, user_id=None,
                 requests: int = 1, prompt_tokens: int = 0, completion_tokens: int = 0,
                 gpu_seconds: float = 0.0) -> UsageRecord:
    """Meter one unit of work (inside the caller's transaction, so it commits with the outcome it meters)."""
    record, _ = UsageRecord.objects.get_or_create(source=source, defaults={
        "kind": kind, "model_name": model_name, "api_key_id": api_key_id, "team_id": team_id, "user_id": user_id,
        "requests": requests, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
        "gpu_seconds": gpu_seconds})
    return record


def usage_meter_fine_tuning() -> int:
    """Meter the GPU-seconds of fine-tuning jobs that ended (succeeded, failed or cancelled) and are not
    metered yet: from when a worker started the job to when it finished or stopped. One GPU per job
    (what a worker's trainer uses). Run by beat and before usage is read, so reports are current
    without the fine-tuning app knowing about metering."""
    from citadel.finetuning.models import FineTuningJob

    metered = set(UsageRecord.objects.filter(kind=UsageRecord.Kind.FINE_TUNING).values_list("source", flat=True))
    ended = [job for job in FineTuningJob.objects.filter(status__in=FineTuningJob.TERMINAL, started_at__isnull=False)
             .select_related("model") if f"ftjob:{job.pk.hex}" not in metered]
    count = 0
    for job in ended:
        end = job.finished_at or job.stopped_at or timezone.now()
        with transaction.atomic():
            usage_record(kind=UsageRecord.Kind.FINE_TUNING, source=f"ftjob:{job.pk.hex}", model_name=job.model.name,
                         api_key_id=job.api_key_id, team_id=job.team_id, user_id=job.user_id,
                         gpu_seconds=max(0.0, (end - job.started_at).total_seconds()))
        count += 1
    return count
