"""Writing the audit log: chained appends, signed checkpoints, retention purges and legal holds.

Callers pass who, what and how it went; the request adds where from. Each append takes the
chain lock inside its transaction (PostgreSQL: a transaction-level advisory lock; SQLite: the
database's write lock), reads the head, numbers and hashes the record and inserts it, so the
chain never forks across threads and processes and sequence numbers have no gaps. The lock is
held until the caller's transaction ends; callers audit as their last write. On PostgreSQL one
server-side function does it all (migration 0005). When other appends hold or wait for the
lock, that transaction commits without waiting for its WAL flush and the caller continues only
once a synchronous commit right after it has flushed the WAL past it (_wait_until_durable): as
durable as an ordinary commit, but concurrent appends share fsyncs instead of queueing behind
each one under the lock (bench/audit.py measures it).

If the record cannot be written, audit_record raises AuditUnavailable (HTTP 503) and the
transaction of the action it describes rolls back with it (fail closed, DESIGN.md).
"""

import ipaddress
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import DatabaseError, connections, router, transaction
from django.db.models import Q
from django.utils import timezone
from django.utils.ipv6 import clean_ipv6_address

from citadel.audit import chain
from citadel.audit.models import AuditCheckpoint, AuditPurge, AuditRecord, LegalHold
from citadel.core.exceptions import AuditUnavailable, Conflict, InvalidRequest, NotFound
from citadel.core.net import client_address

logger = logging.getLogger(__name__)

# pg_advisory_xact_lock key of the chain: the ASCII of "citadel" as a number.
CHAIN_LOCK_KEY = int.from_bytes(b"citadel", "big")
# The PostgreSQL setting (transaction-local) under which the guard trigger lets a purge delete
# records below its value; see migration 0004 and audit_purge.
PURGE_SETTING = "citadel.audit_purge"

_TEXT_LIMITS = {name: AuditRecord._meta.get_field(name).max_length for name in (
    "actor_type", "actor_id", "actor_label", "action", "target_type", "target_id", "outcome", "request_id")}


@dataclass(frozen=True)
class Actor:
    """Who acted: a user, an API key (with its owner) or the system itself."""

    type: str
    id: str = ""
    label: str = ""

    @classmethod
    def system(cls, label: str = "citadel") -> "Actor":
        return cls(AuditRecord.ActorType.SYSTEM, "", label)

    @classmethod
    def for_user(cls, user) -> "Actor":
        if user is None or not user.is_authenticated:
            return cls(AuditRecord.ActorType.ANONYMOUS)
        return cls(AuditRecord.ActorType.USER, str(user.pk), user.get_username())

    @classmethod
    def for_api_key(cls, api_key) -> "Actor":
        return cls(AuditRecord.ActorType.API_KEY, str(api_key.pk), f"{api_key.prefix} ({api_key.user.get_username()})")

    @classmethod
    def for_request(cls, request) -> "Actor":
        api_key = getattr(request, "auth", None)
        if api_key is not None and hasattr(api_key, "prefix"):
            return cls.for_api_key(api_key)
        return cls.for_user(getattr(request, "user", None))


def _db_alias() -> str:
    return router.db_for_write(AuditRecord)


def chain_lock(cursor, vendor: str) -> None:
    """Serialise chain writers until this transaction ends. Must run inside a transaction."""
    if vendor == "postgresql":
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", [CHAIN_LOCK_KEY])
    else:
        # SQLite has one writer at a time: a write as the transaction's first statement takes the
        # write lock now (like BEGIN IMMEDIATE), so the head read next cannot go stale.
        cursor.execute(f"UPDATE {AuditRecord._meta.db_table} SET sequence = sequence WHERE 1 = 0")


def _chain_head(cursor) -> tuple[int, str]:
    """(sequence, record_hash) of the newest record, or where the chain continues after a purge."""
    cursor.execute(f"SELECT sequence, record_hash FROM {AuditRecord._meta.db_table} ORDER BY sequence DESC LIMIT 1")
    head = cursor.fetchone()
    if head is not None:
        return int(head[0]), head[1]
    purge = AuditPurge.objects.order_by("-boundary_sequence", "-id").first()
    if purge is not None:
        return purge.boundary_sequence - 1, purge.boundary_prev_hash
    return 0, chain.GENESIS_HASH


