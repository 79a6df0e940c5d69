"""The inference task a pool's workers run, and beat's reconciler. The task receives a job id only;
the row holds the rest.

run_inference is idempotent: job_claim locks the row and runs only a queued job, so a redelivered
message (acks_late) finds the job running under a live lease, or finished, and is acknowledged
without running anything. While the job runs, the worker renews its lease (citadel.jobs.leases);
if the lease is taken back (the worker was thought dead), it stops and records nothing.
"""

import logging
import time
from datetime import timedelta

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import task_postrun, task_prerun
from django.db import DatabaseError, close_old_connections

from citadel.audit.services import Actor
from citadel.jobs import worker_lifecycle  # noqa: F401 - connects the worker's heartbeat signals
from citadel.jobs.engines import engines
from citadel.jobs.leases import keeper
from citadel.jobs.logprobs import TokenTexts, event_entries
from citadel.jobs.models import InferenceJob, JobLease
from citadel.jobs.prefix_salt import job_cache_salt
from citadel.jobs.reconcile import jobs_reconcile
from citadel.jobs.services import (
    job_append_chunk,
    job_claim,
    job_fail,
    job_succeed,
    jobs_prompts_purge,
    jobs_redispatch_queued,
)
from citadel.registry.adapter_check import adapter_files_check
from citadel.usage.metrics import timed_events

logger = logging.getLogger(__name__)

CHUNK_FLUSH_SECONDS = 0.02


@task_prerun.connect
@task_postrun.connect
def _task_connections(sender=None, **kwargs) -> None:
    """Around each task, what Django does around each request: drop this thread's database connection
    when it is older than CONN_MAX_AGE or broken, and check a kept one before its next use. Celery's
    own fixup would close it after every task (CELERY_DB_REUSE_MAX, citadel.settings.celery, keeps
    it), so every job paid for a new PostgreSQL backend. Not for a task run eagerly (`apply()`) in
    the caller's thread, as Celery's own fixup: that connection is the caller's, maybe inside its
    transaction."""
    if getattr(getattr(sender, "request", None), "is_eager", False):
        return
    close_old_connections()


def _events(llm, job: InferenceJob):
    from inference import SamplingParams

    try:
        params = SamplingParams(**job.payload.get("sampling", {}))
    except (TypeError, ValueError) as error:
        raise _InvalidParams(str(error)) from error
    # A fine-tuned model's job carries its adapter; plain jobs call the engine exactly as before.
    adapter = job.payload.get("adapter")
    extra = {"lora_request": _lora_request(adapter)} if adapter else {}
    salt = job_cache_salt(job)  # the team's prefix-cache namespace, from the server's records only
    if salt is not None:
        extra["cache_salt"] = salt
    if job.kind == InferenceJob.Kind.CHAT:
        return llm.stream_chat(job.payload["messages"], params, **extra)
    return llm.stream(job.payload["prompt"], params, **extra)


def _lora_request(adapter: dict):
    from inference import LoRARequest

    adapter_files_check(name=adapter["name"], path=adapter["path"])  # its SHA-256 manifest: refused, audited
    return LoRARequest(name=adapter["name"], path=adapter["path"])


class _InvalidParams(Exception):
    pass


class _LeaseLost(Exception):
    """The reconciler took the job back from this worker; another attempt owns it now."""


class _Output:
    """A job's output as it is generated; a streamed job's is written as chunk rows a few tokens at a
    time, for its client to follow (a job answered whole keeps it in memory until its outcome).

    With `texts`, each token's log-probabilities travel too: all of them with the job, and those
    of a chunk's tokens with the chunk when the job is streamed.
    """

    def __init__(self, job: InferenceJob, *, texts: TokenTexts | None, top: int | None, lease=None):
        self.job, self.texts, self.top, self.lease = job, texts, top, lease
        self.pieces: list[str] = []
        self.logprobs: list[dict] | None = [] if texts is not None else None
        self.pending: list[str] = []
        self.pending_logprobs: list[dict] = []
        self.index, self.last_flush = 0, time.monotonic()

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def add(self, event) -> None:
        if self.lease is not None and self.lease.lost.is_set():
            raise _LeaseLost()
        if event.text:
            self.pending.append(event.text)
        if self.texts is not None:
            self.pending_logprobs.extend(event_entries(self.texts, event, top=self.top))
        if event.finish_reason or time.monotonic() - self.last_flush >= CHUNK_FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if not self.pending and not self.pending_logprobs:
            return
        text = "".join(self.pending)
        if self.logprobs is not None:
            self.logprobs.extend(self.pending_logprobs)
        chunk_logprobs = self.pending_logprobs if self.job.stream and self.logprobs is not None else None
        if text or chunk_logprobs:
            if self.job.stream:  # a whole answer's client reads the outcome only: no chunk rows to write
                job_append_chunk(job=self.job, index=self.index, text=text, logprobs=chunk_logprobs)
            self.pieces.append(text)
            self.index += 1
        self.pending, self.pending_logprobs, self.last_flush = [], [], time.monotonic()


