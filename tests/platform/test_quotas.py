"""Quotas per key and per team, enforced across web processes; revoked and expired keys refused at once
by every web process.

The concurrency tests run real gunicorn processes on the test PostgreSQL database with Redis for
the per-minute windows (the broker database from CITADEL_TEST_BROKER_URL, so concurrent runs do
not share windows), and the database limiter through the Django test client from many threads.
"""

import concurrent.futures
import os
import subprocess
import sys
from datetime import timedelta

import httpx
import pytest
from django.contrib.auth import get_user_model
from django.test import Client, override_settings
from django.utils import timezone

from citadel.accounts.models import ApiKey, Role
from citadel.accounts.services import api_key_create, membership_set, team_create
from citadel.audit.services import Actor
from citadel.quotas.models import Quota
from citadel.quotas.services import quota_set
from tests import live_stack as ls
from tests.conftest import database_url, port_open, require
from tests.platform.test_finetuning_api import world  # noqa: F401 - the fine-tuning API's fixture, reused

SYSTEM = Actor.system("test")


def _redis_url() -> str:
    return ls.REDIS_URL


@pytest.fixture
def team_and_user(db):
    user = get_user_model().objects.create_user("app", password="x" * 16)
    team = team_create(name="payments", actor=SYSTEM)
    membership_set(team=team, user=user, role=Role.APPLICATION, actor=SYSTEM)
    return team, user


def _web(env: dict, logs, name: str) -> tuple[str, subprocess.Popen]:
    port = ls.free_port()
    process = ls.start([sys.executable, "-m", "gunicorn", "citadel.wsgi:application", f"--bind=127.0.0.1:{port}",
                        "--worker-class=gthread", "--workers=2", "--threads=16", "--timeout=0"], env,
                       logs / f"{name}.log")
    base = f"http://127.0.0.1:{port}"
    try:
        ls.wait_until(lambda: httpx.get(f"{base}/healthz").status_code == 200, 60, f"gunicorn {name} answering")
    except BaseException:
        ls.stop([process])
        raise
    return base, process


@pytest.fixture
def two_web_processes(transactional_db, tmp_path):
    """Two separate gunicorn servers (two workers each) on the test database, quotas in Redis."""
    from django.db import connection

    require(connection.vendor == "postgresql", "PostgreSQL on 127.0.0.1:5432")
    require(port_open("127.0.0.1", 6379), "Redis on 127.0.0.1:6379")
    import redis

    redis.Redis.from_url(_redis_url()).flushdb()
    env = ls.process_env(database_url(), tmp_path / "data")
    env["CITADEL_QUOTA_REDIS_URL"] = _redis_url()
    processes = []
    try:
        first, process = _web(env, tmp_path, "web-a")
        processes.append(process)
        second, process = _web(env, tmp_path, "web-b")
        processes.append(process)
        yield first, second
    finally:
        ls.stop(processes)