def _ip(value) -> str | None:
    """An IP address as text (no zone index), or None when `value` is empty or not an address."""
    if not value:
        return None
    try:
        address = ipaddress.ip_address(str(value).strip().split("%")[0])
    except ValueError:
        return None
    return str(address)


def _text(name: str, value) -> str:
    return chain.clean_text(str(value or ""))[:_TEXT_LIMITS[name]]


# The values that only the database knows under the chain lock, in the order of their keys in the
# canonical JSON; migration 0005's citadel_audit_append fills them in between the pieces.
_SLOTS = ("created_at", "prev_hash", "sequence", "source_address")
_TEXT_COLUMNS = ("actor_type", "actor_id", "actor_label", "action", "target_type", "target_id", "outcome",
                 "request_id")
_APPEND_SQL = (f"SELECT * FROM citadel_audit_append({', '.join(['%s'] * len(_TEXT_COLUMNS))}, "
               "%s::inet, %s::jsonb, %s::text[], %s)")


def _append_postgresql(cursor, record: AuditRecord, source_address, write: tuple[str, list] | None = None) -> bool:
    """One statement takes the chain lock, reads the head, numbers, hashes and inserts (migration 0005).
    True when the transaction will commit synchronously; False when the caller must wait for the
    WAL flush after the commit (_wait_until_durable). With `write` (a statement and its parameters),
    that statement goes first in the same message (audit_record_with_write)."""
    address = _ip(source_address)
    pieces = chain.canonical_parts(record.__dict__, _SLOTS)
    params = [*[getattr(record, c) for c in _TEXT_COLUMNS], address,
              chain.canonical_json(record.details).decode("utf-8"), pieces, chain.GENESIS_HASH]
    if write is None:
        cursor.execute(_APPEND_SQL, params)
    else:
        cursor.execute(f"{write[0]}; {_APPEND_SQL}", [*write[1], *params])
        cursor.nextset()  # past the write's own result, to the record's row
    (record.sequence, record.created_at, record.source_address, record.prev_hash, record.record_hash,
     durable) = cursor.fetchone()
    record._state.adding, record._state.db = False, _db_alias()
    return durable


def _wait_until_durable(alias: str) -> None:
    """Return once the just-committed transaction is on disk: a synchronous commit of a tiny WAL
    record flushes the WAL up to it, and so past the earlier commit (WAL is flushed in order)."""
    try:
        with connections[alias].cursor() as cursor:
            cursor.execute("SELECT pg_logical_emit_message(true, 'citadel.audit', '')")
    except DatabaseError as error:
        logger.error("could not confirm that an audit record reached the disk: %s", error)
        raise AuditUnavailable("The audit log could not confirm that this action was recorded durably. "
                               "Check whether it took effect before retrying.") from error


def _new_record(*, actor: Actor, action: str, outcome: str, target_type: str, target_id: str, request,
                request_id: str, source_address: str | None, details: dict | None) -> tuple[AuditRecord, str | None]:
    if request is not None:
        request_id = request_id or getattr(request, "request_id", "")
        source_address = source_address or client_address(request)
    record = AuditRecord(
        actor_type=_text("actor_type", actor.type), actor_id=_text("actor_id", actor.id),
        actor_label=_text("actor_label", actor.label), action=_text("action", action),
        outcome=_text("outcome", outcome), target_type=_text("target_type", target_type),
        target_id=_text("target_id", target_id), request_id=_text("request_id", request_id),
        details=chain.clean_details(details or {}),
    )
    return record, source_address


def audit_record_with_write_possible(alias: str | None = None) -> bool:
    """Whether audit_record_with_write can run on this connection now (PostgreSQL, not in a transaction)."""
    connection = connections[alias or _db_alias()]
    return connection.vendor == "postgresql" and connection.get_autocommit() and not connection.in_atomic_block


