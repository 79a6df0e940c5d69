"""Retention purges with legal holds: audited, signed, and the chain still verifies afterwards."""

from datetime import timedelta

import pytest
from django.db import DatabaseError, connection, transaction

from citadel.audit.models import AuditPurge, AuditRecord
from citadel.audit.services import (
    Actor,
    audit_purge,
    audit_record,
    checkpoint_create,
    legal_hold_create,
    legal_hold_release,
)
from citadel.audit.verification import chain_verify
from citadel.core.exceptions import Conflict
from tests.conftest import require

pytestmark = pytest.mark.django_db

OFFICER = Actor.system("retention-test")


def append(count: int) -> list[AuditRecord]:
    return [audit_record(actor=Actor("user", "7", "alice"), action="test.event", outcome="success",
                         target_type="case", target_id=f"case-{i}", details={"i": i}) for i in range(count)]


def purge_before(record: AuditRecord, days: int = 30):
    """Purge as if `days` after `record` was written: everything older than it goes."""
    return audit_purge(older_than_days=days, actor=OFFICER, now=record.created_at + timedelta(days=days))


def assert_verifies():
    result = chain_verify()
    assert result.ok, result.summary()
    return result


def test_a_purge_deletes_old_records_keeps_held_ones_and_the_chain_still_verifies():
    records = append(10)
    legal_hold_create(reason="matter 42", actor=OFFICER, target_id="case-2")
    checkpoint_create()
    purge = purge_before(records[6])
    assert purge.boundary_sequence == records[6].sequence
    assert purge.boundary_prev_hash == records[5].record_hash
    remaining = set(AuditRecord.objects.values_list("sequence", flat=True))
    assert records[2].sequence in remaining  # held
    assert not remaining & {r.sequence for r in records[:6] if r is not records[2]}
    assert purge.retained == [[records[2].sequence, records[2].record_hash]]
    assert purge.deleted_count == 5
    audited = AuditRecord.objects.get(action="audit.purge")
    assert audited.details["deleted"] == 5 and audited.details["retained"] == 1
    result = assert_verifies()
    assert result.first_sequence == records[2].sequence and result.purges == 1
    append(2)
    assert_verifies()


def test_a_released_hold_lets_a_later_purge_remove_the_record():
    records = append(6)
    hold = legal_hold_create(reason="audit", actor=OFFICER, actor_id="7", since=records[1].created_at,
                             until=records[2].created_at + timedelta(microseconds=1))
    purge_before(records[4])
    assert set(AuditRecord.objects.filter(sequence__lt=records[4].sequence).values_list("sequence", flat=True)) \
        == {records[1].sequence, records[2].sequence}
    legal_hold_release(hold_id=hold.pk, actor=OFFICER)
    second = purge_before(records[4])
    assert second.retained == [] and second.deleted_count == 2
    assert AuditPurge.objects.count() == 2
    assert_verifies()


def test_a_hold_without_criteria_holds_everything():
    records = append(3)
    legal_hold_create(reason="litigation", actor=OFFICER)
    assert purge_before(records[2]) is None
    assert AuditRecord.objects.filter(action="test.event").count() == 3


def test_nothing_to_purge_returns_none_and_writes_nothing():
    records = append(3)
    count = AuditRecord.objects.count()
    assert purge_before(records[0]) is None
    assert AuditRecord.objects.count() == count and not AuditPurge.objects.exists()


def test_purging_everything_old_still_leaves_a_verifiable_chain():
    records = append(4)
    purge = audit_purge(older_than_days=1, actor=OFFICER, now=records[-1].created_at + timedelta(days=2))
    assert purge.boundary_sequence == records[-1].sequence + 1  # the chain goes on with the purge's own record
    assert list(AuditRecord.objects.values_list("action", flat=True)) == ["audit.purge"]
    assert_verifies()


def test_a_tampered_held_record_and_a_deleted_boundary_record_are_caught(settings):
    require(connection.vendor == "postgresql", "PostgreSQL on 127.0.0.1:5432")
    records = append(8)
    legal_hold_create(reason="matter", actor=OFFICER, target_id="case-1")
    purge_before(records[5])
    with connection.cursor() as cursor:
        cursor.execute("ALTER TABLE audit_auditrecord DISABLE TRIGGER USER")
        cursor.execute("UPDATE audit_auditrecord SET outcome = 'denied' WHERE sequence = %s", [records[1].sequence])
        cursor.execute("DELETE FROM audit_auditrecord WHERE sequence = %s", [records[5].sequence])
        cursor.execute("ALTER TABLE audit_auditrecord ENABLE TRIGGER USER")
    result = chain_verify()
    problems = {(p.sequence, p.reason) for p in result.problems}
    assert (records[1].sequence, "hash_mismatch") in problems
    assert (records[5].sequence, "missing_sequence") in problems
    assert result.first_problem.sequence == records[1].sequence


def test_a_purge_refuses_to_run_on_a_broken_chain():
    require(connection.vendor == "postgresql", "PostgreSQL on 127.0.0.1:5432")
    records = append(4)
    with connection.cursor() as cursor:
        cursor.execute("ALTER TABLE audit_auditrecord DISABLE TRIGGER USER")
        cursor.execute("UPDATE audit_auditrecord SET outcome = 'denied' WHERE sequence = %s", [records[0].sequence])
        cursor.execute("ALTER TABLE audit_auditrecord ENABLE TRIGGER USER")
    with pytest.raises(Conflict, match="does not verify"):
        purge_before(records[3])
    assert AuditRecord.objects.filter(action="test.event").count() == 4


def test_the_trigger_lets_a_purge_delete_only_below_its_boundary():
    require(connection.vendor == "postgresql", "PostgreSQL on 127.0.0.1:5432")
    records = append(4)
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SELECT set_config('citadel.audit_purge', %s, true)", [str(records[2].sequence)])
        with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
            cursor.execute("DELETE FROM audit_auditrecord WHERE sequence = %s", [records[3].sequence])
        cursor.execute("DELETE FROM audit_auditrecord WHERE sequence = %s", [records[0].sequence])
        assert cursor.rowcount == 1
