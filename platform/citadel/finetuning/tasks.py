"""The fine-tuning task a pool's workers run, and beat's recovery sweep.

run_job receives a job id only; the row holds the rest. It is safe to deliver twice (job_claim
runs a queued job once) and to lose (beat sends queued jobs again). The trainer reports progress
through on_event, which writes event rows as they happen, and asks should_stop, which reads the
row at most every CANCEL_POLL_SECONDS: a cancel, or the job being handed to another worker after
this one was thought dead, stops training within about a second. A warm shutdown of the worker
hands the job back to the queue, to resume from its last checkpoint.
"""

import logging
import threading
import time
from pathlib import Path

from celery import shared_task
from celery.signals import worker_shutting_down
from django.conf import settings

from citadel.audit.services import Actor
from citadel.finetuning import services
from citadel.jobs import worker_lifecycle  # noqa: F401 - connects the worker's heartbeat signals
from citadel.jobs.leases import keeper, lease_acquire, lease_release
from citadel.jobs.models import JobLease
from citadel.registry.manifest import ModelFileRejected
from citadel.registry.services import model_files_check

logger = logging.getLogger(__name__)

CANCEL_POLL_SECONDS = 0.5
# Celery's limits (not enforced by the thread pool `citadel worker` uses; the trainer's own
# deadline in _Progress.should_stop is): a day of training plus time to save the adapter.
SOFT_TIME_LIMIT = settings.CITADEL_FINETUNE_TIME_LIMIT_SECONDS + 300
TIME_LIMIT = SOFT_TIME_LIMIT + 300


# Set when this worker process begins a warm shutdown: running trainings hand their jobs back to
# the queue (to resume from their last checkpoint elsewhere) instead of holding the shutdown for hours.
_shutting_down = threading.Event()
# Trainings this process runs at once (CITADEL_FINETUNE_WORKER_SLOTS): the worker's threads also
# serve inference, and two trainings on one GPU could both run out of memory.
_slots = threading.BoundedSemaphore(max(1, settings.CITADEL_FINETUNE_WORKER_SLOTS))
SLOT_WAIT_SECONDS = 30.0


@worker_shutting_down.connect
def _on_shutting_down(**kwargs):
    _shutting_down.set()


class _Progress:
    """on_event and should_stop for finetune.train, bound to one job on one worker."""

    def __init__(self, job, worker: str):
        self.job_id, self.worker = job.id, worker
        self.deadline = time.monotonic() + settings.CITADEL_FINETUNE_TIME_LIMIT_SECONDS
        self.step, self.stop_reason = job.step, None
        self._checked = 0.0
        self.lease = None  # citadel.jobs.leases.Held, renewed while training; lost when taken back

    def on_event(self, event: dict) -> None:
        if event.get("step") is not None:
            self.step = event["step"]
        try:
            if not services.job_progress(job_id=self.job_id, worker_name=self.worker, event=event):
                self.stop_reason = self.stop_reason or "not_ours"
        except Exception:  # a lost event must not kill a training run; the next one is recorded
            logger.exception("could not record event %s of fine-tuning job %s", event.get("type"), self.job_id)

    def should_stop(self) -> bool:
        if self.stop_reason:
            return True
        if self.lease is not None and self.lease.lost.is_set():
            self.stop_reason = "not_ours"
            return True
        if _shutting_down.is_set():
            self.stop_reason = "shutdown"
            return True
        if time.monotonic() > self.deadline:
            self.stop_reason = "timeout"
            return True
        now = time.monotonic()
        if now - self._checked >= CANCEL_POLL_SECONDS:
            self._checked = now
            try:
                if not services.job_owned_by(job_id=self.job_id, worker_name=self.worker):
                    self.stop_reason = "not_ours"
            except Exception:  # the database is briefly away: keep training, ask again later
                logger.exception("could not read the state of fine-tuning job %s", self.job_id)
        return self.stop_reason is not None