def audit_record_with_write(*, write: tuple[str, list], actor: Actor, action: str, outcome: str,
                            target_type: str = "", target_id: str = "", request=None, details: dict | None = None
                            ) -> AuditRecord:
    """Run `write` (one SQL statement and its parameters) and append the record that describes it, as
    one implicit transaction sent in one message: both commit or neither does (fail closed, as
    audit_record inside the caller's transaction). Only where audit_record_with_write_possible().

    Why: inside a transaction the chain lock, taken by the append, is held until the client's COMMIT
    comes back over the wire, and a web thread of a busy process may first wait for the GIL behind
    dozens of others; every other append in every process queues behind it (seen as most database
    sessions waiting on the advisory lock under load). Here the server runs the write, the append
    and the commit without waiting for the client, so the lock is held for the server's own time.
    Durability as audit_record: a synchronous commit, or the flush waited for after it.
    """
    record, source_address = _new_record(actor=actor, action=action, outcome=outcome, target_type=target_type,
                                         target_id=target_id, request=request, request_id="",
                                         source_address=None, details=details)
    alias = _db_alias()
    try:
        with connections[alias].cursor() as cursor:
            durable = _append_postgresql(cursor, record, source_address, write=write)
        if not durable:
            _wait_until_durable(alias)
    except DatabaseError as error:
        logger.error("audit record %s could not be written: %s", action, error)
        raise AuditUnavailable("The audit log cannot be written, so this action was refused. "
                               "Try again later; operators: check the database.") from error
    return record


def audit_record(
    *,
    actor: Actor,
    action: str,
    outcome: str,
    target_type: str = "",
    target_id: str = "",
    request=None,
    request_id: str = "",
    source_address: str | None = None,
    details: dict | None = None,
    savepoint: bool = True,
) -> AuditRecord:
    """Append one record to the chain; raises AuditUnavailable when it cannot be written.

    Inside a transaction the append runs in a savepoint of its own, so a caller that catches the
    error can go on in its transaction; `savepoint=False` (a caller that lets the error roll its whole
    transaction back) saves the two round trips, one of them while the chain lock is held."""
    record, source_address = _new_record(actor=actor, action=action, outcome=outcome, target_type=target_type,
                                         target_id=target_id, request=request, request_id=request_id,
                                         source_address=source_address, details=details)
    alias = _db_alias()
    connection = connections[alias]
    try:
        if connection.vendor == "postgresql" and connection.get_autocommit() and not connection.in_atomic_block:
            # Autocommit: the one statement is its own transaction, so the lock is held only while
            # the server runs it; then wait for the WAL flush, outside the lock.
            with connection.cursor() as cursor:
                durable = _append_postgresql(cursor, record, source_address)
            if not durable:
                _wait_until_durable(alias)
            return record
        with transaction.atomic(using=alias, savepoint=savepoint), connection.cursor() as cursor:
            if connection.vendor == "postgresql":
                if not _append_postgresql(cursor, record, source_address):
                    transaction.on_commit(lambda: _wait_until_durable(alias), using=alias)
            else:
                chain_lock(cursor, connection.vendor)
                head_sequence, head_hash = _chain_head(cursor)
                address = _ip(source_address)  # as SQLite will give it back (Django's IPv6 form)
                record.source_address = clean_ipv6_address(address) if address and ":" in address else address
                record.sequence, record.prev_hash = head_sequence + 1, head_hash
                record.created_at = timezone.now()
                record.record_hash = chain.record_hash(record.__dict__)
                record.save(force_insert=True, using=alias)
    except DatabaseError as error:
        logger.error("audit record %s could not be written: %s", action, error)
        raise AuditUnavailable("The audit log cannot be written, so this action was refused. "
                               "Try again later; operators: check the database.") from error
    return record


def checkpoint_payload(*, sequence: int, record_hash: str, created_at: datetime | str) -> dict:
    """What a checkpoint's signature covers (canonical JSON of this object)."""
    if isinstance(created_at, datetime):
        created_at = chain.format_time(created_at)
    return {"type": chain.CHECKPOINT_TYPE, "sequence": int(sequence), "record_hash": record_hash,
            "created_at": created_at}


def checkpoint_create(*, force: bool = False) -> AuditCheckpoint | None:
    """Sign the chain's head; None when the log is empty or the head is already signed (unless force)."""
    from citadel.audit.signing import sign

    head = AuditRecord.objects.order_by("-sequence").values("sequence", "record_hash").first()
    if head is None:
        return None
    last = AuditCheckpoint.objects.order_by("-sequence", "-id").first()
    if last is not None and last.sequence == head["sequence"] and not force:
        return None
    created_at = timezone.now()
    key_id, public_key, signature = sign(checkpoint_payload(created_at=created_at, **head))
    return AuditCheckpoint.objects.create(created_at=created_at, key_id=key_id, public_key=public_key,
                                          signature=signature, **head)


