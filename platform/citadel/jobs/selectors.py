"""Reads for jobs, including following a running job's output from the web process.

The web process reads the job row and its chunk rows whenever the worker's commit wakes it
(PostgreSQL LISTEN/NOTIFY, citadel.jobs.wakeups), polling on SQLite: the database stays the only
source of truth and no extra service is needed.
While it waits it also notices a job whose worker died or that no worker picked up, and fails
it, so a client is never left hanging.
"""

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from citadel.audit.services import Actor
from citadel.jobs.models import InferenceChunk, InferenceJob
from citadel.jobs.wakeups import listener
from citadel.registry.selectors import worker_is_live, workers_live


@dataclass(frozen=True)
class Delta:
    text: str
    logprobs: list[dict] | None = None
    """Per token of this piece, when the job was streamed and asked for logprobs."""


@dataclass(frozen=True)
class Finished:
    job: InferenceJob


def _stalled_reason(job: InferenceJob) -> tuple[str, str] | None:
    stale = timedelta(seconds=settings.CITADEL_WORKER_STALE_SECONDS)
    if job.status == InferenceJob.Status.RUNNING and not worker_is_live(name=job.worker_name):
        return "worker_lost", f"Worker {job.worker_name} stopped while running the job; retry the request."
    if (job.status == InferenceJob.Status.QUEUED and timezone.now() - job.created_at > stale
            and not workers_live(pool=job.pool).exists()):
        return "worker_lost", f"No live worker in pool '{job.pool.name}' picked up the job; retry the request."
    return None


def job_follow(*, job_id, timeout: float | None = None, chunks: bool = True) -> Iterator[Delta | Finished]:
    """Yield the job's text as it is produced, then Finished with the final row.

    A failed job ends with Finished too; the caller turns its error into a response. With
    `chunks=False` only Finished comes, and only the job row is read on each wake-up.
    """
    from citadel.jobs.services import job_fail

    deadline = time.monotonic() + (timeout or settings.CITADEL_REQUEST_TIMEOUT_SECONDS)
    next_index, last_check = 0, time.monotonic()
    # Woken when the worker commits a chunk or the outcome (citadel.jobs.wakeups); registered before
    # each read, so a commit between the read and the wait is not missed.
    with listener.waiter(job_id) as woken:
        while True:
            woken.clear()
            job = InferenceJob.objects.select_related("pool", "model").get(pk=job_id)
            if job.is_terminal and not chunks:
                yield Finished(job)
                return
            pending = InferenceChunk.objects.filter(job_id=job_id, index__gte=next_index).order_by("index") \
                if chunks else InferenceChunk.objects.none()
            if job.is_terminal:
                # The worker commits every chunk before the final state, so all of them are visible now.
                for text, logprobs in pending.values_list("text", "logprobs"):
                    yield Delta(text, logprobs)
                yield Finished(job)
                return
            for index, text, logprobs in pending.values_list("index", "text", "logprobs"):
                if index != next_index:
                    break  # a gap: that chunk's commit is not visible yet; read it on the next poll
                next_index += 1
                yield Delta(text, logprobs)
            now = time.monotonic()
            if now > deadline:
                job_fail(job_id=job_id, code="timeout", message="The job did not finish in time.",
                         actor=Actor.system("gateway"))
                continue
            if now - last_check > 1.0:
                last_check = now
                reason = _stalled_reason(job)
                if reason:
                    job_fail(job_id=job_id, code=reason[0], message=reason[1], actor=Actor.system("gateway"))
                    continue
            woken.wait(listener.timeout())


def job_wait(*, job_id, timeout: float | None = None) -> InferenceJob:
    """The job's final row, once it has one (a job answered whole: its text is in the row)."""
    for event in job_follow(job_id=job_id, timeout=timeout, chunks=False):
        if isinstance(event, Finished):
            return event.job
    raise AssertionError("job_follow always ends with Finished")
