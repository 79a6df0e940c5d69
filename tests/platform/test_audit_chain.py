"""The audit log is a hash chain with signed checkpoints: tampering behind the application's back,
as the database superuser, is caught and named by sequence number; a forged signature too.
"""

import base64
import hashlib
import json
from contextlib import contextmanager
from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from django.db import DatabaseError, connection, transaction

from citadel.audit import chain
from citadel.audit.models import AuditCheckpoint, AuditRecord
from citadel.audit.services import Actor, audit_record, checkpoint_create, checkpoint_payload
from citadel.audit.signing import key_id, public_key_b64, sign, signature_valid
from citadel.audit.verification import chain_verify
from tests.conftest import require

pytestmark = pytest.mark.django_db


@pytest.fixture
def postgresql():
    require(connection.vendor == "postgresql", "PostgreSQL on 127.0.0.1:5432")


def append(count: int, **extra) -> list[AuditRecord]:
    return [audit_record(actor=Actor.system("tests"), action="test.event", outcome="success", target_type="thing",
                         target_id=str(i), details={"i": i, **extra}) for i in range(count)]


@contextmanager
def as_superuser_behind_the_applications_back():
    """The database superuser switches the append-only trigger off, edits, and switches it back on."""
    with connection.cursor() as cursor:
        cursor.execute("ALTER TABLE audit_auditrecord DISABLE TRIGGER USER")
        yield cursor
        cursor.execute("ALTER TABLE audit_auditrecord ENABLE TRIGGER USER")


def first_problem():
    result = chain_verify()
    assert not result.ok, result.summary()
    return result.first_problem


def test_records_are_numbered_without_gaps_and_each_links_to_the_one_before():
    records = append(5)
    assert [r.sequence for r in records] == list(range(records[0].sequence, records[0].sequence + 5))
    for before, after in zip(records, records[1:], strict=False):
        assert after.prev_hash == before.record_hash
    stored = AuditRecord.objects.get(sequence=records[2].sequence)
    assert stored.record_hash == chain.record_hash(stored.__dict__) == records[2].record_hash
    assert chain_verify().ok


def test_the_first_record_starts_from_the_genesis_hash():
    assert not AuditRecord.objects.exists()
    assert append(1)[0].prev_hash == chain.GENESIS_HASH
    assert AuditRecord.objects.get().sequence == 1


def test_the_hash_is_sha256_over_the_documented_canonical_json():
    record = append(1, note="café")[0]
    body = {
        "sequence": record.sequence, "created_at": record.created_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "actor_type": "system", "actor_id": "", "actor_label": "tests", "action": "test.event",
        "target_type": "thing", "target_id": "0", "outcome": "success", "request_id": "", "source_address": None,
        "details": {"i": 0, "note": "café"}, "prev_hash": chain.GENESIS_HASH,
    }
    encoded = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    assert record.record_hash == hashlib.sha256(encoded).hexdigest()


@pytest.mark.parametrize("details", [
    {"big": 1e16, "neg_zero": -0.0, "small": 1e-7, "pi": 3.141592653589793, "nan": float("nan")},
    {"text": "nul\x00byte", "nested": [{"b": 1, "a": [1.5, None, True]}], 7: "int key"},
    {"when": datetime(2026, 1, 2, tzinfo=UTC), "huge": 10**30},
])
def test_details_that_a_json_column_would_change_still_verify_after_reading_back(details):
    audit_record(actor=Actor.system(), action="test.odd", outcome="success", details=details,
                 source_address="2001:0db8:0000:0000:0000:0000:0000:0001")
    audit_record(actor=Actor.system(), action="test.odd", outcome="success", source_address="::ffff:10.0.0.1")
    assert chain_verify().ok, chain_verify().summary()


def test_text_with_quotes_backslashes_newlines_and_emoji_hashes_the_same_in_the_database_and_python():
    odd = 'he said "hi" \\ {not json} \n tab\t ü 🎉 \u2028 ,:'
    record = audit_record(actor=Actor("user", odd[:10], odd), action="test.odd", outcome="success",
                          target_type=odd[:60], target_id=odd, request_id=odd, details={odd: [odd]},
                          source_address="fe80::1%eth0")
    stored = AuditRecord.objects.get(sequence=record.sequence)
    assert stored.actor_label == odd and stored.source_address == "fe80::1"
    assert record.record_hash == stored.record_hash == chain.record_hash(stored.__dict__)
    assert chain_verify().ok


