"""Console audit pages (Django test client): auditors and platform administrators search, filter and
page through the log, read a record, verify the chain and export; nobody else gets in, and an
auditor sees no control that changes anything. Verification and export are themselves audited.
"""

import json
import re
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from django.utils import timezone

from citadel.accounts.models import Role, Team
from citadel.accounts.services import membership_set
from citadel.audit.models import AuditRecord
from citadel.audit.services import Actor, audit_record

pytestmark = pytest.mark.django_db
SYSTEM = Actor.system("test")
AUDIT = "/audit/"


@pytest.fixture
def people():
    users = get_user_model().objects
    team = Team.objects.create(name="compliance")
    found = {"root": users.create_user("root", password="x" * 16, is_staff=True)}
    for name, role in (("audrey", Role.AUDITOR), ("otto", Role.OPERATOR), ("erin", Role.ML_ENGINEER),
                       ("lead", Role.ADMIN)):
        found[name] = users.create_user(name, password="x" * 16)
        membership_set(team=team, user=found[name], role=role, actor=SYSTEM)
    return found


def signed_in(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def text(response) -> str:
    return response.content.decode()


def test_an_auditor_searches_the_log_and_sees_no_edit_controls(people):
    audit_record(actor=Actor.system("nightly"), action="model.register", outcome="success", target_type="model",
                 target_id="alpha")
    audit_record(actor=Actor.for_user(people["otto"]), action="deployment.create", outcome="denied",
                 target_type="model", target_id="alpha")
    page = signed_in(people["audrey"]).get(AUDIT)
    assert page.status_code == 200
    body = text(page)
    assert "model.register" in body and "deployment.create" in body and 'id="verify-button"' in body
    # The only form that posts is logging out: an auditor's page offers nothing to change.
    assert re.findall(r'<form[^>]*method="post"[^>]*>', body) == [
        '<form method="post" action="/logout/" class="logout">']


def test_filters_by_actor_action_prefix_target_outcome_and_time(people):
    audit_record(actor=Actor.for_user(people["otto"]), action="deployment.create", outcome="denied",
                 target_type="model", target_id="alpha")
    audit_record(actor=Actor.for_user(people["otto"]), action="deployment.retire", outcome="success",
                 target_type="deployment", target_id="7")
    audit_record(actor=SYSTEM, action="model.register", outcome="success", target_type="model", target_id="beta")
    auditor = signed_in(people["audrey"])

    def actions(**query) -> list[str]:
        response = auditor.get(AUDIT, query)
        assert response.status_code == 200, text(response)
        return re.findall(r"<code>([a-z_.]+)</code>", text(response))

    assert actions(action="deployment.*") == ["deployment.retire", "deployment.create"]
    assert actions(actor="otto", outcome="denied") == ["deployment.create"]
    assert actions(target="model:beta") == ["model.register"]
    assert actions(target="deployment") == ["deployment.retire"]
    hour_ago = (timezone.localtime() - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M")
    assert "model.register" in actions(since=hour_ago, action="model.register")
    assert actions(until=hour_ago, action="model.register") == []


def test_a_malformed_time_and_an_unknown_outcome_are_shown_next_to_their_fields(people):
    response = signed_in(people["audrey"]).get(AUDIT, {"since": "yesterday", "outcome": "maybe"})
    assert response.status_code == 400
    body = text(response)
    assert re.search(r'id="error-since" role="alert">&#x27;yesterday&#x27; is not a date and time', body)
    assert 'id="error-outcome" role="alert">outcome must be one of success, failure, denied' in body
    later, earlier = "2026-01-02T00:00", "2026-01-01T00:00"
    reversed_range = signed_in(people["audrey"]).get(AUDIT, {"since": later, "until": earlier})
    assert 'id="error-until" role="alert">until must be later than since.' in text(reversed_range)


def test_long_results_paginate_and_keep_their_filters(people):
    for n in range(60):
        audit_record(actor=SYSTEM, action="bulk.thing", outcome="success", target_type="thing", target_id=str(n))
    auditor = signed_in(people["audrey"])
    first = text(auditor.get(AUDIT, {"action": "bulk.thing"}))
    assert first.count("<code>bulk.thing</code>") == 50 and "Page 1 of 2" in first
    assert 'href="?action=bulk.thing&amp;page=2"' in first
    second = text(auditor.get(AUDIT, {"action": "bulk.thing", "page": 2}))
    assert second.count("<code>bulk.thing</code>") == 10 and "thing:0<" in second


def test_a_record_page_shows_its_hashes_and_details_and_a_missing_one_is_404(people):
    record = audit_record(actor=SYSTEM, action="policy.test", outcome="failure", target_type="policy",
                          target_id="9", details={"reason": "because"})
    auditor = signed_in(people["audrey"])
    page = auditor.get(f"/audit/records/{record.sequence}/")
    assert page.status_code == 200
    body = text(page)
    assert record.record_hash in body and record.prev_hash in body and "&quot;reason&quot;: &quot;because&quot;" in body
    assert auditor.get("/audit/records/999999/").status_code == 404


def test_verify_reports_the_chain_intact_and_is_itself_audited(people):
    for n in range(3):
        audit_record(actor=SYSTEM, action="thing.happen", outcome="success", target_id=str(n))
    auditor = signed_in(people["audrey"])
    fragment = auditor.get("/audit/verify/", headers={"HX-Request": "true"})
    assert fragment.status_code == 200
    body = text(fragment)
    assert 'id="verify-result"' in body and "Verified." in body
    assert "<html" not in body
    check = AuditRecord.objects.filter(action="audit.verify").get()
    assert check.outcome == "success" and check.actor_label == "audrey" and check.details["problems"] == 0
    whole_page = auditor.get("/audit/verify/")
    assert whole_page.status_code == 200 and "<html" in text(whole_page)


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_export_downloads_the_filtered_records_and_is_audited(people, fmt):
    audit_record(actor=SYSTEM, action="keep.me", outcome="success", target_id="1")
    audit_record(actor=SYSTEM, action="skip.me", outcome="success", target_id="2")
    response = signed_in(people["audrey"]).get("/audit/export/", {"format": fmt, "action": "keep.me"})
    assert response.status_code == 200
    assert response["Content-Disposition"].endswith(f'.{fmt}"')
    content = b"".join(response.streaming_content).decode()
    assert "keep.me" in content and "skip.me" not in content
    if fmt == "jsonl":
        lines = [json.loads(line) for line in content.splitlines()]
        assert lines[0]["type"] == "header" and lines[0]["filters"]["action"] == "keep.me"
        assert [line["action"] for line in lines if line["type"] == "record"] == ["keep.me"]
    exported = AuditRecord.objects.get(action="audit.export")
    assert exported.actor_label == "audrey" and exported.details["format"] == fmt


def test_export_refuses_an_unknown_format_next_to_the_buttons(people):
    response = signed_in(people["root"]).get("/audit/export/", {"format": "xml"})
    assert response.status_code == 400
    assert 'id="error-format" role="alert">format must be one of jsonl, csv.' in text(response)
    assert not AuditRecord.objects.filter(action="audit.export").exists()


def test_a_platform_administrator_reads_the_audit_pages_too(people):
    root = signed_in(people["root"])
    assert root.get(AUDIT).status_code == 200
    assert root.get("/audit/verify/").status_code == 200


@pytest.mark.parametrize("name", ["otto", "erin", "lead"])
def test_roles_without_oversight_are_refused_every_audit_page(people, name):
    client = signed_in(people[name])
    record = audit_record(actor=SYSTEM, action="secret.thing", outcome="success")
    for url in (AUDIT, f"/audit/records/{record.sequence}/", "/audit/verify/", "/audit/export/?format=csv"):
        response = client.get(url)
        assert response.status_code == 403, (url, response.status_code)
        assert "secret.thing" not in text(response)
    assert not AuditRecord.objects.filter(action__in=["audit.verify", "audit.export"]).exists()


def test_signed_out_visitors_are_sent_to_sign_in(people):
    response = Client().get(AUDIT)
    assert response.status_code == 302 and response["Location"].startswith("/login/")
