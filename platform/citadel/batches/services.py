"""Writes for batches: create (web), claim and record chunks of lines (worker), finalize, cancel,
and recovery of lines whose worker died or whose message was lost (beat).

A batch is admitted like a one-by-one request: the key may use the model, and the residency
policy of its team and data class (the more sensitive of the key's and the input file's) names
the pools it may run on, or the batch is refused and audited with nothing stored. Every state
change of a batch is audited; a line's result commits with the batch's counters and the usage
record of its chunk, so progress, output and metering can never disagree.
"""

import io
import json
import logging
import uuid
from datetime import timedelta
from typing import NamedTuple

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Count, F, Q, Sum
from django.utils import timezone
from psycopg.types.json import Jsonb

from citadel.audit.services import Actor, audit_record
from citadel.batches.lines import BodyChecker, LineError, ValidLine, line_parse, metadata_check
from citadel.batches.models import Batch, BatchRequest
from citadel.core.exceptions import CitadelError, InvalidRequest, NotFound, PermissionDenied
from citadel.finetuning import training
from citadel.finetuning.models import File
from citadel.finetuning.selectors import file_get_for_subject
from citadel.registry.selectors import deployments_active_for_model, model_adapter, workers_live
from citadel.residency.services import ResidencyDenied, Subject, decide

logger = logging.getLogger(__name__)

COMPLETION_WINDOW = "24h"
MAX_ERRORS_LISTED = 100
"""A failed batch's `errors` lists this many line errors at most (all of them are in its error file)."""


def _refuse(error: CitadelError, *, actor: Actor, request, target_id: str, details: dict | None = None):
    audit_record(actor=actor, action="batch.create", outcome="denied" if isinstance(error, ResidencyDenied)
                 else "failure", target_type="batch", target_id=target_id[:200], request=request,
                 details={**(details or {}), "error": error.code, "param": error.param, "message": error.message[:1000]})
    error.audited = True
    raise error


def _lines(path: str):
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if raw.strip():
                yield number, raw


def _parse(file: File, endpoint: str) -> tuple[list[ValidLine], list[LineError], int]:
    """Every line checked; the model is the first valid line's, and a later line naming another is an error
    (OpenAI: one model per batch). Duplicate custom_ids are errors too: outputs are matched by them."""
    valid, errors, seen, model, count = [], [], set(), None, 0
    checker = BodyChecker(endpoint)
    for number, raw in _lines(file.path):
        count += 1
        parsed = line_parse(number=number, raw=raw, endpoint=endpoint, checker=checker)
        if isinstance(parsed, ValidLine):
            if parsed.custom_id in seen:
                parsed = LineError(number, "duplicate_custom_id", f"Line {number}: custom_id {parsed.custom_id!r} is "
                                   "used by an earlier line; custom_ids must be unique in a batch.", "custom_id",
                                   parsed.custom_id)
            elif model is not None and parsed.model != model:
                parsed = LineError(number, "mismatched_model", f"Line {number}: body.model is {parsed.model!r} but "
                                   f"earlier lines use {model!r}; a batch runs one model.", "body.model",
                                   parsed.custom_id)
        if isinstance(parsed, ValidLine):
            model = parsed.model
            seen.add(parsed.custom_id)
            valid.append(parsed)
        else:
            if parsed.custom_id:
                seen.add(parsed.custom_id)
            errors.append(parsed)
    return valid, errors, count


def _more_sensitive(a, b):
    return a if a.rank >= b.rank else b