def purge_payload(purge: AuditPurge) -> dict:
    """What a purge manifest's signature covers."""
    return {
        "type": chain.PURGE_TYPE, "created_at": chain.format_time(purge.created_at),
        "cutoff": chain.format_time(purge.cutoff), "boundary_sequence": int(purge.boundary_sequence),
        "boundary_prev_hash": purge.boundary_prev_hash, "deleted_count": int(purge.deleted_count),
        "retained": [[int(sequence), record_hash] for sequence, record_hash in purge.retained],
    }


def _held() -> Q | None:
    """Records matched by an active legal hold, as one filter; None when nothing is held."""
    matches = None
    for hold in LegalHold.objects.filter(released_at__isnull=True):
        criteria = Q(sequence__isnull=False)  # a hold with no criteria holds everything
        for name in ("actor_id", "target_type", "target_id", "request_id"):
            if getattr(hold, name):
                criteria &= Q(**{name: getattr(hold, name)})
        if hold.since:
            criteria &= Q(created_at__gte=hold.since)
        if hold.until:
            criteria &= Q(created_at__lt=hold.until)
        matches = criteria if matches is None else matches | criteria
    return matches


def _previous_boundary_hash(boundary: int) -> str:
    """prev_hash at `boundary` when its predecessor is already gone: an earlier purge at the same boundary."""
    previous = AuditPurge.objects.filter(boundary_sequence=boundary).order_by("-id").first()
    assert previous is not None, "the chain verified, so the record before the boundary exists or was purged"
    return previous.boundary_prev_hash


def _with_data_class(records):
    """`records` annotated with `record_class`: the data class their details name ("" when none).

    It is in `data_class`, or in `residency.data_class` for the records of residency decisions. A
    missing key must read as "" rather than NULL, or SQL's three-valued logic would make a negated
    filter keep records it should delete.
    """
    from django.db.models import TextField, Value
    from django.db.models.fields.json import KeyTextTransform, KeyTransform
    from django.db.models.functions import Coalesce

    return records.annotate(record_class=Coalesce(
        KeyTextTransform("data_class", "details"),
        KeyTextTransform("data_class", KeyTransform("residency", "details")),
        Value(""), output_field=TextField()))


def retention_rules(default_days: int | None) -> tuple[int | None, dict[str, int]]:
    """(default days, {data class: days}) from the argument and each data class's audit_retention_days.

    None or 0 means "keep forever". A class without its own setting follows the default.
    """
    from citadel.residency.models import DataClass

    classes = dict(DataClass.objects.filter(audit_retention_days__isnull=False)
                   .values_list("name", "audit_retention_days"))
    return (default_days or None), classes


def _kept_by_retention(now: datetime, default_days: int | None, classes: dict[str, int]) -> Q:
    """Records (annotated by _with_data_class) whose retention has not run out at `now`."""
    kept = []
    for name, days in classes.items():
        of_class = Q(record_class=name)
        kept.append(of_class if days == 0 else of_class & Q(created_at__gte=now - timedelta(days=days)))
    unclassified = ~Q(record_class__in=list(classes))
    kept.append(unclassified if default_days is None
                else unclassified & Q(created_at__gte=now - timedelta(days=default_days)))
    result = kept[0]
    for q in kept[1:]:
        result |= q
    return result


