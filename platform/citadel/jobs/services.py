"""Writes for inference jobs: submit and dispatch (web side), claim, record and finish (worker side).

Every transition is a short transaction on the job row; the audit log gets the request when it
is accepted or refused and the outcome when it ends.
"""

import logging
from datetime import timedelta

from django.db import connection, transaction
from django.db.models import F
from django.utils import timezone

from citadel.audit.services import (
    Actor,
    audit_record,
    audit_record_with_write,
    audit_record_with_write_possible,
)
from citadel.core.exceptions import CitadelError, ServiceUnavailable
from citadel.jobs.admission import deployment_admit, no_worker_retry_after
from citadel.jobs.leases import lease_acquire, lease_release
from citadel.jobs.models import InferenceChunk, InferenceJob, JobLease
from citadel.jobs.wakeups import CHANNEL, job_notify, notify_payload
from citadel.registry.selectors import deployments_active_for_model, model_get
from citadel.residency.prompts import retained_payload
from citadel.residency.services import ResidencyDenied, Subject, decide

logger = logging.getLogger(__name__)


def job_submit(*, model_name: str, kind: str, payload: dict, stream: bool, actor: Actor, subject: Subject,
               request=None, user=None, api_key=None, model=None) -> InferenceJob:
    """Record the job, then hand its id to a live pool that serves the model and that the residency
    policy of `subject` (team and data class) allows.

    Raises NotFound for an unknown model; ResidencyDenied (403) when the policy allows none of the
    model's pools, audited as denied with the decision and with no job row, since nothing runs; and
    ServiceUnavailable when no allowed pool has a live worker, the job row then staying behind as
    failed, so no request is silently dropped (with Retry-After); PoolSaturated (429, Retry-After) when
    every live allowed pool is running and queueing all it may (citadel.jobs.admission).
    """
    model = model if model is not None else model_get(name=model_name)  # the caller's, read for this request
    deployments = list(deployments_active_for_model(model=model).select_related("pool__site"))
    decision = decide(team=subject.team, data_class=subject.data_class, model=model, purpose="inference",
                      deployments=deployments)
    residency = {**decision.details(), "key_data_class": subject.key_class.name}
    if deployments and not decision.allowed:
        audit_record(actor=actor, action=f"inference.{kind}", outcome="denied", target_type="model",
                     target_id=model.name, request=request, details={"stream": stream, "residency": residency})
        error = ResidencyDenied(decision.reason)
        error.audited = True
        raise error
    allowed = {pool.pk for pool in decision.pools}
    candidates = sorted((d for d in deployments if d.pool_id in allowed), key=lambda d: d.pool_id != decision.pool.pk) \
        if decision.allowed else []
    deployment = deployment_admit(candidates=candidates)  # 429 when every live allowed pool is saturated
    request_id = getattr(request, "request_id", "")
    days = decision.policy.retention_days if decision.policy else None
    now = timezone.now()
    # Counted as dispatched once here, in the row's own insert: the message goes out right after
    # this commits (a failed send fails the job), and a separate update after it would cost the
    # request a commit of its own and hold the row lock the worker's claim waits for.
    job = InferenceJob(
        kind=kind, model=model, deployment=deployment, pool=deployment.pool if deployment else None,
        user=user, api_key=api_key, request_id=request_id, stream=stream, payload=payload,
        team=subject.team, data_class=subject.data_class, site_id=deployment.pool.site_id if deployment else None,
        prompt_retention=decision.prompt_retention,
        prompt_kept_until=now + timedelta(days=days) if days is not None else None,
        dispatch_count=1 if deployment else 0, dispatched_at=now if deployment else None,
    )
    if deployment is not None and audit_record_with_write_possible():
        # The row and its audit record in one implicit transaction, one message (audit_record_with_write
        # says why); then the job is committed, so it can be published.
        audit_record_with_write(
            write=_insert_sql(job), actor=actor, action=f"inference.{kind}", outcome="success", target_type="model",
            target_id=model.name, request=request,
            details={"job": str(job.id), "pool": deployment.pool.name, "stream": stream, "residency": residency})
        job._state.adding, job._state.db = False, "default"
        _publish(job, counted=True)
        return job
    with transaction.atomic():
        job.save(force_insert=True)
        if deployment is None:
            where = ", ".join(d.pool.name for d in candidates)
            message = (f"No worker is serving model '{model.name}' where its residency policy allows: the allowed "
                       f"pools ({where}) have no live worker. Start one with `citadel worker --pool POOL`."
                       if candidates else f"Model '{model.name}' is not deployed on any worker pool. Deploy it first.")
            _fail(job, code="no_worker", message=message)
        audit_record(
            actor=actor, action=f"inference.{kind}", outcome="success" if deployment else "failure",
            target_type="model", target_id=model.name, request=request,
            details={"job": str(job.id), "pool": deployment.pool.name if deployment else None,
                     "stream": stream, "residency": residency,
                     **({"error": job.error_message} if deployment is None else {})},
        )
        if deployment is not None:
            # Only a committed job is handed to the broker, so a worker always finds its row.
            transaction.on_commit(lambda: _publish(job, counted=True))
    if deployment is None:
        error = ServiceUnavailable(job.error_message, code="no_worker")
        error.retry_after = no_worker_retry_after() if candidates else None
        raise error
    return job