def batch_create(*, input_file_id: str, endpoint: str, completion_window: str, metadata: dict | None,
                 subject: Subject, actor: Actor, user=None, api_key=None, request=None) -> Batch:
    """Check every line, admit the batch by policy, store its lines and send it to an allowed pool.

    Malformed lines are stored as failed (with line number and custom_id) and reported in the error
    file while the valid ones run; a file with no valid line makes a `failed` batch whose `errors`
    list the lines. Refusals of the batch itself (unknown file, endpoint, model not allowed or not
    deployed, residency) raise a CitadelError naming the field, audited, and store nothing.
    """
    from citadel.finetuning.selectors import fine_tuned_model_usable

    refuse = {"actor": actor, "request": request, "target_id": str(input_file_id or "")}
    if endpoint not in Batch.Endpoint.values:
        _refuse(InvalidRequest(f"endpoint {endpoint!r} is not supported; Citadel runs batches of "
                               f"{' and '.join(Batch.Endpoint.values)}.", param="endpoint",
                               code="invalid_endpoint"), **refuse)
    if completion_window != COMPLETION_WINDOW:
        _refuse(InvalidRequest(f"completion_window must be {COMPLETION_WINDOW!r}.", param="completion_window"), **refuse)
    problem = metadata_check(metadata)
    if problem:
        _refuse(InvalidRequest(problem, param="metadata"), **refuse)
    file = file_get_for_subject(file_id=input_file_id, user=user, subject=subject)
    if file is None or file.deleted_at is not None or file.purpose != File.Purpose.BATCH:
        _refuse(InvalidRequest(f"input_file_id {input_file_id!r} is not a batch file you uploaded: upload the JSONL "
                               "with POST /v1/files and purpose 'batch'.", param="input_file_id",
                               code="invalid_file"), **refuse)
    valid, errors, count = _parse(file, endpoint)
    if count > settings.CITADEL_BATCH_MAX_LINES:
        _refuse(InvalidRequest(f"The file has {count:,} requests, more than the limit of "
                               f"{settings.CITADEL_BATCH_MAX_LINES:,} (CITADEL_BATCH_MAX_LINES); split it.",
                               param="input_file_id", code="too_many_requests"), **refuse)
    if count == 0:
        _refuse(InvalidRequest("The input file has no requests.", param="input_file_id", code="empty_file"), **refuse)
    data_class = _more_sensitive(subject.data_class, file.data_class)
    model_name = valid[0].model if valid else ""
    model = deployment = None
    adapter = None
    if valid:
        from citadel.registry.models import Model

        model = Model.objects.filter(name=model_name).first()
        adapter = model_adapter(name=model_name) if model is not None else None
        if model is None or (adapter and request is not None
                             and not fine_tuned_model_usable(request=request, name=model_name)):
            _refuse(NotFound(f"The model '{model_name}' (line {valid[0].line}) does not exist. List the available "
                             "ones at GET /v1/models.", param="model", code="model_not_found"), **refuse)
        if api_key is not None and not api_key.allows_model(model_name):
            _refuse(PermissionDenied(f"This API key may not use the model '{model_name}'.", param="model",
                                     code="model_not_allowed"), **refuse)
        deployments = list(deployments_active_for_model(model=model))
        if not deployments:
            _refuse(InvalidRequest(f"Model '{model_name}' is not deployed on any worker pool. Deploy it first.",
                                   param="model", code="model_not_deployed"), **refuse)
        decision = decide(team=subject.team, data_class=data_class, model=model, purpose="inference")
        if not decision.allowed:
            _refuse(ResidencyDenied(decision.reason), **refuse, details={"residency": decision.details()})
        allowed = {pool.pk for pool in decision.pools}
        candidates = sorted((d for d in deployments if d.pool_id in allowed),
                            key=lambda d: (not workers_live(pool=d.pool).exists(), d.pool_id != decision.pool.pk))
        deployment = candidates[0]
    return _batch_store(file=file, endpoint=endpoint, metadata=metadata, valid=valid, errors=errors, model=model,
                        adapter=adapter, deployment=deployment, subject=subject, data_class=data_class, user=user,
                        api_key=api_key, actor=actor, request=request)


@transaction.atomic
def _batch_store(*, file, endpoint, metadata, valid, errors, model, adapter, deployment, subject, data_class, user,
                 api_key, actor, request) -> Batch:
    now = timezone.now()
    batch = Batch.objects.create(
        endpoint=endpoint, input_file=file, metadata=metadata, model=model, adapter=adapter, deployment=deployment,
        pool=deployment.pool if deployment else None, site=deployment.pool.site if deployment else None,
        team=subject.team, data_class=data_class, user=user, api_key=api_key,
        request_id=getattr(request, "request_id", ""), total=len(valid) + len(errors), failed=len(errors),
        expires_at=now + timedelta(hours=24))
    audit_record(actor=actor, action="batch.create", outcome="success", target_type="batch",
                 target_id=batch.openai_id, request=request,
                 details={"input_file": file.openai_id, "endpoint": endpoint, "model": model.name if model else None,
                          "lines": batch.total, "invalid_lines": len(errors), "team": subject.team_name,
                          "data_class": data_class.name, "pool": deployment.pool.name if deployment else None})
    _lines_insert(batch, valid, errors, now)
    if not valid:
        listed = [e.as_dict() for e in errors[:MAX_ERRORS_LISTED]]
        _transition(batch, Batch.Status.FAILED, actor=actor, request=request,
                    errors={"object": "list", "data": listed}, details={"reason": "no valid line"})
        return batch
    _transition(batch, Batch.Status.IN_PROGRESS, actor=actor, request=request)
    transaction.on_commit(lambda: batch_publish(batch_id=batch.pk))
    return batch