def audit_purge(*, older_than_days: int | None, actor: Actor, now: datetime | None = None) -> AuditPurge | None:
    """Delete the records whose retention has run out and that no legal hold covers; None when none qualify.

    Retention is `older_than_days` (None or 0: keep forever) for records of no data class or of a
    class without its own setting, and each data class's `audit_retention_days` (0: forever) for
    the records about that class (details.data_class or details.residency.data_class). The purge
    boundary is the first record younger than the shortest retention; below it, held records and
    records whose class keeps them longer stay and are listed in the signed manifest.

    The chain must verify first (a purge must not launder tampering). The purge then signs a
    manifest of where the kept chain starts (the boundary and its prev_hash) and which records
    remain below it, audits itself and deletes the rest through the guard trigger's purge switch,
    all in one transaction. Verification afterwards starts at the boundary (verification.py).
    """
    from citadel.audit.signing import sign
    from citadel.audit.verification import chain_verify

    if older_than_days is not None and older_than_days < 0:
        raise InvalidRequest("older_than_days must be 0 (keep forever) or more.", param="older_than_days")
    now = now or timezone.now()
    default_days, classes = retention_rules(older_than_days)
    finite = [days for days in (default_days, *classes.values()) if days]
    if not finite:
        return None  # everything is kept forever
    cutoff = now - timedelta(days=min(finite))
    alias = _db_alias()
    connection = connections[alias]
    with transaction.atomic(using=alias):
        with connection.cursor() as cursor:
            chain_lock(cursor, connection.vendor)
            head_sequence, _ = _chain_head(cursor)
        verified = chain_verify()
        if not verified.ok:
            raise Conflict(f"The audit chain does not verify ({verified.summary()}); nothing was purged. "
                           "Investigate with `citadel audit verify`.")
        first_kept = (AuditRecord.objects.filter(created_at__gte=cutoff).order_by("sequence")
                      .values_list("sequence", flat=True).first())
        boundary = first_kept if first_kept is not None else head_sequence + 1
        below = _with_data_class(AuditRecord.objects.filter(sequence__lt=boundary))
        held, by_retention = _held(), _kept_by_retention(now, default_days, classes)
        kept = by_retention if held is None else held | by_retention
        doomed = below.exclude(kept)
        if boundary <= 1 or not doomed.exists():
            return None
        retained = list(below.filter(kept).order_by("sequence").values_list("sequence", "record_hash"))
        held_count = below.filter(held).count() if held is not None else 0
        boundary_prev_hash = AuditRecord.objects.filter(sequence=boundary - 1).values_list("record_hash", flat=True)
        boundary_prev_hash = boundary_prev_hash.first() or _previous_boundary_hash(boundary)
        doomed_count = doomed.count()
        # Audited first, so the chain goes on at or after the boundary even when every older record goes.
        audit_record(actor=actor, action="audit.purge", outcome="success", target_type="audit_log",
                     details={"cutoff": chain.format_time(cutoff), "older_than_days": default_days or 0,
                              "class_retention_days": classes, "boundary_sequence": boundary,
                              "deleted": doomed_count, "retained": len(retained), "held": held_count})
        with connection.cursor() as cursor:
            if connection.vendor == "postgresql":
                cursor.execute("SELECT set_config(%s, %s, true)", [PURGE_SETTING, str(boundary)])
            deleted, _ = doomed.delete()
            if connection.vendor == "postgresql":
                cursor.execute("SELECT set_config(%s, '', true)", [PURGE_SETTING])
        assert deleted == doomed_count, "the chain lock keeps the purged range still"
        purge = AuditPurge(cutoff=cutoff, boundary_sequence=boundary, boundary_prev_hash=boundary_prev_hash,
                           deleted_count=deleted, retained=[[s, h] for s, h in retained])
        purge.key_id, purge.public_key, purge.signature = sign(purge_payload(purge))
        purge.save()
    return purge


def legal_hold_create(*, reason: str, actor: Actor, actor_id: str = "", target_type: str = "",
                      target_id: str = "", request_id: str = "", since: datetime | None = None,
                      until: datetime | None = None) -> LegalHold:
    reason = (reason or "").strip()
    if not reason:
        raise InvalidRequest("A legal hold needs a reason (e.g. the matter or case number).", param="reason")
    with transaction.atomic():
        hold = LegalHold.objects.create(reason=reason, created_by=actor.label or actor.id, actor_id=actor_id,
                                        target_type=target_type, target_id=target_id, request_id=request_id,
                                        since=since, until=until)
        audit_record(actor=actor, action="audit.legal_hold.create", outcome="success", target_type="legal_hold",
                     target_id=str(hold.pk),
                     details={"reason": reason, "actor_id": actor_id, "target_type": target_type,
                              "target_id": target_id, "request_id": request_id,
                              "since": since and chain.format_time(since), "until": until and chain.format_time(until)})
    return hold


def legal_hold_release(*, hold_id: int, actor: Actor) -> LegalHold:
    with transaction.atomic():
        hold = LegalHold.objects.select_for_update().filter(pk=hold_id).first()
        if hold is None:
            raise NotFound(f"No legal hold with id {hold_id}.")
        if hold.released_at is not None:
            raise Conflict(f"Legal hold {hold_id} was already released.")
        hold.released_at, hold.released_by = timezone.now(), actor.label or actor.id
        hold.save(update_fields=["released_at", "released_by"])
        audit_record(actor=actor, action="audit.legal_hold.release", outcome="success", target_type="legal_hold",
                     target_id=str(hold.pk), details={"reason": hold.reason})
    return hold