def _insert_sql(obj) -> tuple[str, list]:
    """The INSERT statement (and its parameters) that saving the new model instance `obj` would run."""
    from django.db.models.sql import InsertQuery

    query = InsertQuery(type(obj))
    query.insert_values(obj._meta.local_concrete_fields, [obj])
    [(sql, params)] = query.get_compiler(using="default").as_sql()
    return sql, list(params)


def _publish(job: InferenceJob, *, counted: bool = False) -> None:
    """Send the job id to its pool's queue; a broker failure fails the job with a clear error.

    `counted`: the job's row already counts this send (job_submit writes it with the row)."""
    from citadel.jobs.tasks import run_inference

    try:
        run_inference.apply_async(args=[str(job.id)], queue=job.pool.queue)
    except Exception as error:  # the broker is down or refused the message
        logger.exception("could not publish job %s", job.id)
        job_fail(job_id=job.id, code="broker_unavailable", message=f"The job queue is unavailable: {error}",
                 actor=Actor.system("dispatcher"))
        raise ServiceUnavailable("The job queue is unavailable; try again shortly.", code="broker_unavailable") \
            from error
    if not counted:
        InferenceJob.objects.filter(pk=job.pk).update(dispatch_count=F("dispatch_count") + 1,
                                                      dispatched_at=timezone.now())


def jobs_redispatch_queued(*, older_than: timedelta, max_dispatches: int) -> int:
    """Send again the ids of jobs still queued long after their last dispatch.

    The broker is transport only: if a message was lost (a broker restart without persistence),
    the row is still queued and this recovers it. A duplicate is harmless: job_claim runs a job once.
    Jobs that have been sent `max_dispatches` times are failed instead of retried for ever.
    """
    cutoff = timezone.now() - older_than
    stale = InferenceJob.objects.filter(status=InferenceJob.Status.QUEUED, dispatched_at__lt=cutoff,
                                        pool__isnull=False).select_related("pool")
    count = 0
    for job in stale:
        if job.dispatch_count >= max_dispatches:
            job_fail(job_id=job.id, code="worker_lost", actor=Actor.system("dispatcher"),
                     message=f"No worker in pool '{job.pool.name}' took the job after {job.dispatch_count} tries.")
            continue
        try:
            _publish(job)
            count += 1
        except ServiceUnavailable:
            pass  # already failed with the broker's error
    return count


def _fail(job: InferenceJob, *, code: str, message: str) -> None:
    job.status, job.error_code, job.error_message = InferenceJob.Status.FAILED, code, message
    job.finished_at = timezone.now()
    job.payload = retained_payload(job.payload, job.prompt_retention)  # the job is over: keep what the policy keeps
    job.save(update_fields=["status", "error_code", "error_message", "finished_at", "payload"])
    job_notify(job.pk)  # the request waiting for the job wakes when this commits
    lease_release(kind=JobLease.Kind.INFERENCE, job_id=job.pk)


def _commit_asynchronously(*, notify=None) -> None:
    """Let the current transaction commit without waiting for its WAL flush (PostgreSQL; call it only
    in a transaction of the caller's own, not one it was called inside); with `notify`, also wake
    the waiters of that job (job_notify), in the same round trip.

    Only for writes whose loss in a crash is recovered and that no durable truth depends on: a job's
    claim and lease, and a streamed job's chunk rows. The worker's next synchronous commit (the job's
    outcome with its audit record) flushes the WAL past them, as WAL is flushed in order; if the
    server crashes before, the job is back to queued (with no lease) and is sent again by the
    reconciler, the fenced worker records nothing, and the client's stream has already broken with
    the server. What makes the request's truth (the job row and its acceptance audit record, the
    outcome and its audit record) still commits synchronously. Each synchronous commit costs an
    fsync (about 4 ms on the benchmark's disk); a stream writing a chunk every 20 ms could not keep up.
    """
    if connection.vendor != "postgresql":
        if notify is not None:
            job_notify(notify)
        return
    with connection.cursor() as cursor:
        if notify is None:
            cursor.execute("SELECT set_config('synchronous_commit', 'off', true)")
        else:
            cursor.execute("SELECT set_config('synchronous_commit', 'off', true), pg_notify(%s, %s)",
                           [CHANNEL, notify_payload(notify)])


