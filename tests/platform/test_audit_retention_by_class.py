"""Audit retention per data class: each class's records are kept as long as its own setting says.

Records name their data class in their details (`data_class`, or `residency.data_class` for the
records of residency decisions). A purge deletes only what every rule lets go, lists what it
keeps below its boundary in the signed manifest, and the chain verifies afterwards.
"""

import time
from datetime import timedelta

import pytest

from citadel.audit.models import AuditRecord
from citadel.audit.services import Actor, audit_purge, audit_record, legal_hold_create
from citadel.audit.verification import chain_verify
from citadel.residency.models import DataClass
from citadel.residency.services import data_class_create

pytestmark = pytest.mark.django_db

OFFICER = Actor.system("retention-test")


def record(name: str, data_class: str | None = None, nested: bool = False) -> AuditRecord:
    details: dict = {"name": name}
    if data_class is not None:
        details.update({"residency": {"data_class": data_class}} if nested else {"data_class": data_class})
    return audit_record(actor=Actor("user", "7", "alice"), action="test.event", outcome="success",
                        target_type="case", target_id=name, details=details)


def remaining() -> set[str]:
    return set(AuditRecord.objects.filter(action="test.event").values_list("target_id", flat=True))


def set_retention(name: str, days: int | None) -> None:
    DataClass.objects.filter(name=name).update(audit_retention_days=days)


def test_each_class_keeps_its_records_for_its_own_days_and_the_chain_verifies():
    set_retention("public", 7)          # shorter than the default
    set_retention("internal", 30)
    set_retention("restricted", 0)      # forever
    set_retention("confidential", 400)  # longer than the default
    old_public = record("old-public", "public")
    for name, data_class, nested in (("plain", None, False), ("internal", "internal", False),
                                     ("restricted", "restricted", True), ("confidential", "confidential", False)):
        record(name, data_class, nested)
    time.sleep(0.05)
    young_public = record("young-public", "public")
    # Seven days after a moment between the two public records: only the older one is past 7 days.
    between = old_public.created_at + (young_public.created_at - old_public.created_at) / 2
    first = audit_purge(older_than_days=90, actor=OFFICER, now=between + timedelta(days=7))
    assert first.deleted_count == 1
    assert remaining() == {"plain", "internal", "restricted", "confidential", "young-public"}
    assert chain_verify().ok

    # 100 days on: the default (90) and internal (30) and public (7) have run out; restricted is kept
    # forever and confidential for 400 days, listed in the signed manifest below the boundary.
    second = audit_purge(older_than_days=90, actor=OFFICER, now=young_public.created_at + timedelta(days=100))
    assert remaining() == {"restricted", "confidential"}
    kept = {sequence for sequence, _ in second.retained}
    assert set(AuditRecord.objects.filter(action="test.event").values_list("sequence", flat=True)) <= kept
    audited = AuditRecord.objects.filter(action="audit.purge").order_by("-sequence").first()
    assert audited.details["class_retention_days"] == {"public": 7, "internal": 30, "restricted": 0,
                                                        "confidential": 400}
    result = chain_verify()
    assert result.ok, result.summary()


def test_a_class_with_a_short_retention_is_purged_even_when_the_default_keeps_everything():
    set_retention("public", 30)
    first = record("public-1", "public")
    record("internal-1", "internal")
    record("plain-1")
    record("public-2", "public")
    purge = audit_purge(older_than_days=0, actor=OFFICER, now=first.created_at + timedelta(days=31))
    assert purge is not None and purge.deleted_count == 2  # both public records are past 30 days
    assert remaining() == {"internal-1", "plain-1"}
    assert chain_verify().ok


def test_a_legal_hold_still_wins_over_a_short_class_retention():
    set_retention("public", 1)
    held = record("case-held", "public")
    record("case-free", "public")
    legal_hold_create(reason="matter 7", actor=OFFICER, target_id="case-held")
    audit_purge(older_than_days=None, actor=OFFICER, now=held.created_at + timedelta(days=3))
    assert remaining() == {"case-held"}
    assert chain_verify().ok


def test_nothing_is_purged_when_every_rule_keeps_forever():
    first = record("a", "public")
    assert audit_purge(older_than_days=None, actor=OFFICER, now=first.created_at + timedelta(days=9999)) is None
    assert remaining() == {"a"}


def test_a_class_created_with_a_retention_records_it_in_its_audit_trail():
    data_class_create(name="phi", rank=40, actor=OFFICER, audit_retention_days=3650)
    assert DataClass.objects.get(name="phi").audit_retention_days == 3650
    created = AuditRecord.objects.get(action="residency.data_class.create", target_id="phi")
    assert created.details["after"]["audit_retention_days"] == 3650


def test_administrators_set_a_class_retention_through_the_management_api():
    from django.contrib.auth import get_user_model
    from django.test import Client

    staff = Client()
    staff.force_login(get_user_model().objects.create_user("ops", password="x" * 16, is_staff=True))
    response = staff.patch("/api/v1/residency/data-classes/restricted/", {"audit_retention_days": 0},
                           content_type="application/json")
    assert response.status_code == 200, response.content
    assert response.json()["audit_retention_days"] == 0
    assert DataClass.objects.get(name="restricted").audit_retention_days == 0
    change = AuditRecord.objects.get(action="residency.data_class.update", target_id="restricted").details
    assert change["before"]["audit_retention_days"] is None and change["after"]["audit_retention_days"] == 0