def test_over_long_text_is_cut_to_the_column_not_refused():
    record = audit_record(actor=Actor("user", "1" * 100, "x" * 500), action="a" * 100, outcome="success",
                          target_id="t" * 1000)
    assert len(record.target_id) == 200 and len(record.action) == 64
    assert chain_verify().ok


def test_an_edited_row_is_named_by_its_sequence_number(postgresql):
    records = append(10)
    target = records[3].sequence
    with as_superuser_behind_the_applications_back() as cursor:
        cursor.execute("UPDATE audit_auditrecord SET details = %s WHERE sequence = %s",
                       [json.dumps({"i": 99}), target])
    problem = first_problem()
    assert (problem.sequence, problem.reason) == (target, "hash_mismatch")


def test_a_deleted_row_is_named_by_its_sequence_number(postgresql):
    records = append(10)
    target = records[5].sequence
    with as_superuser_behind_the_applications_back() as cursor:
        cursor.execute("DELETE FROM audit_auditrecord WHERE sequence = %s", [target])
    problem = first_problem()
    assert (problem.sequence, problem.reason) == (target, "missing_sequence")


def test_two_swapped_rows_are_caught_at_the_first_of_them(postgresql):
    records = append(10)
    a, b = records[2].sequence, records[7].sequence
    columns = [f.column for f in AuditRecord._meta.fields if f.column != "sequence"]
    with as_superuser_behind_the_applications_back() as cursor:
        cursor.execute(
            f"UPDATE audit_auditrecord AS x SET {', '.join(f'{c} = y.{c}' for c in columns)} "
            "FROM audit_auditrecord AS y WHERE (x.sequence, y.sequence) IN ((%s, %s), (%s, %s))", [a, b, b, a])
    assert AuditRecord.objects.get(sequence=a).target_id == records[7].target_id
    problem = first_problem()
    assert (problem.sequence, problem.reason) == (a, "hash_mismatch")


def test_a_rewritten_row_with_a_recomputed_hash_breaks_the_next_link(postgresql):
    records = append(6)
    target = records[2]
    forged = {name: getattr(AuditRecord.objects.get(sequence=target.sequence), name) for name in chain.FIELDS}
    forged["outcome"] = "denied"
    with as_superuser_behind_the_applications_back() as cursor:
        cursor.execute("UPDATE audit_auditrecord SET outcome = 'denied', record_hash = %s WHERE sequence = %s",
                       [chain.record_hash(forged), target.sequence])
    problem = first_problem()
    assert (problem.sequence, problem.reason) == (target.sequence + 1, "broken_link")


def test_rewriting_the_whole_tail_is_caught_by_the_signed_checkpoint(postgresql):
    records = append(6)
    checkpoint = checkpoint_create()
    assert checkpoint.sequence == records[-1].sequence
    with as_superuser_behind_the_applications_back() as cursor:
        prev = records[1].record_hash
        for record in records[2:]:  # the attacker re-hashes everything after the edit, but has no key
            row = {name: getattr(AuditRecord.objects.get(sequence=record.sequence), name) for name in chain.FIELDS}
            row.update(prev_hash=prev, outcome="denied" if record is records[2] else row["outcome"])
            prev = chain.record_hash(row)
            cursor.execute("UPDATE audit_auditrecord SET outcome = %s, prev_hash = %s, record_hash = %s "
                           "WHERE sequence = %s", [row["outcome"], row["prev_hash"], prev, record.sequence])
    problem = first_problem()
    assert (problem.sequence, problem.reason) == (checkpoint.sequence, "checkpoint_mismatch")


def test_deleting_the_newest_rows_is_caught_by_the_checkpoint_that_signed_them(postgresql):
    records = append(5)
    checkpoint_create()
    with as_superuser_behind_the_applications_back() as cursor:
        cursor.execute("DELETE FROM audit_auditrecord WHERE sequence >= %s", [records[3].sequence])
    problem = first_problem()
    assert (problem.sequence, problem.reason) == (records[3].sequence, "missing_sequence")