def _train(job, progress: _Progress):
    from finetune import TrainConfig, train

    return train(base_model=job.model.path, train_file=job.training_file.path,
                 validation_file=job.validation_file.path if job.validation_file_id else None,
                 output_dir=job.output_dir, config=TrainConfig.from_dict(job.config),
                 on_event=progress.on_event, should_stop=progress.should_stop, resume=True,
                 device=settings.CITADEL_FINETUNE_DEVICE)


@shared_task(name="citadel.finetuning.run_job", bind=True, acks_late=True, reject_on_worker_lost=True,
             soft_time_limit=SOFT_TIME_LIMIT,
             time_limit=TIME_LIMIT, max_retries=0, ignore_result=True)
def run_job(self, job_id: str) -> None:
    if not _slots.acquire(timeout=SLOT_WAIT_SECONDS):
        # Busy training already: send the id back to the pool's queue, where an idle worker (or
        # this one, later) takes it. The job is still queued in the database whatever happens.
        queue = services.job_queue(job_id=job_id)
        if queue:
            run_job.apply_async(args=[job_id], queue=queue)
        return
    try:
        _run(job_id, worker=self.request.hostname or "worker")
    finally:
        _slots.release()


def _run(job_id: str, *, worker: str) -> None:
    actor = Actor.system(worker)
    job = services.job_claim(job_id=job_id, worker_name=worker)
    if job is None:
        logger.info("fine-tuning job %s is not queued any more; nothing to do", job_id)
        return
    progress = _Progress(job, worker)
    try:  # the lease (citadel.jobs.leases): beat's reconciler takes the job back if it stops being renewed
        lease_acquire(kind=JobLease.Kind.FINE_TUNING, job_id=job.pk, worker_name=worker, attempt=job.attempts)
        progress.lease = keeper.hold(kind=JobLease.Kind.FINE_TUNING, job_id=job.pk, attempt=job.attempts)
    except Exception:  # no lease yet: the reconciler treats a lease-less job like an expired one
        logger.exception("could not take the lease on fine-tuning job %s", job_id)
    try:
        # The base model's files against the SHA-256 manifest recorded at import, as an inference worker
        # checks them before loading: a changed file is refused (audited as model.load denied), not trained on.
        model_files_check(path=job.model.path)
        Path(job.output_dir).mkdir(parents=True, exist_ok=True)
        result = _train(job, progress)
        if progress.stop_reason == "timeout":
            services.job_fail(job_id=job_id, code="timeout", actor=actor,
                              message=f"Training ran past its time limit of "
                                      f"{settings.CITADEL_FINETUNE_TIME_LIMIT_SECONDS} s "
                                      f"(CITADEL_FINETUNE_TIME_LIMIT_SECONDS) and was stopped at step {progress.step}.")
        elif progress.stop_reason == "shutdown":
            services.job_release(job_id=job_id, worker_name=worker, step=result.steps)
        elif progress.stop_reason or result.cancelled:
            services.job_stopped(job_id=job_id, worker_name=worker, step=result.steps)
        elif services.job_succeed(job_id=job_id, worker_name=worker, result=result) is None:
            logger.info("fine-tuning job %s finished but is no longer this worker's; result left unused", job_id)
    except Exception as error:  # the trainer failed: the job says why, the worker lives on
        logger.exception("fine-tuning job %s failed", job_id)
        code = "invalid_config" if type(error).__name__ == "ConfigError" else "training_error"
        code = "model_file_rejected" if isinstance(error, ModelFileRejected) else code
        services.job_fail(job_id=job_id, code=code, message=f"{type(error).__name__}: {error}", actor=actor,
                          param=getattr(error, "field", "") if code == "invalid_config" else "")
    finally:
        if progress.lease is not None:
            keeper.drop(progress.lease)
            try:
                lease_release(kind=JobLease.Kind.FINE_TUNING, job_id=job.pk, attempt=job.attempts)
            except Exception:  # left behind, it expires; the reconciler checks the job's state first
                logger.exception("could not release the lease on fine-tuning job %s", job_id)


@shared_task(name="citadel.finetuning.recover", soft_time_limit=60, time_limit=90, ignore_result=True)
def recover() -> dict:
    """Beat: requeue or fail jobs whose worker died, resend lost messages (see jobs_recover)."""
    return services.jobs_recover()