def job_claim(*, job_id: str, worker_name: str) -> InferenceJob | None:
    """Move a queued job to running for this worker; None when it is not queued any more
    (already done, failed, or taken by a worker that crashed), so a redelivery does no harm.

    Its own transaction commits without waiting for the WAL flush (_commit_asynchronously says why)."""
    outermost = not connection.in_atomic_block
    with transaction.atomic():
        job = (InferenceJob.objects.select_for_update(of=("self",))
               .select_related("model", "deployment", "data_class").filter(pk=job_id).first())
        if job is None or job.status != InferenceJob.Status.QUEUED:
            return None
        if outermost:
            _commit_asynchronously()
        job.status, job.worker_name, job.started_at = InferenceJob.Status.RUNNING, worker_name, timezone.now()
        job.attempts += 1
        job.save(update_fields=["status", "worker_name", "started_at", "attempts"])
        lease_acquire(kind=JobLease.Kind.INFERENCE, job_id=job.pk, worker_name=worker_name, attempt=job.attempts)
    return job


NUL_REPLACEMENT = "\ufffd"


def storable(value):
    """`value` (text, or logprob entries) with NUL characters replaced by U+FFFD.

    PostgreSQL's text and jsonb cannot hold NUL, and a model can generate it; the token's exact
    bytes still travel in the logprob entries' `bytes`.
    """
    if isinstance(value, str):
        return value.replace("\x00", NUL_REPLACEMENT) if "\x00" in value else value
    if isinstance(value, list):
        return [storable(v) for v in value]
    if isinstance(value, dict):
        return {k: (v if k == "bytes" else storable(v)) for k, v in value.items()}
    return value


def job_append_chunk(*, job: InferenceJob, index: int, text: str, logprobs: list[dict] | None = None) -> None:
    """One piece of a streamed job's output, for its waiting client; committed without waiting for the
    WAL flush (_commit_asynchronously), as the job's outcome carries the whole text durably."""
    outermost = not connection.in_atomic_block
    with transaction.atomic():
        InferenceChunk.objects.create(job=job, index=index, text=storable(text), logprobs=storable(logprobs))
        if outermost:
            _commit_asynchronously(notify=job.pk)
        else:
            job_notify(job.pk)


@transaction.atomic
def job_succeed(*, job: InferenceJob, text: str, finish_reason: str, prompt_tokens: int,
                completion_tokens: int, logprobs: list[dict] | None = None, attempt: int | None = None) -> None:
    """Record the outcome, usage and audit completion once. A worker passes its `attempt` (the
    fencing token): a worker whose job was taken back and run again then records nothing."""
    running = InferenceJob.objects.filter(pk=job.pk, status=InferenceJob.Status.RUNNING)
    if attempt is not None:
        running = running.filter(attempts=attempt)
    updated = running.update(
        status=InferenceJob.Status.SUCCEEDED, text=storable(text), finish_reason=finish_reason,
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, logprobs=storable(logprobs),
        finished_at=timezone.now(),
        payload=retained_payload(job.payload, job.prompt_retention),
    )
    if updated:
        from citadel.usage.services import usage_record  # metered with the outcome, in its transaction

        job_notify(job.pk)  # the request waiting for the job wakes when this commits

        lease_release(kind=JobLease.Kind.INFERENCE, job_id=job.pk)

        usage_record(kind="inference", source=f"job:{job.pk.hex}", api_key_id=job.api_key_id, team_id=job.team_id,
                     user_id=job.user_id, model_name=job.model.name, prompt_tokens=prompt_tokens,
                     completion_tokens=completion_tokens)
        audit_record(actor=Actor.system(job.worker_name), action=f"inference.{job.kind}.complete",
                     outcome="success", target_type="model", target_id=job.model.name, request_id=job.request_id,
                     details={"job": str(job.id), "prompt_tokens": prompt_tokens,
                              "completion_tokens": completion_tokens, "finish_reason": finish_reason,
                              "data_class": _data_class_name(job)}, savepoint=False)  # last write: fails it all


