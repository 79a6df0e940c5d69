"""audit_record_with_write: a write and the audit record that describes it, one implicit transaction in
one message (the inference request path's job row and its acceptance record). Both or neither, and
the chain stays unbroken when threads append this way and the usual way at once."""

import threading

import pytest
from django.db import connection

from citadel.audit.models import AuditRecord
from citadel.audit.services import (
    Actor,
    audit_record,
    audit_record_with_write,
    audit_record_with_write_possible,
)
from citadel.audit.verification import chain_verify
from citadel.core.exceptions import AuditUnavailable
from citadel.residency.models import Site
from tests.conftest import require

pytestmark = pytest.mark.django_db(transaction=True)  # autocommit, as a web request runs


def site_insert(name: str) -> tuple[str, list]:
    return f'INSERT INTO "{Site._meta.db_table}" (name, region, jurisdiction, storage_path, description, ' \
           "created_at) VALUES (%s, '', '', '', '', now())", [name]


@pytest.fixture(autouse=True)
def postgresql():
    require(connection.vendor == "postgresql", "PostgreSQL on 127.0.0.1:5432")


def test_the_write_and_its_record_commit_together():
    assert audit_record_with_write_possible()
    record = audit_record_with_write(write=site_insert("s-1"), actor=Actor.system(), action="test.with_write",
                                     outcome="success", target_type="site", target_id="s-1", details={"n": 1})
    assert Site.objects.filter(name="s-1").exists()
    stored = AuditRecord.objects.get(action="test.with_write")
    assert stored.sequence == record.sequence and stored.record_hash == record.record_hash
    assert stored.details == {"n": 1}
    assert chain_verify().ok


def test_an_unwritable_audit_log_rolls_the_write_back():
    with connection.cursor() as cursor:
        cursor.execute("CREATE FUNCTION test_audit_unwritable() RETURNS trigger LANGUAGE plpgsql AS $$ "
                       "BEGIN RAISE EXCEPTION 'audit table unwritable (test)'; END $$")
        cursor.execute("CREATE TRIGGER test_audit_unwritable BEFORE INSERT ON audit_auditrecord "
                       "FOR EACH ROW EXECUTE FUNCTION test_audit_unwritable()")
    try:
        with pytest.raises(AuditUnavailable):
            audit_record_with_write(write=site_insert("s-2"), actor=Actor.system(), action="test.with_write",
                                    outcome="success")
        assert not Site.objects.filter(name="s-2").exists()  # fail closed: nothing without its record
    finally:
        with connection.cursor() as cursor:
            cursor.execute("DROP TRIGGER test_audit_unwritable ON audit_auditrecord")
            cursor.execute("DROP FUNCTION test_audit_unwritable()")


def test_not_possible_inside_a_transaction():
    from django.db import transaction

    with transaction.atomic():
        assert not audit_record_with_write_possible()


def test_threads_appending_both_ways_leave_one_unbroken_chain():
    errors = []

    def writer(i: int) -> None:
        try:
            for j in range(10):
                if (i + j) % 2:
                    audit_record_with_write(write=site_insert(f"t-{i}-{j}"), actor=Actor.system(f"w{i}"),
                                            action="test.with_write", outcome="success")
                else:
                    audit_record(actor=Actor.system(f"w{i}"), action="test.plain", outcome="success")
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)
        finally:
            connection.close()

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    result = chain_verify()
    assert result.ok, result.summary()
    assert AuditRecord.objects.filter(action="test.with_write").count() == Site.objects.filter(
        name__startswith="t-").count() == 30
    sequences = list(AuditRecord.objects.order_by("sequence").values_list("sequence", flat=True))
    assert sequences == list(range(sequences[0], sequences[0] + len(sequences)))
