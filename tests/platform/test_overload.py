"""Graceful overload: a saturated pool answers 429 with Retry-After, a pool without a live worker 503,
at once and in OpenAI's error shape, instead of letting requests wait until they time out."""

import json
from datetime import timedelta

import httpx
import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from django.utils import timezone

from citadel.accounts.services import api_key_create
from citadel.audit.models import AuditRecord
from citadel.audit.services import Actor
from citadel.jobs.admission import deployment_admit
from citadel.jobs.models import InferenceJob
from citadel.registry.models import Deployment, Worker, WorkerPool
from citadel.registry.services import deployment_create, model_register, pool_create, worker_heartbeat
from citadel.residency.models import DataClass
from citadel.residency.services import policy_create

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True}


@pytest.fixture
def world(db, tiny_checkpoint, settings):
    settings.CITADEL_POOL_WORKER_SLOTS = 2
    settings.CITADEL_POOL_QUEUE_LIMIT = 3
    user = get_user_model().objects.create_user("app-owner", password="x" * 16)
    key = api_key_create(user=user, name="tests", actor=Actor.system())
    model = model_register(name="tiny", path=str(tiny_checkpoint), actor=Actor.system())
    pool = pool_create(name="gpu-a", site="site-a", actor=Actor.system())
    deployment = deployment_create(model=model, pool=pool, actor=Actor.system())
    policy_create(team=None, data_class=DataClass.objects.get(name="internal"), processing_sites=[pool.site],
                  actor=Actor.system())
    worker_heartbeat(name="gpu-a@h1", pool_name="gpu-a", hostname="h1", pid=1, loaded_models=[])
    return key, deployment


def post(key, body=CHAT):
    # stream=True answers as soon as the job is queued; the test database never commits, so nothing
    # is published to a broker and the job stays queued, taking its place in the pool.
    return Client().post("/v1/chat/completions", json.dumps(body), content_type="application/json",
                         HTTP_AUTHORIZATION=f"Bearer {key.key}")


def fill(deployment: Deployment, count: int, *, status="queued", age=timedelta(0)) -> None:
    for _ in range(count):
        job = InferenceJob.objects.create(kind="chat", model=deployment.model, deployment=deployment,
                                          pool=deployment.pool, status=status, payload={})
        InferenceJob.objects.filter(pk=job.pk).update(created_at=timezone.now() - age)


def test_requests_queue_up_to_the_workers_slots_plus_the_queue_limit_then_get_429_with_retry_after(world):
    key, deployment = world
    for _ in range(5):  # one live worker: 2 slots + 3 queued
        assert post(key).status_code == 200
    refused = post(key)
    assert refused.status_code == 429, refused.content
    assert refused["Retry-After"] == "2"
    error = refused.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "pool_saturated"
    assert "'gpu-a' (5 running or queued, room for 5)" in error["message"]
    assert InferenceJob.objects.count() == 5  # the refused request left no job behind
    audited = AuditRecord.objects.filter(action="inference.chat", outcome="failure").get()
    assert audited.details["error"] == "PoolSaturated"


def test_a_finished_job_frees_its_place(world):
    key, deployment = world
    fill(deployment, 5, status="running")
    assert post(key).status_code == 429
    InferenceJob.objects.filter(pk=InferenceJob.objects.first().pk).update(status="succeeded")
    assert post(key).status_code == 200


def test_each_live_worker_adds_its_slots(world):
    key, deployment = world
    fill(deployment, 5)
    assert post(key).status_code == 429
    worker_heartbeat(name="gpu-a@h2", pool_name="gpu-a", hostname="h2", pid=2, loaded_models=[])
    assert post(key).status_code == 200


def test_a_pools_own_queue_limit_overrides_the_setting(world):
    key, deployment = world
    WorkerPool.objects.filter(pk=deployment.pool_id).update(queue_limit=0)
    fill(deployment, 2)
    assert post(key).status_code == 429
    WorkerPool.objects.filter(pk=deployment.pool_id).update(queue_limit=10)
    assert post(key).status_code == 200


def test_jobs_older_than_the_request_timeout_hold_no_place(world, settings):
    key, deployment = world
    fill(deployment, 5, status="running", age=timedelta(seconds=settings.CITADEL_REQUEST_TIMEOUT_SECONDS + 60))
    assert post(key).status_code == 200


def test_a_pool_without_a_live_worker_answers_503_with_retry_after_at_once(world, settings):
    key, _ = world
    Worker.objects.update(last_heartbeat=timezone.now() - timedelta(minutes=5))
    response = post(key, {**CHAT, "stream": False})
    assert response.status_code == 503
    assert int(response["Retry-After"]) == 2 * settings.CITADEL_WORKER_HEARTBEAT_SECONDS
    assert response.json()["error"]["code"] == "no_worker"


def test_a_saturated_pool_sends_the_request_to_another_allowed_pool_with_room(world):
    key, deployment = world
    other = pool_create(name="gpu-b", site=deployment.pool.site, actor=Actor.system())
    second = deployment_create(model=deployment.model, pool=other, actor=Actor.system())
    worker_heartbeat(name="gpu-b@h1", pool_name="gpu-b", hostname="h1", pid=3, loaded_models=[])
    fill(deployment, 5)
    assert deployment_admit(candidates=[deployment, second]) == second
    fill(second, 5)
    with pytest.raises(Exception, match="'gpu-a' .*'gpu-b'"):
        deployment_admit(candidates=[deployment, second])


def test_admission_reads_the_load_of_every_candidate_pool_in_one_query(world, django_assert_num_queries):
    _, deployment = world
    candidates = [Deployment.objects.select_related("pool", "model").get(pk=deployment.pk)]
    with django_assert_num_queries(1):
        assert deployment_admit(candidates=candidates) == candidates[0]


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)  # the test database, and writes the stack sees (committed)
def test_a_live_stack_answers_429_with_retry_after_when_its_pool_is_saturated(live_stack, django_db_blocker, settings):
    with django_db_blocker.unblock():
        pool = WorkerPool.objects.get(name=live_stack.pool)
        deployment = Deployment.objects.get(pool=pool, status="active")
        WorkerPool.objects.filter(pk=pool.pk).update(queue_limit=0)
        # The stack's processes run with the default 16 slots per worker: take them all.
        fill(deployment, 16, status="running")
    headers = {"Authorization": f"Bearer {live_stack.api_key}"}
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    try:
        refused = httpx.post(f"{live_stack.v1}/chat/completions", json=body, headers=headers, timeout=30)
        assert refused.status_code == 429, refused.text
        assert int(refused.headers["Retry-After"]) >= 1 and refused.json()["error"]["code"] == "pool_saturated"
    finally:
        with django_db_blocker.unblock():
            InferenceJob.objects.filter(pool=pool, payload={}).delete()
            WorkerPool.objects.filter(pk=pool.pk).update(queue_limit=None)
    served = httpx.post(f"{live_stack.v1}/chat/completions", json=body, headers=headers, timeout=60)
    assert served.status_code == 200, served.text
    assert served.json()["choices"][0]["finish_reason"] in ("stop", "length")
