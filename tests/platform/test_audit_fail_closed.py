"""Fail closed: when the audit record cannot be written, the request is refused with 503 and nothing runs.

The audit table is made unwritable two ways, inside the test's transaction (so it is undone with
it): a trigger that raises on INSERT, or connecting as a role whose INSERT on the table is revoked.
"""

import json
from datetime import timedelta
from unittest import mock

import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from django.test import Client
from django.utils import timezone

from citadel.accounts.models import ApiKey
from citadel.accounts.services import api_key_create
from citadel.audit.models import AuditRecord
from citadel.audit.services import Actor, audit_record
from citadel.core.exceptions import AuditUnavailable
from citadel.jobs.models import InferenceJob
from citadel.registry.models import Worker
from citadel.registry.services import deployment_create, model_register, pool_create
from tests.conftest import require

pytestmark = pytest.mark.django_db


def refuse_inserts_by_trigger(cursor) -> None:
    cursor.execute("CREATE FUNCTION test_audit_unwritable() RETURNS trigger LANGUAGE plpgsql AS $$ "
                   "BEGIN RAISE EXCEPTION 'audit table unwritable (test)'; END $$")
    cursor.execute("CREATE TRIGGER test_audit_unwritable BEFORE INSERT ON audit_auditrecord "
                   "FOR EACH ROW EXECUTE FUNCTION test_audit_unwritable()")


def refuse_inserts_by_privilege(cursor) -> None:
    cursor.execute("CREATE ROLE citadel_no_audit")
    cursor.execute("GRANT ALL ON ALL TABLES IN SCHEMA public TO citadel_no_audit")
    cursor.execute("GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO citadel_no_audit")
    cursor.execute("REVOKE INSERT ON audit_auditrecord FROM citadel_no_audit")
    cursor.execute("SET ROLE citadel_no_audit")


@pytest.fixture(params=[refuse_inserts_by_trigger, refuse_inserts_by_privilege], ids=["trigger", "privilege"])
def make_audit_unwritable(request):
    require(connection.vendor == "postgresql", "PostgreSQL on 127.0.0.1:5432")

    def apply():
        with connection.cursor() as cursor:
            request.param(cursor)

    yield apply
    with connection.cursor() as cursor:
        cursor.execute("RESET ROLE")


@pytest.fixture
def user():
    return get_user_model().objects.create_user("officer", password="x" * 16, is_staff=True)


@pytest.fixture
def key(user):
    return api_key_create(user=user, name="app", actor=Actor.system())


@pytest.fixture
def served_model(tiny_checkpoint, key):
    """A deployed model whose pool has a live worker and that the key's policy allows, so a request
    would be dispatched."""
    from citadel.residency.services import policy_create

    model = model_register(name="tiny", path=str(tiny_checkpoint), actor=Actor.system())
    pool = pool_create(name="gpu-a", site="site-a", actor=Actor.system())
    policy_create(data_class=key.api_key.data_class, actor=Actor.system(), processing_sites=[pool.site])
    deployment_create(model=model, pool=pool, actor=Actor.system())
    now = timezone.now()
    Worker.objects.create(name="w@host", pool=pool, hostname="host", started_at=now - timedelta(seconds=5),
                          last_heartbeat=now, loaded_models=["tiny"])
    return model


def chat(client, key):
    """A streamed request: its response comes back at once, before the (never running) job ends."""
    return client.post("/v1/chat/completions", json.dumps({"model": "tiny", "stream": True, "messages": [
        {"role": "user", "content": "hi"}]}), content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {key.key}")


def test_audit_record_raises_audit_unavailable_when_the_table_is_unwritable(make_audit_unwritable):
    make_audit_unwritable()
    with pytest.raises(AuditUnavailable):
        audit_record(actor=Actor.system(), action="test.event", outcome="success")


def test_creating_an_api_key_is_refused_with_503_and_no_key_is_made(user, make_audit_unwritable):
    client = Client()
    client.force_login(user)
    make_audit_unwritable()
    response = client.post("/api/v1/keys/", {"name": "new"}, content_type="application/json")
    assert response.status_code == 503, response.content
    assert response.json()["code"] == "audit_unavailable"
    assert not ApiKey.objects.exists()


def test_an_inference_request_is_refused_with_503_and_nothing_is_dispatched(
        served_model, key, make_audit_unwritable, django_capture_on_commit_callbacks):
    from citadel.jobs.tasks import run_inference

    with mock.patch.object(run_inference, "apply_async") as publish:
        with django_capture_on_commit_callbacks(execute=True):  # the control: writable, it is dispatched
            assert chat(Client(), key).status_code == 200
        assert publish.call_count == 1 and InferenceJob.objects.count() == 1
        records = AuditRecord.objects.count()

        make_audit_unwritable()
        with django_capture_on_commit_callbacks(execute=True):
            response = chat(Client(), key)
        assert response.status_code == 503, response.content
        error = response.json()["error"]
        assert error["code"] == "audit_unavailable" and "audit" in error["message"]
        assert publish.call_count == 1  # nothing more was sent to a worker
    with connection.cursor() as cursor:
        cursor.execute("RESET ROLE")
    assert InferenceJob.objects.count() == 1 and AuditRecord.objects.count() == records


def test_an_export_is_refused_when_it_cannot_be_audited(make_audit_unwritable, tmp_path):
    import io

    from django.core.management import CommandError, call_command

    audit_record(actor=Actor.system(), action="test.event", outcome="success")
    make_audit_unwritable()
    out = io.StringIO()
    with pytest.raises(CommandError, match="audit log cannot be written"):
        call_command("audit", "export", stdout=out)
    assert out.getvalue() == ""


def test_a_console_login_is_refused_with_503_and_leaves_no_session(user, make_audit_unwritable):
    client = Client()
    make_audit_unwritable()
    response = client.post("/login/", {"username": "officer", "password": "x" * 16})
    assert response.status_code == 503
    assert "audit log cannot be written" in response.content.decode()
    with connection.cursor() as cursor:
        cursor.execute("RESET ROLE")
    assert "_auth_user_id" not in client.session