def _lines_insert(batch: Batch, valid: list, errors: list, now) -> None:
    """Store the file's lines with one COPY. bulk_create built a model instance and prepared every field
    of every line in Python: ~80 ms for 1,024 lines, spent between the create call and the engine's first
    step (COPY: ~15 ms). The embedded SQLite mode (`make run`) has no COPY and keeps bulk_create."""
    pending, failed = BatchRequest.Status.PENDING, BatchRequest.Status.FAILED
    if connection.vendor != "postgresql":
        rows = [BatchRequest(batch=batch, line=v.line, custom_id=v.custom_id, payload=v.payload) for v in valid]
        rows += [BatchRequest(batch=batch, line=e.line, custom_id=e.custom_id, status=failed, error=e.as_dict(),
                              finished_at=now) for e in errors]
        BatchRequest.objects.bulk_create(rows, batch_size=500)
        return
    columns = ("id", "batch_id", "line", "custom_id", "status", "payload", "worker_name", "text", "finish_reason",
               "prompt_tokens", "completion_tokens", "error", "finished_at")
    table = connection.ops.quote_name(BatchRequest._meta.db_table)
    with connection.cursor() as cursor, cursor.cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
        for line in valid:
            copy.write_row((uuid.uuid4(), batch.pk, line.line, line.custom_id, pending, Jsonb(line.payload), "", "", "",
                            0, 0, None, None))
        for line in errors:
            copy.write_row((uuid.uuid4(), batch.pk, line.line, line.custom_id, failed, None, "", "", "", 0, 0,
                            Jsonb(line.as_dict()), now))


STAMPS = {Batch.Status.IN_PROGRESS: "in_progress_at", Batch.Status.FINALIZING: "finalizing_at",
          Batch.Status.COMPLETED: "completed_at", Batch.Status.FAILED: "failed_at", Batch.Status.EXPIRED: "expired_at",
          Batch.Status.CANCELLING: "cancelling_at", Batch.Status.CANCELLED: "cancelled_at"}


def _transition(batch: Batch, status: str, *, actor: Actor, request=None, errors: dict | None = None,
                details: dict | None = None) -> None:
    """Move the (locked or new) batch to `status`, stamped and audited."""
    previous = batch.status
    batch.status = status
    fields = ["status"]
    stamp = STAMPS.get(status)
    if stamp:
        setattr(batch, stamp, timezone.now())
        fields.append(stamp)
    if errors is not None:
        batch.errors = errors
        fields.append("errors")
    batch.save(update_fields=fields)
    audit_record(actor=actor, action=f"batch.{status}", outcome="success", target_type="batch",
                 target_id=batch.openai_id, request=request,
                 details={"from": previous, "completed": batch.completed, "failed": batch.failed,
                          "total": batch.total, **(details or {})})


