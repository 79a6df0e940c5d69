"""The batch task a pool's workers run, and beat's recovery. The task receives a batch id only.

Throughput is the point of a batch, so a worker does what the offline engine does: it hands a
whole chunk of lines to the shared `inference.LLM` in one `generate` call (they decode as one
continuous batch). A few feeder threads per task keep more than one chunk in flight, so while
one chunk's results are committed (and its last long sequences finish) the next chunk's
sequences already fill the engine's batch. The window (CITADEL_BATCH_CHUNK_LINES x
CITADEL_BATCH_FEEDERS, 512 lines by default) is about four times the engine's running batch: a
chunk's feeder waits for the chunk's longest line, and by then most of its lines ended long ago,
so a window close to the engine's batch (64 x 3 against 128) left it running half empty and
took 206 steps for 1,024 lines where the offline engine, given every line at once, took 161.
Waiting sequences cost the engine only their token ids, no cache pages. Lines are claimed and recorded in the database,
which is what makes the task idempotent and a killed worker recoverable (see services).
"""

import logging
import threading
import time
import uuid

from celery import shared_task
from django.conf import settings
from django.db import connection

from citadel.audit.services import Actor
from citadel.batches.models import Batch
from citadel.batches.services import (
    ClaimedLine,
    batch_finish_if_done,
    batches_recover,
    lines_claim,
    lines_record,
)
from citadel.jobs import worker_lifecycle  # noqa: F401 - connects the worker's heartbeat signals
from citadel.jobs.engines import engines
from citadel.jobs.leases import keeper, lease_acquire, lease_release
from citadel.jobs.models import JobLease

logger = logging.getLogger(__name__)


def _params(payload: dict):
    from inference import SamplingParams

    return SamplingParams(**payload.get("sampling", {}))


def _run_chunk(llm, batch: Batch, lines: list[ClaimedLine]) -> dict:
    """{line pk: result} for one chunk. Lines whose settings the engine refuses fail alone; if the
    engine refuses the chunk as a whole (a chat template rejecting one conversation), each line
    is tried on its own so that only the guilty one fails."""
    from citadel.jobs.prefix_salt import job_cache_salt
    from citadel.usage.metrics import observe_batch_chunk

    results, runnable, params = {}, [], []
    for line in lines:
        try:
            params.append(_params(line.payload))
            runnable.append(line)
        except (TypeError, ValueError) as error:
            results[line.pk] = {"error": {"code": "invalid_sampling_params", "message": str(error),
                                          "param": None}}
    if not runnable:
        return results
    lora = None
    if batch.adapter:
        from citadel.registry.adapter_check import adapter_files_check
        from inference import LoRARequest

        adapter_files_check(name=batch.adapter["name"], path=batch.adapter["path"])  # refused and audited if changed
        lora = LoRARequest(name=batch.adapter["name"], path=batch.adapter["path"])

    salt = job_cache_salt(batch)  # the team's prefix-cache namespace, as for single requests

    def run(group, group_params):
        if batch.endpoint == Batch.Endpoint.CHAT:
            return llm.chat([line.payload["messages"] for line in group], group_params, lora, salt)
        return llm.generate([line.payload["prompt"] for line in group], group_params, lora, salt)

    started = time.monotonic()
    try:
        outputs = list(zip(runnable, run(runnable, params), strict=True))
    except ValueError:
        outputs = []
        for line, line_params in zip(runnable, params, strict=True):
            try:
                outputs.append((line, run([line], [line_params])[0]))
            except ValueError as error:
                results[line.pk] = {"error": {"code": "invalid_request", "message": str(error), "param": None}}
    for line, output in outputs:
        results[line.pk] = {"text": output.text, "finish_reason": output.finish_reason or "stop",
                            "prompt_tokens": len(output.prompt_token_ids), "completion_tokens": len(output.token_ids)}
    observe_batch_chunk(lines=len(outputs), seconds=time.monotonic() - started,
                        completion_tokens=sum(len(o.token_ids) for _, o in outputs), model=batch.model.name)
    return results