def _get(url: str, key: str) -> httpx.Response:
    return httpx.get(url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def test_200_concurrent_requests_on_a_60_per_minute_key_let_60_through_and_answer_the_rest_429(
        two_web_processes, team_and_user):
    team, user = team_and_user
    created = api_key_create(user=user, name="app", team=team, actor=SYSTEM)
    quota_set(api_key=created.api_key, limits={"requests_per_minute": 60}, actor=SYSTEM)
    urls = [f"{base}/v1/models" for base in two_web_processes]
    with concurrent.futures.ThreadPoolExecutor(max_workers=50) as pool:
        responses = list(pool.map(lambda i: _get(urls[i % 2], created.key), range(200)))
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == 60, statuses
    refused = [r for r in responses if r.status_code != 200]
    assert len(refused) == 140 and {r.status_code for r in refused} == {429}
    for response in refused:
        assert 1 <= int(response.headers["Retry-After"]) <= 60
        error = response.json()["error"]
        assert error["code"] == "rate_limit_exceeded" and error["type"] == "requests" and error["message"]


def test_a_revoked_or_expired_key_is_refused_at_once_by_every_web_process(two_web_processes, team_and_user):
    team, user = team_and_user
    first, second = two_web_processes
    revoked = api_key_create(user=user, name="to revoke", team=team, actor=SYSTEM)
    expiring = api_key_create(user=user, name="to expire", team=team, actor=SYSTEM)
    for base in (first, second):
        for key in (revoked.key, expiring.key):
            for _ in range(4):  # both workers of each server have served the key
                assert _get(f"{base}/v1/models", key).status_code == 200
    admin = get_user_model().objects.create_user("root", password="x" * 16, is_staff=True)
    admin_key = api_key_create(user=admin, name="admin", actor=SYSTEM).key
    response = httpx.post(f"{first}/api/v1/keys/{revoked.api_key.prefix}/revoke/",
                          headers={"Authorization": f"Bearer {admin_key}"}, timeout=60)
    assert response.status_code == 200
    ApiKey.objects.filter(pk=expiring.api_key.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    for base in (second, first):
        for _ in range(8):
            answer = _get(f"{base}/v1/models", revoked.key)
            assert answer.status_code == 401 and answer.json()["error"]["code"] == "revoked_api_key"
            answer = _get(f"{base}/v1/models", expiring.key)
            assert answer.status_code == 401 and answer.json()["error"]["code"] == "expired_api_key"


@pytest.mark.django_db(transaction=True)
@override_settings(CITADEL_QUOTA_REDIS_URL="")
def test_without_redis_the_database_limiter_admits_no_more_than_the_limit_from_many_threads(team_and_user):
    from django.db import connection

    require(connection.vendor == "postgresql", "PostgreSQL on 127.0.0.1:5432")
    team, user = team_and_user
    created = api_key_create(user=user, name="app", team=team, actor=SYSTEM)
    quota_set(api_key=created.api_key, limits={"requests_per_minute": 20}, actor=SYSTEM)

    def call(_):
        try:
            response = Client(HTTP_AUTHORIZATION=f"Bearer {created.key}").get("/v1/models")
            return response.status_code, response.get("Retry-After")
        finally:
            connection.close()

    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(call, range(60)))
    assert [status for status, _ in results].count(200) == 20
    assert all(status == 429 and int(retry) >= 1 for status, retry in results if status != 200)


@pytest.fixture
def redis_quota_settings(db):
    require(port_open("127.0.0.1", 6379), "Redis on 127.0.0.1:6379")
    import redis

    redis.Redis.from_url(_redis_url()).flushdb()
    with override_settings(CITADEL_QUOTA_REDIS_URL=_redis_url()):
        yield


def test_a_team_quota_is_shared_by_all_its_keys(redis_quota_settings, team_and_user):
    team, user = team_and_user
    keys = [api_key_create(user=user, name=f"k{i}", team=team, actor=SYSTEM).key for i in range(3)]
    quota_set(team=team, limits={"requests_per_minute": 5}, actor=SYSTEM)
    statuses = [Client(HTTP_AUTHORIZATION=f"Bearer {keys[i % 3]}").get("/v1/models").status_code for i in range(9)]
    assert statuses == [200] * 5 + [429] * 4


def test_tokens_per_minute_and_per_month_are_counted_from_the_jobs(redis_quota_settings, team_and_user):
    from citadel.jobs.models import InferenceJob
    from citadel.registry.models import Model

    team, user = team_and_user
    created = api_key_create(user=user, name="app", team=team, actor=SYSTEM)
    quota_set(api_key=created.api_key, limits={"tokens_per_minute": 100}, actor=SYSTEM)
    client = Client(HTTP_AUTHORIZATION=f"Bearer {created.key}")
    assert client.get("/v1/models").status_code == 200
    model = Model.objects.create(name="m", path="/srv/m")
    InferenceJob.objects.create(kind="chat", model=model, api_key=created.api_key, team=team, user=user, payload={},
                                prompt_tokens=60, completion_tokens=40)
    refused = client.get("/v1/models")
    assert refused.status_code == 429 and refused.json()["error"]["type"] == "tokens"
    assert 1 <= int(refused["Retry-After"]) <= 60
    quota_set(api_key=created.api_key, limits={"tokens_per_month": 100}, actor=SYSTEM)
    monthly = client.get("/v1/models")
    assert monthly.status_code == 429 and monthly.json()["error"]["code"] == "insufficient_quota"
    assert int(monthly["Retry-After"]) > 0


def test_quotas_are_set_through_the_management_api_by_administrators_only_and_audited(team_and_user):
    from citadel.audit.models import AuditRecord

    team, user = team_and_user
    created = api_key_create(user=user, name="app", team=team, actor=SYSTEM)
    team_admin = get_user_model().objects.create_user("lead", password="x" * 16)
    membership_set(team=team, user=team_admin, role=Role.ADMIN, actor=SYSTEM)
    lead = Client()
    lead.force_login(team_admin)
    limits = {"requests_per_minute": 60, "tokens_per_minute": 10000, "tokens_per_month": 10**7,
              "gpu_hours_per_month": 12.5}
    assert lead.put("/api/v1/teams/payments/quota/", limits, content_type="application/json").status_code == 403
    response = lead.put(f"/api/v1/keys/{created.api_key.prefix}/quota/", {"requests_per_minute": 30},
                        content_type="application/json")
    assert response.status_code == 200 and response.json()["requests_per_minute"] == 30
    root = Client()
    root.force_login(get_user_model().objects.create_user("root", password="x" * 16, is_staff=True))
    assert root.put("/api/v1/teams/payments/quota/", limits, content_type="application/json").json() == limits
    assert Quota.objects.get(team=team).gpu_hours_per_month == 12.5
    assert AuditRecord.objects.filter(action="quota.set").count() == 2


def test_fine_tuning_gpu_hours_are_counted_from_the_jobs_and_refused_past_the_monthly_quota(team_and_user):
    from citadel.core.exceptions import RateLimited
    from citadel.finetuning.models import File, FineTuningJob
    from citadel.quotas.limiter import gpu_hours_used, quota_gpu_hours_admit
    from citadel.registry.models import Model
    from citadel.residency.models import DataClass, Site

    team, user = team_and_user
    quota_set(team=team, limits={"gpu_hours_per_month": 10}, actor=SYSTEM)
    quota_gpu_hours_admit(team=team)  # nothing used yet
    internal = DataClass.objects.get(name="internal")
    file = File.objects.create(filename="t.jsonl", bytes=1, sha256="0" * 64, path="/nonexistent",
                               site=Site.objects.create(name="s", jurisdiction="EU"), data_class=internal, team=team)
    now = timezone.now()
    month_start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    for started, finished in ((now - timedelta(hours=6), now - timedelta(hours=2)),  # 4 hours
                              (now - timedelta(hours=3), None),  # 3 hours so far, still running
                              (month_start - timedelta(hours=5), month_start + timedelta(hours=1))):  # 1 this month
        FineTuningJob.objects.create(model=Model.objects.get_or_create(name="m", path="/m")[0], training_file=file,
                                     seed=1, hyperparameters={}, config={}, team=team, data_class=internal,
                                     output_dir="/nonexistent", started_at=started, finished_at=finished)
    used = gpu_hours_used(team=team, since=month_start)
    assert 7.99 < used < 8.01 if now - month_start > timedelta(hours=6) else used > 0
    quota_gpu_hours_admit(team=team, requested_hours=1.5)
    with pytest.raises(RateLimited) as refused:
        quota_gpu_hours_admit(team=team, requested_hours=2.5, used_hours=8)
    assert refused.value.error_type == "insufficient_quota" and refused.value.retry_after > 0


def test_redis_url_comes_from_the_environment_or_the_broker():
    code = ("from django.conf import settings; print(repr(settings.CITADEL_QUOTA_REDIS_URL))")
    env = dict(os.environ, DJANGO_SETTINGS_MODULE="citadel.settings.local", CELERY_BROKER_URL="redis://h:6379/3",
               CITADEL_DATA_DIR="/tmp/citadel-quota-settings",
               PYTHONPATH=os.pathsep.join([str(ls.ROOT / "platform"), str(ls.ROOT)]))
    env.pop("CITADEL_QUOTA_REDIS_URL", None)
    out = subprocess.run([sys.executable, "-c", f"import django; django.setup(); {code}"], env=env,
                         capture_output=True, text=True, cwd=ls.ROOT, check=True).stdout
    assert out.strip() == "'redis://h:6379/3'"


def test_a_quota_that_cannot_be_counted_is_not_granted(team_and_user):
    team, user = team_and_user
    created = api_key_create(user=user, name="app", team=team, actor=SYSTEM)
    quota_set(api_key=created.api_key, limits={"requests_per_minute": 5}, actor=SYSTEM)
    with override_settings(CITADEL_QUOTA_REDIS_URL=f"redis://127.0.0.1:{ls.free_port()}/0"):  # nothing listens
        response = Client(HTTP_AUTHORIZATION=f"Bearer {created.key}").get("/v1/models")
    assert response.status_code == 503 and response.json()["error"]["code"] == "quota_store_unavailable"


@pytest.mark.django_db(transaction=True)
def test_citadel_keys_create_takes_scopes_and_models(team_and_user, cli_env):
    from citadel.registry.models import Model

    Model.objects.create(name="m", path="/srv/m")
    result = subprocess.run([sys.executable, "-m", "citadel.cli", "keys", "create", "--user", "app", "--name", "s",
                             "--scope", "inference", "--model", "m"], capture_output=True, text=True, env=cli_env)
    assert result.returncode == 0, result.stderr
    key = ApiKey.objects.get(name="s")
    assert key.scopes == ["inference"] and key.allowed_models == ["m"]


@pytest.mark.django_db
def test_a_fine_tuning_job_is_refused_with_429_once_the_keys_gpu_hours_are_used_up(world):  # noqa: F811
    from citadel.finetuning.models import FineTuningJob
    from tests.platform.test_finetuning_api import create, error_of, uploaded

    file_id = uploaded(world)
    api_key = ApiKey.objects.get(name="ft")
    quota_set(api_key=api_key, limits={"gpu_hours_per_month": 1}, actor=SYSTEM)
    assert create(world, training_file=file_id).status_code == 200
    FineTuningJob.objects.update(started_at=timezone.now() - timedelta(hours=2), finished_at=timezone.now())
    refused = create(world, training_file=file_id)
    assert refused.status_code == 429 and error_of(refused)["code"] == "insufficient_quota"
    assert int(refused["Retry-After"]) > 0 and FineTuningJob.objects.count() == 1


def test_a_console_session_runs_on_its_teams_quota(redis_quota_settings, team_and_user):
    team, _ = team_and_user
    engineer = get_user_model().objects.create_user("eng", password="x" * 16)
    membership_set(team=team, user=engineer, role=Role.ML_ENGINEER, actor=SYSTEM)
    quota_set(team=team, limits={"requests_per_minute": 2}, actor=SYSTEM)
    client = Client()
    client.force_login(engineer)
    body = {"model": "nothing-deployed", "messages": [{"role": "user", "content": "hi"}]}
    statuses = [client.post("/playground/stream", body, content_type="application/json").status_code
                for _ in range(3)]
    assert statuses[:2] != [429, 429] and statuses[2] == 429
    refused = client.post("/playground/stream", body, content_type="application/json")
    assert refused.status_code == 429 and int(refused["Retry-After"]) >= 1
