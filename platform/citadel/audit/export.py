"""Exporting the audit log for outside verifiers: records with their hashes, checkpoints, purge
manifests and the public keys, as JSON Lines or CSV (formats in VERIFYING.md).

An export is itself audited before any row is written, and refused if that record cannot be
written (fail closed).
"""

import csv
import json
from datetime import datetime

from django.db.models import Q
from django.utils import timezone

from citadel.audit import chain
from citadel.audit.models import AuditCheckpoint, AuditPurge, AuditRecord
from citadel.audit.services import Actor, audit_record, purge_payload
from citadel.core.exceptions import InvalidRequest

FORMATS = ("jsonl", "csv")
CSV_COLUMNS = ("kind", *chain.FIELDS, "record_hash", "key_id", "public_key", "signature")


def records_filtered(*, since: datetime | None = None, until: datetime | None = None, actor: str = "",
                     action: str = "", outcome: str = ""):
    """Records by time (since inclusive, until exclusive), actor (id or label), action (a trailing
    `*` matches a prefix) and outcome."""
    records = AuditRecord.objects.order_by("sequence")
    if since:
        records = records.filter(created_at__gte=since)
    if until:
        records = records.filter(created_at__lt=until)
    if actor:
        records = records.filter(Q(actor_id=actor) | Q(actor_label=actor))
    if action:
        records = (records.filter(action__startswith=action[:-1]) if action.endswith("*")
                   else records.filter(action=action))
    if outcome:
        records = records.filter(outcome=outcome)
    return records


def _dumps(value) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, allow_nan=False)


def audit_export(*, out, fmt: str, actor: Actor, since: datetime | None = None, until: datetime | None = None,
                 actor_filter: str = "", action: str = "", outcome: str = "", request=None) -> int:
    """Write the matching records, every checkpoint and purge manifest and the public keys to the
    text stream `out`; returns the number of records written."""
    from citadel.audit.signing import public_key_pem, trusted_public_keys

    if fmt not in FORMATS:
        raise InvalidRequest(f"Unknown export format {fmt!r}; use one of {', '.join(FORMATS)}.", param="format")
    filters = {"since": since and chain.format_time(since), "until": until and chain.format_time(until),
               "actor": actor_filter, "action": action, "outcome": outcome}
    audit_record(actor=actor, action="audit.export", outcome="success", target_type="audit_log", request=request,
                 details={"format": fmt, "filters": {k: v for k, v in filters.items() if v}})
    keys = [{"key_id": key_id, "public_key": key, "pem": public_key_pem(key)}
            for key_id, key in trusted_public_keys().items()]
    records = records_filtered(since=since, until=until, actor=actor_filter, action=action, outcome=outcome)
    rows = records.values_list(*chain.FIELDS, "record_hash").iterator(chunk_size=2000)
    checkpoints = AuditCheckpoint.objects.order_by("sequence", "id")
    purges = AuditPurge.objects.order_by("boundary_sequence", "id")
    count = 0
    if fmt == "jsonl":
        out.write(_dumps({"type": "header", "format": "citadel-audit-export", "version": 1,
                          "exported_at": chain.format_time(timezone.now()), "filters": filters,
                          "fields": list(chain.FIELDS), "genesis_hash": chain.GENESIS_HASH,
                          "public_keys": keys}) + "\n")
        for values in rows:
            body = chain.record_body(dict(zip((*chain.FIELDS, "record_hash"), values, strict=True)))
            out.write(_dumps({"type": "record", **body, "record_hash": values[-1]}) + "\n")
            count += 1
        for checkpoint in checkpoints:
            out.write(_dumps({"type": "checkpoint", "id": checkpoint.pk, "sequence": checkpoint.sequence,
                              "record_hash": checkpoint.record_hash,
                              "created_at": chain.format_time(checkpoint.created_at), "key_id": checkpoint.key_id,
                              "public_key": checkpoint.public_key, "signature": checkpoint.signature}) + "\n")
        for purge in purges:
            out.write(_dumps({**purge_payload(purge), "type": "purge", "id": purge.pk, "key_id": purge.key_id,
                              "public_key": purge.public_key, "signature": purge.signature}) + "\n")
        return count
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    for key in keys:
        writer.writerow(["public_key", *[""] * (len(CSV_COLUMNS) - 4), key["key_id"], key["public_key"], ""])
    for values in rows:
        body = chain.record_body(dict(zip((*chain.FIELDS, "record_hash"), values, strict=True)))
        body["details"] = chain.canonical_json(body["details"]).decode("utf-8")
        body["source_address"] = body["source_address"] or ""
        writer.writerow(["record", *[body[name] for name in chain.FIELDS], values[-1], "", "", ""])
        count += 1
    for checkpoint in checkpoints:
        row = dict.fromkeys(CSV_COLUMNS, "") | {
            "kind": "checkpoint", "sequence": checkpoint.sequence, "record_hash": checkpoint.record_hash,
            "created_at": chain.format_time(checkpoint.created_at), "key_id": checkpoint.key_id,
            "public_key": checkpoint.public_key, "signature": checkpoint.signature}
        writer.writerow(row.values())
    for purge in purges:
        payload = purge_payload(purge)
        row = dict.fromkeys(CSV_COLUMNS, "") | {
            "kind": "purge", "sequence": purge.boundary_sequence, "prev_hash": purge.boundary_prev_hash,
            "created_at": payload["created_at"], "details": chain.canonical_json(payload).decode("utf-8"),
            "key_id": purge.key_id, "public_key": purge.public_key, "signature": purge.signature}
        writer.writerow(row.values())
    return count
