"""The inference task a pool's workers run. It receives a job id only; the row holds the rest."""

import logging
import time
from datetime import timedelta

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded

from citadel.audit.services import Actor
from citadel.jobs import worker_lifecycle  # noqa: F401 - connects the worker's heartbeat signals
from citadel.jobs.engines import engines
from citadel.jobs.models import InferenceJob
from citadel.jobs.services import job_append_chunk, job_claim, job_fail, job_succeed, jobs_redispatch_queued

logger = logging.getLogger(__name__)

CHUNK_FLUSH_SECONDS = 0.02


def _events(llm, job: InferenceJob):
    from inference import SamplingParams

    try:
        params = SamplingParams(**job.payload.get("sampling", {}))
    except (TypeError, ValueError) as error:
        raise _InvalidParams(str(error)) from error
    if job.kind == InferenceJob.Kind.CHAT:
        return llm.stream_chat(job.payload["messages"], params)
    return llm.stream(job.payload["prompt"], params)


class _InvalidParams(Exception):
    pass


@shared_task(name="citadel.jobs.run_inference", bind=True, acks_late=True, soft_time_limit=900, time_limit=960,
             ignore_result=True)
def run_inference(self, job_id: str) -> None:
    worker = self.request.hostname or "worker"
    actor = Actor.system(worker)
    try:
        job = job_claim(job_id=job_id, worker_name=worker)
    except Exception as error:  # e.g. the database is unreachable: fail the job if we still can
        logger.exception("could not claim job %s", job_id)
        job_fail(job_id=job_id, code="worker_error", message=f"The worker could not start the job: {error}",
                 actor=actor)
        return
    if job is None:
        logger.info("job %s is not queued any more; nothing to do", job_id)
        return
    try:
        llm = engines.get(path=job.model.path, engine_settings=job.deployment.engine_settings)
        pieces, pending, index, last_flush = [], [], 0, time.monotonic()
        event = None
        for event in _events(llm, job):
            if event.text:
                pending.append(event.text)
            if pending and (event.finish_reason or time.monotonic() - last_flush >= CHUNK_FLUSH_SECONDS):
                text = "".join(pending)
                job_append_chunk(job=job, index=index, text=text)
                pieces.append(text)
                pending, index, last_flush = [], index + 1, time.monotonic()
        if pending:
            job_append_chunk(job=job, index=index, text="".join(pending))
            pieces.append("".join(pending))
        job_succeed(job=job, text="".join(pieces), finish_reason=(event.finish_reason if event else None) or "stop",
                    prompt_tokens=event.prompt_tokens if event else 0,
                    completion_tokens=event.completion_tokens if event else 0)
    except _InvalidParams as error:
        job_fail(job_id=job_id, code="invalid_sampling_params", message=str(error), actor=actor)
    except SoftTimeLimitExceeded:
        job_fail(job_id=job_id, code="timeout", message="The job ran past the worker's time limit.", actor=actor)
    except Exception as error:  # the engine failed: the client gets an error, the worker lives on
        logger.exception("job %s failed", job_id)
        job_fail(job_id=job_id, code="engine_error", message=f"{type(error).__name__}: {error}", actor=actor)


@shared_task(name="citadel.jobs.redispatch_queued", soft_time_limit=60, time_limit=90, ignore_result=True)
def redispatch_queued() -> int:
    """Beat: recover jobs whose broker message was lost (see jobs_redispatch_queued)."""
    return jobs_redispatch_queued(older_than=timedelta(seconds=30), max_dispatches=5)
