"""The reconciler: PostgreSQL holds the truth, and this sweep makes the queues agree with it.

Run by beat every CITADEL_RECONCILE_SECONDS (task citadel.jobs.reconcile, or `citadel jobs
reconcile`). It is safe to run at any time and from several places at once: every change locks
the job's row and checks the attempt it read (see RELIABILITY.md).

- Inference jobs running under an expired lease (their worker died or lost the database for
  longer than the lease), or running without any lease for longer than one: re-enqueued, or
  failed with the reason once tried CITADEL_JOB_MAX_ATTEMPTS times or once part of a streamed
  reply reached the client.
- Fine-tuning jobs running under an expired lease: handed to the fine-tuning app's recovery
  (back to the queue to resume from the newest checkpoint, or failed after its attempts).
- Batch chunks (the lines one feeder claimed) under an expired lease: back to pending, for
  citadel.batches.recover to send the batch out again.
- Queued inference jobs whose message was sent long ago and not taken: sent again (a lost
  message), failed after a bounded number of sends.
"""

import logging
from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from citadel.jobs.leases import lease_release, lease_seconds, leases_by_job
from citadel.jobs.models import InferenceJob, JobLease

logger = logging.getLogger(__name__)


def _expired(kind: str, running, *, since: str = "started_at") -> list[tuple[object, str]]:
    """(job, why) for the running jobs in `running` whose lease expired, or who have had none for
    longer than a lease since their claim (the `since` field: when this attempt began)."""
    now = timezone.now()
    jobs = list(running)
    leases = leases_by_job(kind=kind, job_ids=[job.pk for job in jobs])
    found = []
    for job in jobs:
        lease = leases.get(str(job.pk))
        if lease is not None and lease.attempt == job.attempts:
            if lease.expires_at < now:
                found.append((job, f"Worker {lease.worker_name} stopped renewing its lease on the job "
                                   f"(expired {int((now - lease.expires_at).total_seconds())} s ago)."))
        elif getattr(job, since) is None or getattr(job, since) < now - timedelta(seconds=lease_seconds()):
            found.append((job, f"Worker {job.worker_name or '?'} holds no lease on the running job."))
    return found


def _inference(counts: dict) -> None:
    from citadel.jobs.services import job_requeue_or_fail

    running = InferenceJob.objects.filter(status=InferenceJob.Status.RUNNING).only(
        "pk", "attempts", "started_at", "worker_name")
    for job, why in _expired(JobLease.Kind.INFERENCE, running):
        outcome = job_requeue_or_fail(job_id=job.pk, attempt=job.attempts, why=why,
                                      max_attempts=settings.CITADEL_JOB_MAX_ATTEMPTS)
        if outcome:
            logger.warning("inference job %s %s: %s", job.pk, outcome, why)
            counts[f"inference_{outcome}"] += 1


def _fine_tuning(counts: dict) -> None:
    from citadel.finetuning import services as finetuning
    from citadel.finetuning.models import FineTuningJob

    running = FineTuningJob.objects.filter(status=FineTuningJob.Status.RUNNING).select_related(
        "model", "team", "data_class")
    # last_progress_at is set by each claim (started_at is the first attempt's).
    for job, why in _expired(JobLease.Kind.FINE_TUNING, running, since="last_progress_at"):
        outcome = finetuning._requeue(job, why=why)  # the app's own resume-from-checkpoint path
        if outcome:
            lease_release(kind=JobLease.Kind.FINE_TUNING, job_id=job.pk, attempt=job.attempts)
            logger.warning("fine-tuning job %s %s: %s", job.pk, outcome, why)
            counts[f"fine_tuning_{outcome}"] += 1


def _batch_chunks(counts: dict) -> None:
    """Lines of a chunk whose lease expired go back to pending; citadel.batches.recover sends the
    batch out again. Lines already recorded are not touched (only `running` lines of that claim)."""
    from citadel.batches.models import BatchRequest

    for lease in JobLease.objects.filter(kind=JobLease.Kind.BATCH, expires_at__lt=timezone.now()):
        released = BatchRequest.objects.filter(status=BatchRequest.Status.RUNNING, worker_name=lease.worker_name) \
            .update(status=BatchRequest.Status.PENDING, worker_name="", claimed_at=None)
        lease.delete()
        if released:
            logger.warning("%s batch lines of %s back to pending: its lease expired", released, lease.worker_name)
            counts["batch_lines_released"] += released


def jobs_reconcile() -> dict:
    """One sweep; returns what it did, by kind and outcome."""
    from citadel.jobs.services import jobs_redispatch_queued

    counts = {"inference_requeued": 0, "inference_failed": 0, "fine_tuning_requeued": 0,
              "fine_tuning_failed": 0, "inference_resent": 0, "batch_lines_released": 0}
    _inference(counts)
    _fine_tuning(counts)
    _batch_chunks(counts)
    counts["inference_resent"] = jobs_redispatch_queued(
        older_than=timedelta(seconds=settings.CITADEL_JOB_RESEND_SECONDS),
        max_dispatches=settings.CITADEL_JOB_MAX_DISPATCHES)
    # Leases of jobs that ended without releasing them (a crash between the end and the release).
    stale = timezone.now() - timedelta(seconds=10 * lease_seconds())
    JobLease.objects.filter(expires_at__lt=stale).delete()
    return counts
