"""Leases on running jobs: how the database, not the broker, knows that a job's worker is alive.

A worker that claims a job (inference, fine-tuning, batch) writes a JobLease row in the claim's
transaction: its name, the job's attempt number (the fencing token) and an expiry
CITADEL_JOB_LEASE_SECONDS ahead. While the job runs, this process's LeaseKeeper thread pushes the
expiry forward every CITADEL_JOB_LEASE_RENEW_SECONDS. A killed worker stops renewing; the
reconciler (citadel.jobs.reconcile, run by beat) finds the expired lease within the lease plus its
own interval and re-enqueues or fails the job. A redelivered broker message (a visibility or
consumer timeout, a restart) finds the job running under a live lease and is acknowledged without
running it again, so no job depends on the broker's timeouts.

A renewal that finds its lease gone (taken back by the reconciler, the job re-enqueued or ended)
marks the handle lost, and the task stops working on that job; every write a worker makes for a
job is fenced by the attempt, so a worker that was only slow records nothing twice.
"""

import logging
import threading
from dataclasses import dataclass, field
from datetime import timedelta

from django.conf import settings
from django.db import close_old_connections, connection
from django.utils import timezone

from citadel.jobs.models import JobLease

logger = logging.getLogger(__name__)


def lease_seconds() -> float:
    return float(settings.CITADEL_JOB_LEASE_SECONDS)


def lease_acquire(*, kind: str, job_id, worker_name: str, attempt: int) -> JobLease:
    """Take (or take over) the job's lease; call inside the transaction that claims the job."""
    now = timezone.now()
    lease, _ = JobLease.objects.update_or_create(
        kind=kind, job_id=str(job_id),
        defaults={"worker_name": worker_name, "attempt": attempt, "acquired_at": now,
                  "expires_at": now + timedelta(seconds=lease_seconds())})
    return lease


def lease_release(*, kind: str, job_id, attempt: int | None = None) -> int:
    """Drop the job's lease (the job ended or went back to the queue); with `attempt`, only that one's."""
    leases = JobLease.objects.filter(kind=kind, job_id=str(job_id))
    if attempt is not None:
        leases = leases.filter(attempt=attempt)
    return leases.delete()[0]


def lease_renew(*, kind: str, job_id, attempt: int) -> bool:
    """Push the expiry forward; False when the lease is not this attempt's any more."""
    return bool(JobLease.objects.filter(kind=kind, job_id=str(job_id), attempt=attempt).update(
        expires_at=timezone.now() + timedelta(seconds=lease_seconds())))


def lease_is_live(*, kind: str, job_id) -> bool:
    return JobLease.objects.filter(kind=kind, job_id=str(job_id), expires_at__gt=timezone.now()).exists()


def leases_by_job(*, kind: str, job_ids) -> dict[str, JobLease]:
    return {lease.job_id: lease for lease in JobLease.objects.filter(kind=kind, job_id__in=[str(i) for i in job_ids])}


@dataclass(eq=False)
class Held:
    """One lease this process renews; `lost` is set when a renewal finds it taken back."""

    kind: str
    job_id: str
    attempt: int
    lost: threading.Event = field(default_factory=threading.Event)


class LeaseKeeper:
    """Renews every lease this worker process holds, from one daemon thread.

    The thread is started when a Celery worker is ready (citadel.jobs.worker_lifecycle), however
    the worker was launched. A task run in-process without a worker (tests) holds leases that
    nobody renews, which is harmless for as long as it runs: only the reconciler acts on expiry.
    """

    def __init__(self):
        self._held: set[Held] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="citadel-leases", daemon=True)
                self._thread.start()

    def hold(self, *, kind: str, job_id, attempt: int) -> Held:
        held = Held(kind=kind, job_id=str(job_id), attempt=attempt)
        with self._lock:
            self._held.add(held)
        return held

    def drop(self, held: Held) -> None:
        with self._lock:
            self._held.discard(held)

    def renew_now(self) -> None:
        """One round of renewals (the thread's loop body; tests call it directly)."""
        with self._lock:
            held = list(self._held)
        for lease in held:
            if lease.lost.is_set():
                continue
            try:
                if not lease_renew(kind=lease.kind, job_id=lease.job_id, attempt=lease.attempt):
                    with self._lock:
                        if lease not in self._held:
                            continue  # the job ended meanwhile and released its lease itself
                    logger.warning("lease on %s %s (attempt %s) was taken back; stopping work on it",
                                   lease.kind, lease.job_id, lease.attempt)
                    lease.lost.set()
            except Exception:  # the database is away for a moment: the next round tries again
                logger.exception("could not renew the lease on %s %s", lease.kind, lease.job_id)

    def _run(self) -> None:
        while True:
            try:
                close_old_connections()
                self.renew_now()
            finally:
                connection.close()
            threading.Event().wait(float(settings.CITADEL_JOB_LEASE_RENEW_SECONDS))


keeper = LeaseKeeper()
