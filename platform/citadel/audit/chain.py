"""The audit chain's canonical encoding: what exactly is hashed and signed (VERIFYING.md).

Pure Python on purpose (no Django), so the migration that chains old rows, the verifier and
an outside auditor's script all compute the same bytes:

- a record is the JSON object of FIELDS, with `created_at` as ISO-8601 UTC with microseconds
  (`2026-11-29T00:22:14.123456Z`) and `source_address` a string or null;
- JSON with sorted keys, separators `,` and `:`, no ASCII escaping, NaN refused, UTF-8;
- record_hash = SHA-256 hex of those bytes; prev_hash is the previous record's record_hash,
  GENESIS_HASH (64 zeros) for sequence 1.

Checkpoints and purge manifests are signed over the same JSON encoding of their payloads.
"""

import hashlib
import json
import math
from datetime import UTC, datetime

GENESIS_HASH = "0" * 64

# Every column that the hash covers; record_hash itself is the only one left out.
FIELDS = (
    "sequence", "created_at", "actor_type", "actor_id", "actor_label", "action", "target_type",
    "target_id", "outcome", "request_id", "source_address", "details", "prev_hash",
)

CHECKPOINT_TYPE = "citadel.audit.checkpoint.v1"
PURGE_TYPE = "citadel.audit.purge.v1"


def canonical_json(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def format_time(moment: datetime) -> str:
    """ISO-8601 in UTC with microseconds and a Z, the one way times are written in the chain."""
    assert moment.tzinfo is not None, "audit times are timezone-aware"
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def record_body(row: dict) -> dict:
    """The hashed object of a record given as a mapping with at least FIELDS (a datetime or a
    string for created_at)."""
    body = {name: row[name] for name in FIELDS}
    if isinstance(body["created_at"], datetime):
        body["created_at"] = format_time(body["created_at"])
    body["sequence"] = int(body["sequence"])
    return body


def record_hash(row: dict) -> str:
    return hashlib.sha256(canonical_json(record_body(row))).hexdigest()


def canonical_parts(row: dict, slots: tuple[str, ...]) -> list[str]:
    """The record's canonical JSON cut around the values of `slots` (top-level fields): text pieces
    such that piece[0] + value(slots[0]) + piece[1] + ... + piece[-1] is canonical_json(record_body).

    Lets the database fill in what only it knows under the chain lock (PostgreSQL append in
    services.py) while hashing exactly what this module defines. Top-level keys are plain ASCII
    names, so writing the object key by key equals json.dumps(sort_keys=True) of the whole.
    """
    pieces, current = [], "{"
    for index, name in enumerate(sorted(FIELDS)):
        current += ("," if index else "") + json.dumps(name) + ":"
        if name in slots:
            pieces.append(current)
            current = ""
        else:
            current += canonical_json(row[name]).decode("utf-8")
    pieces.append(current + "}")
    return pieces


def clean_text(value: str) -> str:
    """Text as PostgreSQL can store it: no NUL characters, no lone surrogates."""
    if "\x00" in value:
        value = value.replace("\x00", "\ufffd")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        value = value.encode("utf-8", "replace").decode("utf-8")
    return value


def clean_details(value):
    """`details` as it will read back from a JSON column, so the hash made now still holds later.

    PostgreSQL's jsonb keeps numbers as exact decimals: a float such as 1e16 comes back as the
    integer 10000000000000000 and -0.0 as 0.0, so those are written that way from the start.
    Values JSON cannot hold become their str(); NaN and infinities become strings too.
    """
    if isinstance(value, dict):
        return {clean_text(str(key)): clean_details(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [clean_details(item) for item in value]
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value == 0:
            return 0.0
        if value.is_integer() and "e" in repr(value):
            return int(value)
        return value
    if isinstance(value, str):
        return clean_text(value)
    return clean_text(str(value))