@transaction.atomic
def job_fail(*, job_id, code: str, message: str, actor: Actor, attempt: int | None = None) -> bool:
    """Fail a job that is not finished yet; False when it already was. A worker passes its `attempt`:
    if the job was taken back from it meanwhile (and queued or run again), it is left alone."""
    job = InferenceJob.objects.select_for_update(of=("self",)).select_related("model").filter(pk=job_id).first()
    if job is None or job.is_terminal:
        return False
    if attempt is not None and (job.attempts != attempt or job.status != InferenceJob.Status.RUNNING):
        return False
    _fail(job, code=code, message=message)
    audit_record(actor=actor, action=f"inference.{job.kind}.complete", outcome="failure", target_type="model",
                 target_id=job.model.name, request_id=job.request_id,
                 details={"job": str(job.id), "error_code": code, "error": message[:1000],
                          "data_class": _data_class_name(job)})
    return True


@transaction.atomic
def job_requeue_or_fail(*, job_id, attempt: int, why: str, max_attempts: int) -> str | None:
    """Take a running job back from a worker whose lease expired (citadel.jobs.reconcile).

    Sent to its pool again when nothing of it reached the client yet (not streamed, or no chunk
    written) and it has run fewer than `max_attempts` times: the chunks of the lost attempt are
    dropped and the next worker starts over. Otherwise failed as worker_lost with `why`. Returns
    "requeued", "failed", or None when the job is not that attempt's any more.
    """
    job = (InferenceJob.objects.select_for_update(of=("self",)).select_related("model", "pool")
           .filter(pk=job_id, status=InferenceJob.Status.RUNNING, attempts=attempt).first())
    if job is None:
        return None
    actor = Actor.system("reconciler")
    streamed = job.stream and job.chunks.exists()
    if streamed or job.attempts >= max_attempts or job.pool_id is None:
        reason = ("part of its output was already streamed to the client" if streamed
                  else f"it has been tried {job.attempts} times (CITADEL_JOB_MAX_ATTEMPTS={max_attempts})")
        job_fail(job_id=job.pk, code="worker_lost", actor=actor,
                 message=f"{why} The job was not run again: {reason}. Retry the request.")
        return "failed"
    job.chunks.all().delete()
    lost_worker = job.worker_name
    # Sent afresh: the resend count starts again (citadel.jobs.reconcile resends a lost message).
    job.status, job.worker_name, job.started_at, job.dispatch_count = InferenceJob.Status.QUEUED, "", None, 0
    job.save(update_fields=["status", "worker_name", "started_at", "dispatch_count"])
    lease_release(kind=JobLease.Kind.INFERENCE, job_id=job.pk)
    audit_record(actor=actor, action=f"inference.{job.kind}.requeue", outcome="success", target_type="model",
                 target_id=job.model.name, request_id=job.request_id,
                 details={"job": str(job.pk), "reason": why, "worker": lost_worker, "attempts": job.attempts,
                          "pool": job.pool.name, "data_class": _data_class_name(job)})
    transaction.on_commit(lambda: _publish_quietly(job))
    return "requeued"


def _publish_quietly(job: InferenceJob) -> None:
    try:
        _publish(job)
    except ServiceUnavailable:
        pass  # the job failed with the broker's error, which its client reads


def _data_class_name(job: InferenceJob) -> str | None:
    """The job's data class, in its audit records: it decides how long they are kept (audit_purge)."""
    return job.data_class.name if job.data_class_id else None


def jobs_prompts_purge(*, now=None) -> int:
    """Remove what was kept of the prompts of finished jobs whose retention days are over."""
    now = now or timezone.now()
    expired = InferenceJob.objects.filter(prompt_kept_until__lt=now, status__in=InferenceJob.TERMINAL)
    count = 0
    for job in expired.only("pk", "payload"):
        InferenceJob.objects.filter(pk=job.pk).update(payload=retained_payload(job.payload, "none"),
                                                      prompt_kept_until=None)
        count += 1
    return count


def job_error(job: InferenceJob) -> CitadelError:
    """The error a failed job turns into for its client."""
    from citadel.core.exceptions import InvalidRequest, UpstreamError

    if job.error_code == "invalid_sampling_params":
        return InvalidRequest(job.error_message, code=job.error_code)
    if job.error_code in ("no_worker", "worker_lost", "broker_unavailable", "timeout"):
        return ServiceUnavailable(job.error_message, code=job.error_code)
    return UpstreamError(job.error_message or "The worker failed to run the job.", code=job.error_code or None)