@shared_task(name="citadel.jobs.run_inference", bind=True, acks_late=True, reject_on_worker_lost=True,
             soft_time_limit=900, time_limit=960, max_retries=5, ignore_result=True)
def run_inference(self, job_id: str) -> None:
    worker = self.request.hostname or "worker"
    actor = Actor.system(worker)
    try:
        job = job_claim(job_id=job_id, worker_name=worker)
    except DatabaseError as error:  # the database is restarting: try again shortly, the job waits queued
        logger.warning("could not claim job %s (%s); retrying", job_id, error)
        raise self.retry(countdown=min(30, 2 ** self.request.retries), exc=error) from error
    except Exception as error:
        logger.exception("could not claim job %s", job_id)
        job_fail(job_id=job_id, code="worker_error", message=f"The worker could not start the job: {error}",
                 actor=actor)
        return
    if job is None:
        logger.info("job %s is not queued any more (running under a lease, or done); nothing to do", job_id)
        return
    lease = keeper.hold(kind=JobLease.Kind.INFERENCE, job_id=job.pk, attempt=job.attempts)
    try:
        _run(job, actor=actor, lease=lease)
    finally:
        keeper.drop(lease)


def _run(job: InferenceJob, *, actor: Actor, lease) -> None:
    job_id, attempt = job.pk, job.attempts
    try:
        llm = engines.get(path=job.model.path, engine_settings=job.deployment.engine_settings)
        top = job.payload.get("sampling", {}).get("logprobs")
        output = _Output(job, texts=engines.token_texts(path=job.model.path) if top is not None else None, top=top,
                         lease=lease)
        event = None
        for event in timed_events(_events(llm, job), model=job.model.name):  # TTFT and inter-token latency
            output.add(event)
        output.flush()
        job_succeed(job=job, text=output.text, finish_reason=(event.finish_reason if event else None) or "stop",
                    prompt_tokens=event.prompt_tokens if event else 0,
                    completion_tokens=event.completion_tokens if event else 0, logprobs=output.logprobs,
                    attempt=attempt)
    except _LeaseLost:
        logger.warning("job %s was taken back from this worker (attempt %s); stopped", job_id, attempt)
    except _InvalidParams as error:
        job_fail(job_id=job_id, code="invalid_sampling_params", message=str(error), actor=actor, attempt=attempt)
    except SoftTimeLimitExceeded:
        job_fail(job_id=job_id, code="timeout", message="The job ran past the worker's time limit.", actor=actor,
                 attempt=attempt)
    except Exception as error:  # the engine failed: the client gets an error, the worker lives on
        logger.exception("job %s failed", job_id)
        job_fail(job_id=job_id, code="engine_error", message=f"{type(error).__name__}: {error}", actor=actor,
                 attempt=attempt)


@shared_task(name="citadel.jobs.reconcile", soft_time_limit=120, time_limit=150, ignore_result=True)
def reconcile() -> dict:
    """Beat: jobs of dead workers (expired leases) re-enqueued or failed; lost messages sent again."""
    return jobs_reconcile()


@shared_task(name="citadel.jobs.redispatch_queued", soft_time_limit=60, time_limit=90, ignore_result=True)
def redispatch_queued() -> int:
    """Beat: recover jobs whose broker message was lost (see jobs_redispatch_queued)."""
    return jobs_redispatch_queued(older_than=timedelta(seconds=30), max_dispatches=5)


@shared_task(name="citadel.jobs.prompts_purge", soft_time_limit=300, time_limit=360, ignore_result=True)
def prompts_purge() -> int:
    """Beat: remove kept prompts whose policy's retention days are over (see jobs_prompts_purge)."""
    return jobs_prompts_purge()
