"""The management API: schema, staff-only writes, audited changes; health endpoints."""

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from citadel.audit.models import AuditRecord

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff_client():
    client = Client(enforce_csrf_checks=True)
    client.force_login(get_user_model().objects.create_user("ops", password="x" * 16, is_staff=True))
    return client


def test_the_openapi_schema_and_its_browsable_page_are_served(staff_client):
    schema = staff_client.get("/api/schema/", HTTP_ACCEPT="application/json")
    assert schema.status_code == 200 and "/api/v1/models/" in schema.json()["paths"]
    assert staff_client.get("/api/docs/").status_code == 200


def test_a_session_post_without_a_csrf_token_is_refused(staff_client):
    response = staff_client.post("/api/v1/pools/", {"name": "gpu-a"}, content_type="application/json")
    assert response.status_code == 403


def test_staff_register_a_model_and_the_change_is_audited(staff_client, tiny_checkpoint):
    staff_client.get("/models/")
    token = staff_client.cookies["csrftoken"].value
    response = staff_client.post("/api/v1/models/", {"name": "tiny", "path": str(tiny_checkpoint)},
                                 content_type="application/json", HTTP_X_CSRFTOKEN=token)
    assert response.status_code == 201 and response.json()["family"] == "deepseek_v4"
    record = AuditRecord.objects.get(action="model.register")
    assert record.actor_label == "ops" and record.target_id == "tiny"


def test_a_model_path_that_is_not_a_checkpoint_is_refused_naming_the_field(staff_client, tmp_path):
    staff_client.get("/models/")
    response = staff_client.post("/api/v1/models/", {"name": "bad", "path": str(tmp_path)},
                                 content_type="application/json",
                                 HTTP_X_CSRFTOKEN=staff_client.cookies["csrftoken"].value)
    assert response.status_code == 400
    assert response.json()["field"] == "path" and "config.json is missing" in response.json()["detail"]


def test_non_staff_users_may_read_but_not_change_the_registry():
    client = Client()
    client.force_login(get_user_model().objects.create_user("eng", password="x" * 16))
    assert client.get("/api/v1/models/").status_code == 200
    assert client.post("/api/v1/pools/", {"name": "x"}, content_type="application/json").status_code == 403


def test_health_readiness_and_metrics_answer():
    client = Client()
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.json()["checks"]["database"] == "ok"
    assert "citadel_workers_live 0" in client.get("/metrics").content.decode()


def test_metrics_export_each_workers_engine_batching_counters():
    from citadel.audit.services import Actor
    from citadel.registry.services import pool_create, worker_heartbeat

    pool_create(name="p", site="s", actor=Actor.system())
    worker_heartbeat(name="p@a", pool_name="p", hostname="h", pid=1, loaded_models=["/m"],
                     engine_stats={"/m": {"backend": "citadel", "steps": 12, "max_batch_size": 5,
                                          "mean_batch_size": 2.5, "preemptions": 0}})
    body = Client().get("/metrics").content.decode()
    assert 'citadel_engine_max_batch_size{worker="p@a",model_path="/m"} 5' in body
    assert 'citadel_engine_mean_batch_size{worker="p@a",model_path="/m"} 2.5' in body