def _feed(llm, batch: Batch, worker: str, stop: threading.Event, *, thread: bool = True) -> None:
    """Claim a chunk, run it, record it; until no pending line is left or the batch stops.
    A feeder thread closes its own database connection when it ends (`thread`)."""
    try:
        while not stop.is_set():
            claim = f"{worker}#{uuid.uuid4().hex[:12]}"
            lines = lines_claim(batch_id=batch.pk, claim=claim, limit=settings.CITADEL_BATCH_CHUNK_LINES)
            if not lines:
                return
            lease = _chunk_lease(batch, claim)
            try:
                results = _run_chunk(llm, batch, lines)
            except Exception as error:  # the engine failed as a whole: these lines fail, the batch goes on
                logger.exception("batch %s: a chunk failed", batch.pk)
                results = {line.pk: {"error": {"code": "engine_error", "message": f"{type(error).__name__}: {error}",
                                               "param": None}} for line in lines}
            finally:
                if lease is not None:
                    keeper.drop(lease)
            lines_record(batch_id=batch.pk, claim=claim, results=results)  # fenced by the claim
            if lease is not None:
                lease_release(kind=JobLease.Kind.BATCH, job_id=lease.job_id)
                if lease.lost.is_set():
                    return  # this worker was thought dead; leave the batch to the others
    except BaseException:
        stop.set()
        raise
    finally:
        if thread:
            connection.close()


def _chunk_lease(batch: Batch, claim: str):
    """A lease on one claimed chunk (citadel.jobs.leases): if this worker stops renewing it, beat's
    reconciler puts the chunk's lines back to pending for another worker. None if it could not be
    written (the lines then wait for citadel.batches.recover, which goes by the worker's heartbeat)."""
    lease_id = f"{batch.pk.hex}:{claim.rsplit('#', 1)[-1]}"
    try:
        lease_acquire(kind=JobLease.Kind.BATCH, job_id=lease_id, worker_name=claim, attempt=1)
    except Exception:
        logger.exception("could not take the lease on a chunk of batch %s", batch.pk)
        return None
    return keeper.hold(kind=JobLease.Kind.BATCH, job_id=lease_id, attempt=1)


@shared_task(name="citadel.batches.run_batch", bind=True, acks_late=True, reject_on_worker_lost=True,
             soft_time_limit=23 * 3600,
             time_limit=24 * 3600, ignore_result=True, max_retries=0)
def run_batch(self, batch_id: str) -> None:
    worker = self.request.hostname or "worker"
    actor = Actor.system(worker)
    batch = Batch.objects.select_related("deployment__model", "model").filter(pk=batch_id).first()
    if batch is None or batch.status != Batch.Status.IN_PROGRESS:
        if batch is not None:
            batch_finish_if_done(batch_id=batch.pk, actor=actor)  # a cancel that waited for nothing
        return
    llm = engines.get(path=batch.deployment.model.path, engine_settings=batch.deployment.engine_settings)
    stop = threading.Event()
    if settings.CITADEL_BATCH_FEEDERS <= 1:  # one chunk at a time, in the task's own thread
        _feed(llm, batch, worker, stop, thread=False)
    else:
        feeders = [threading.Thread(target=_feed, args=(llm, batch, worker, stop), name=f"batch-feeder-{i}",
                                    daemon=True) for i in range(settings.CITADEL_BATCH_FEEDERS)]
        for feeder in feeders:
            feeder.start()
        try:
            for feeder in feeders:
                feeder.join()
        finally:
            stop.set()
    batch_finish_if_done(batch_id=batch.pk, actor=actor)


@shared_task(name="citadel.batches.recover", soft_time_limit=120, time_limit=150, ignore_result=True)
def recover() -> dict:
    """Beat: see batches_recover."""
    return batches_recover()