def test_a_checkpoint_signs_the_head_with_the_configured_key():
    records = append(3)
    checkpoint = checkpoint_create()
    assert (checkpoint.sequence, checkpoint.record_hash) == (records[-1].sequence, records[-1].record_hash)
    assert checkpoint.public_key == public_key_b64() and checkpoint.key_id == key_id(public_key_b64())
    payload = checkpoint_payload(sequence=checkpoint.sequence, record_hash=checkpoint.record_hash,
                                 created_at=AuditCheckpoint.objects.get().created_at)
    assert signature_valid(checkpoint.public_key, payload, checkpoint.signature)
    assert checkpoint_create() is None  # the head is already signed
    result = chain_verify()
    assert result.ok and result.last_signed_sequence == records[-1].sequence


def test_a_forged_checkpoint_signature_is_detected():
    records = append(4)
    good = checkpoint_create()
    payload = checkpoint_payload(sequence=records[1].sequence, record_hash=records[1].record_hash,
                                 created_at=good.created_at)
    forger = Ed25519PrivateKey.generate()
    AuditCheckpoint.objects.create(sequence=records[1].sequence, record_hash=records[1].record_hash,
                                   created_at=good.created_at, key_id=good.key_id, public_key=good.public_key,
                                   signature=base64.b64encode(forger.sign(chain.canonical_json(payload))).decode())
    problem = first_problem()
    assert (problem.sequence, problem.reason) == (records[1].sequence, "bad_signature")


def test_a_checkpoint_signed_with_someone_elses_key_is_not_trusted():
    records = append(2)
    forger = Ed25519PrivateKey.generate()
    raw = forger.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    public = base64.b64encode(raw).decode()
    created_at = datetime.now(UTC)
    payload = checkpoint_payload(sequence=records[0].sequence, record_hash=records[0].record_hash,
                                 created_at=created_at)
    AuditCheckpoint.objects.create(sequence=records[0].sequence, record_hash=records[0].record_hash,
                                   created_at=created_at, key_id=key_id(public), public_key=public,
                                   signature=base64.b64encode(forger.sign(chain.canonical_json(payload))).decode())
    problem = first_problem()
    assert (problem.sequence, problem.reason) == (records[0].sequence, "untrusted_key")


def test_sign_and_check_round_trip_and_a_changed_payload_fails():
    _, public, signature = sign({"a": 1})
    assert signature_valid(public, {"a": 1}, signature)
    assert not signature_valid(public, {"a": 2}, signature)


def test_update_delete_and_truncate_are_refused_even_for_the_tables_owner(postgresql):
    """As the application's own role (made the owner here), the database refuses changes."""
    records = append(3)
    with connection.cursor() as cursor:
        cursor.execute("CREATE ROLE citadel_audit_probe")  # rolled back with the test's transaction
        cursor.execute("ALTER TABLE audit_auditrecord OWNER TO citadel_audit_probe")
        cursor.execute("SET ROLE citadel_audit_probe")
        try:
            for statement, message in [
                ("UPDATE audit_auditrecord SET outcome = 'denied'", "permission denied"),
                ("DELETE FROM audit_auditrecord", "append-only"),
                ("TRUNCATE audit_auditrecord", "permission denied"),
            ]:
                with pytest.raises(DatabaseError, match=message), transaction.atomic():
                    cursor.execute(statement)
            cursor.execute("INSERT INTO audit_auditrecord (sequence, created_at, actor_type, actor_id, actor_label, "
                           "action, target_type, target_id, outcome, request_id, details, prev_hash, record_hash) "
                           "SELECT 1000000, now(), 'system', '', '', 'probe', '', '', 'success', '', '{}', '', ''")
        finally:
            cursor.execute("RESET ROLE")
    assert AuditRecord.objects.filter(sequence=records[0].sequence, outcome="success").exists()


def test_the_trigger_refuses_update_and_delete_for_the_superuser_too(postgresql):
    record = append(1)[0]
    for change in (lambda: AuditRecord.objects.filter(pk=record.pk).update(outcome="denied"),
                   lambda: AuditRecord.objects.filter(pk=record.pk).delete()):
        with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
            change()
    assert chain_verify().ok