def batch_publish(*, batch_id) -> int:
    """Send the batch's id to its pool, once per live worker there (at least once): each worker's task
    claims chunks of pending lines, so several workers share a large batch. A broker failure leaves
    the batch in progress; beat's recovery sends it again."""
    from citadel.batches.tasks import run_batch

    batch = Batch.objects.select_related("pool").get(pk=batch_id)
    copies = max(1, min(workers_live(pool=batch.pool).count(),
                        -(-batch.requests.filter(status=BatchRequest.Status.PENDING).count()
                          // settings.CITADEL_BATCH_CHUNK_LINES)))
    sent = 0
    for _ in range(copies):
        try:
            run_batch.apply_async(args=[str(batch.pk)], queue=batch.pool.queue)
            sent += 1
        except Exception:  # the broker is down: recovery sends it again from the row
            logger.exception("could not publish batch %s", batch.pk)
            break
    Batch.objects.filter(pk=batch.pk).update(dispatch_count=F("dispatch_count") + sent, dispatched_at=timezone.now())
    return sent


# -- worker side ---------------------------------------------------------------------------------

class ClaimedLine(NamedTuple):
    """A line a worker claimed: what the engine needs of it (see lines_claim)."""

    pk: uuid.UUID
    line: int
    payload: dict


def lines_claim(*, batch_id, claim: str, limit: int) -> list[ClaimedLine]:
    """Take up to `limit` pending lines of an in-progress batch for this claim (a worker's name and a
    token of its own), in line order; other workers skip the locked rows and take the next ones.

    One statement, read as tuples: a worker claims while the engine decodes the previous chunks,
    and on a machine whose cores the engine's threads fill, every millisecond of Python here is one
    they lose (the ORM's lock, update and 128 model instances cost ~3 ms a chunk; this ~1 ms)."""
    lines, batches = (connection.ops.quote_name(model._meta.db_table) for model in (BatchRequest, Batch))
    with connection.cursor() as cursor:
        cursor.execute(
            f"WITH picked AS MATERIALIZED ("
            f" SELECT id FROM {lines} WHERE batch_id = %s AND status = %s"
            f" AND EXISTS (SELECT 1 FROM {batches} WHERE id = %s AND status = %s)"
            f" ORDER BY line LIMIT %s FOR UPDATE SKIP LOCKED)"
            f" UPDATE {lines} AS r SET status = %s, worker_name = %s, claimed_at = %s FROM picked"
            f" WHERE r.id = picked.id RETURNING r.id, r.line, r.payload",
            [batch_id, BatchRequest.Status.PENDING, batch_id, Batch.Status.IN_PROGRESS, limit,
             BatchRequest.Status.RUNNING, claim, timezone.now()])
        rows = cursor.fetchall()
    # Django reads jsonb as text and leaves decoding to the field (JSONField.from_db_value).
    return sorted((ClaimedLine(pk, line, json.loads(payload) if isinstance(payload, str) else payload)
                   for pk, line, payload in rows), key=lambda claimed: claimed.line)


@transaction.atomic
def lines_record(*, batch_id, claim: str, results: dict) -> int:
    """Store a chunk's results ({line pk: dict(text, finish_reason, prompt_tokens, completion_tokens) or
    dict(error=...)}) for lines this claim still holds, with the batch's counters and one usage record.

    Lines taken back meanwhile (the claim was thought dead) are not this claim's any more and are
    skipped, so no line is counted twice. Returns how many lines were recorded.
    """
    from citadel.usage.services import usage_record

    # The batch is locked first, as everything else that changes both a batch and its lines does.
    batch = Batch.objects.select_for_update(of=("self",)).values(
        "id", "api_key_id", "team_id", "user_id", "model__name").get(pk=batch_id)
    if not results:
        return 0
    rows = []
    for pk, result in results.items():
        if "error" in result:
            rows.append((pk, BatchRequest.Status.FAILED, result["error"], "", "", 0, 0))
        else:
            rows.append((pk, BatchRequest.Status.SUCCEEDED, None, result["text"].replace("\x00", "\ufffd"),
                         result["finish_reason"], result["prompt_tokens"], result["completion_tokens"]))
    recorded = _lines_update(rows, batch_id=batch["id"], claim=claim, finished_at=timezone.now())
    if not recorded:
        return 0
    succeeded = [row for row in recorded if row.status == BatchRequest.Status.SUCCEEDED]
    done, prompt, completion = (len(succeeded), sum(row.prompt_tokens for row in succeeded),
                                sum(row.completion_tokens for row in succeeded))
    Batch.objects.filter(pk=batch_id).update(completed=F("completed") + done,
                                             failed=F("failed") + len(recorded) - done,
                                             prompt_tokens=F("prompt_tokens") + prompt,
                                             completion_tokens=F("completion_tokens") + completion)
    lines = sorted(row.line for row in recorded)
    if done:
        usage_record(kind="batch", source=f"batch:{batch['id'].hex}:{lines[0]}-{lines[-1]}:{uuid.uuid4().hex[:8]}",
                     api_key_id=batch["api_key_id"], team_id=batch["team_id"], user_id=batch["user_id"],
                     model_name=batch["model__name"], requests=done, prompt_tokens=prompt, completion_tokens=completion)
    return len(recorded)


class _Recorded(NamedTuple):
    line: int
    status: str
    prompt_tokens: int
    completion_tokens: int


def _lines_update(rows: list[tuple], *, batch_id, claim: str, finished_at) -> list[_Recorded]:
    """A chunk's results (pk, status, error, text, finish_reason, prompt_tokens, completion_tokens) in one
    UPDATE of the lines this claim still runs, their values sent as one array per column; the lines it
    changed come back. It runs on the worker while the engine decodes: bulk_update's CASE per field and
    line cost ~1 ms of Python a line, an UPDATE per line (executemany) ~40 us; arrays go in one go."""
    table = connection.ops.quote_name(BatchRequest._meta.db_table)
    key, status, error, text, reason, prompt, completion = (list(column) for column in zip(*rows, strict=True))
    error = [None if value is None else json.dumps(value) for value in error]
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {table} AS r SET status = v.status, error = v.error::jsonb, text = v.text,"
            " finish_reason = v.finish_reason, prompt_tokens = v.prompt_tokens,"
            " completion_tokens = v.completion_tokens, finished_at = %s"
            " FROM unnest(%s::uuid[], %s::text[], %s::text[], %s::text[], %s::text[], %s::int[], %s::int[])"
            " AS v(id, status, error, text, finish_reason, prompt_tokens, completion_tokens)"
            " WHERE r.id = v.id AND r.batch_id = %s AND r.status = %s AND r.worker_name = %s"
            " RETURNING r.line, r.status, r.prompt_tokens, r.completion_tokens",
            [finished_at, key, status, error, text, reason, prompt, completion, batch_id, BatchRequest.Status.RUNNING,
             claim])
        return [_Recorded(*row) for row in cursor.fetchall()]


def lines_release(*, batch_id, claim: str) -> int:
    """Give a claim's unfinished lines back (a worker stopping, or the engine failing as a whole)."""
    return BatchRequest.objects.filter(batch_id=batch_id, status=BatchRequest.Status.RUNNING,
                                       worker_name=claim).update(status=BatchRequest.Status.PENDING, worker_name="",
                                                                 claimed_at=None)


def batch_finish_if_done(*, batch_id, actor: Actor) -> Batch | None:
    """Finalize an in-progress batch with no line left, or a cancelling one with none running: write the
    output and error files (line order) and end it completed or cancelled. Whoever locks it first does it."""
    with transaction.atomic():
        batch = Batch.objects.select_for_update().filter(pk=batch_id).first()
        if batch is None or batch.status not in (Batch.Status.IN_PROGRESS, Batch.Status.CANCELLING):
            return None
        waiting = (BatchRequest.Status.RUNNING,) if batch.status == Batch.Status.CANCELLING \
            else (BatchRequest.Status.PENDING, BatchRequest.Status.RUNNING)
        if batch.requests.filter(status__in=waiting).exists():
            return None
        ending = Batch.Status.CANCELLED if batch.status == Batch.Status.CANCELLING else Batch.Status.COMPLETED
        _transition(batch, Batch.Status.FINALIZING, actor=actor)
    return _finalize(batch, ending=ending, actor=actor)


@transaction.atomic
def _finalize(batch: Batch, *, ending: str, actor: Actor, note: str = "") -> Batch:
    batch = Batch.objects.select_for_update(of=("self",)).select_related("input_file__site", "model").get(pk=batch.pk)
    if batch.is_terminal:
        return batch
    from citadel.batches.output import EndedLine, line_output

    out, err = io.BytesIO(), io.BytesIO()
    ended = batch.requests.exclude(status__in=(BatchRequest.Status.PENDING, BatchRequest.Status.RUNNING))
    for row in ended.order_by("line").values_list(*EndedLine._fields).iterator(chunk_size=2000):
        line = EndedLine(*row)
        target = out if line.status == BatchRequest.Status.SUCCEEDED else err
        target.write(json.dumps(line_output(batch, line), separators=(",", ":")).encode() + b"\n")
    if out.tell():
        batch.output_file = _output_file(batch, out.getvalue(), "output")
    if err.tell():
        batch.error_file = _output_file(batch, err.getvalue(), "error")
    batch.save(update_fields=["output_file", "error_file"])
    _transition(batch, ending, actor=actor, details={"output_file": batch.output_file.openai_id
                                                     if batch.output_file else None,
                                                     "error_file": batch.error_file.openai_id
                                                     if batch.error_file else None,
                                                     "prompt_tokens": batch.prompt_tokens,
                                                     "completion_tokens": batch.completion_tokens,
                                                     **({"note": note} if note else {})})
    return batch


def _output_file(batch: Batch, content: bytes, which: str) -> File:
    """A batch_output file next to the input (same site, owner and data class), as /v1/files serves it."""
    import hashlib

    source = batch.input_file
    folder = training.storage_dir(source.site) / "files"
    folder.mkdir(parents=True, exist_ok=True)
    file_id = uuid.uuid4()
    path = folder / f"file-{file_id.hex}.jsonl"
    path.write_bytes(content)
    return File.objects.create(id=file_id, purpose=File.Purpose.BATCH_OUTPUT, filename=f"{batch.openai_id}_{which}.jsonl",
                               bytes=len(content), sha256=hashlib.sha256(content).hexdigest(), site=source.site,
                               path=str(path), data_class=batch.data_class, team=batch.team, user=batch.user,
                               api_key=batch.api_key)


# -- cancel, expiry, recovery ----------------------------------------------------------------------

def batch_cancel(*, batch: Batch, actor: Actor, request=None) -> Batch:
    """Stop a batch: no new chunk is started; lines already handed to the engine finish and are kept.
    Ends `cancelled` (with the output of what finished) as soon as nothing runs; a finished batch
    cannot be cancelled."""
    with transaction.atomic():
        batch = Batch.objects.select_for_update().get(pk=batch.pk)
        if batch.status in (Batch.Status.CANCELLING, Batch.Status.CANCELLED):
            return batch
        if batch.status not in (Batch.Status.VALIDATING, Batch.Status.IN_PROGRESS):
            raise InvalidRequest(f"Batch {batch.openai_id} is {batch.status} and cannot be cancelled.",
                                 code="batch_not_cancellable")
        _transition(batch, Batch.Status.CANCELLING, actor=actor, request=request)
    return batch_finish_if_done(batch_id=batch.pk, actor=actor) or Batch.objects.get(pk=batch.pk)


def batches_recover(*, lease: timedelta | None = None, resend_after: timedelta | None = None) -> dict:
    """Beat: lines held by a worker that is gone (or past the lease) back to pending; batches with
    pending lines and no recent dispatch sent again; expired windows ended; finished ones finalized."""
    lease = timedelta(seconds=900) if lease is None else lease
    resend_after = timedelta(seconds=60) if resend_after is None else resend_after
    now = timezone.now()
    actor = Actor.system("batches")
    live = {name for name in workers_live().values_list("name", flat=True)}
    released = resent = expired = finished = 0
    active = Batch.objects.filter(status__in=(Batch.Status.IN_PROGRESS, Batch.Status.CANCELLING))
    running = BatchRequest.objects.filter(batch__in=active, status=BatchRequest.Status.RUNNING)
    for pk, claim, claimed_at in running.values_list("pk", "worker_name", "claimed_at"):
        if claim.split("#", 1)[0] not in live or (claimed_at and claimed_at < now - lease):
            released += BatchRequest.objects.filter(pk=pk, status=BatchRequest.Status.RUNNING, worker_name=claim) \
                .update(status=BatchRequest.Status.PENDING, worker_name="", claimed_at=None)
    for batch in active:
        if batch.status == Batch.Status.IN_PROGRESS and batch.expires_at and batch.expires_at < now:
            batch_expire(batch_id=batch.pk, actor=actor)
            expired += 1
            continue
        if batch_finish_if_done(batch_id=batch.pk, actor=actor):
            finished += 1
            continue
        pending = batch.requests.filter(status=BatchRequest.Status.PENDING).exists()
        if batch.status == Batch.Status.IN_PROGRESS and pending and not batch.requests.filter(
                status=BatchRequest.Status.RUNNING).exists() \
                and (batch.dispatched_at is None or batch.dispatched_at < now - resend_after):
            resent += batch_publish(batch_id=batch.pk) > 0
    return {"released": released, "resent": resent, "expired": expired, "finished": finished}


def batch_expire(*, batch_id, actor: Actor) -> Batch:
    """The 24 h window is over: pending lines fail as expired (in the error file); finished ones are kept."""
    with transaction.atomic():
        batch = Batch.objects.select_for_update().get(pk=batch_id)
        expired = batch.requests.filter(status__in=(BatchRequest.Status.PENDING, BatchRequest.Status.RUNNING))
        count = expired.update(status=BatchRequest.Status.FAILED, finished_at=timezone.now(), worker_name="",
                               error={"code": "batch_expired", "message": "The batch's completion window ended "
                                      "before this request ran.", "param": None, "line": None})
        Batch.objects.filter(pk=batch.pk).update(failed=F("failed") + count)
        batch.refresh_from_db()
    return _finalize(batch, ending=Batch.Status.EXPIRED, actor=actor, note=f"{count} requests expired")


def batch_counts(batch: Batch) -> dict:
    """Counts straight from the lines (for checks and the console; the API reads the batch's counters)."""
    row = batch.requests.aggregate(total=Count("pk"), completed=Count("pk", filter=Q(status="succeeded")),
                                   failed=Count("pk", filter=Q(status="failed")),
                                   prompt=Sum("prompt_tokens"), completion=Sum("completion_tokens"))
    return row
