"""Usage metering in process: one ledger row per outcome (never twice), totals by key, team, model and
day, CSV export, team scoping through citadel.accounts.permissions, fine-tuning GPU-seconds, the token
quota counting batch usage, and /readyz wanting a live worker for each deployed model."""

import csv
import io
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from django.utils import timezone

from citadel.accounts.models import Role, Team
from citadel.accounts.services import api_key_create, membership_set
from citadel.audit.services import Actor
from citadel.jobs.models import InferenceJob
from citadel.jobs.services import job_claim, job_succeed
from citadel.registry.services import deployment_create, model_register, pool_create, worker_heartbeat
from citadel.usage.models import UsageRecord
from citadel.usage.services import usage_meter_fine_tuning, usage_record

pytestmark = pytest.mark.django_db
SYSTEM = Actor.system("test")


@pytest.fixture
def teams(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "deepseek_v4"}')
    model = model_register(name="m", path=str(tmp_path), actor=SYSTEM)
    pool = pool_create(name="p", site="s", actor=SYSTEM)
    deployment = deployment_create(model=model, pool=pool, actor=SYSTEM)
    users = get_user_model().objects
    red, blue = Team.objects.create(name="red"), Team.objects.create(name="blue")
    alice, bob = users.create_user("alice", password="x" * 16), users.create_user("bob", password="x" * 16)
    membership_set(team=red, user=alice, role=Role.ML_ENGINEER, actor=SYSTEM)
    membership_set(team=blue, user=bob, role=Role.ML_ENGINEER, actor=SYSTEM)
    red_key = api_key_create(user=alice, name="red-app", team=red, actor=SYSTEM)
    blue_key = api_key_create(user=bob, name="blue-app", team=blue, actor=SYSTEM)
    return dict(model=model, pool=pool, deployment=deployment, red=red, blue=blue, alice=alice, bob=bob,
                red_key=red_key, blue_key=blue_key)


def finished_job(world, key, prompt: int, completion: int) -> InferenceJob:
    job = InferenceJob.objects.create(kind="chat", model=world["model"], deployment=world["deployment"],
                                      pool=world["pool"], api_key=key.api_key, team=key.api_key.team,
                                      user=key.api_key.user, payload={"messages": [], "sampling": {}})
    job_claim(job_id=job.id, worker_name="p@a")
    job_succeed(job=job, text="x", finish_reason="stop", prompt_tokens=prompt, completion_tokens=completion)
    return job


def test_a_finished_job_is_metered_once_with_its_key_team_and_model(teams):
    job = finished_job(teams, teams["red_key"], 7, 5)
    job_succeed(job=job, text="x", finish_reason="stop", prompt_tokens=7, completion_tokens=5)  # again: no-op
    record = UsageRecord.objects.get()
    assert (record.kind, record.prompt_tokens, record.completion_tokens, record.model_name) == ("inference", 7, 5, "m")
    assert record.team == teams["red"] and record.api_key == teams["red_key"].api_key


def test_totals_group_by_team_and_model_and_each_team_sees_only_its_own(teams):
    finished_job(teams, teams["red_key"], 10, 1)
    finished_job(teams, teams["red_key"], 20, 2)
    finished_job(teams, teams["blue_key"], 100, 50)
    alice = Client()
    alice.force_login(teams["alice"])
    body = alice.get("/api/v1/usage/?by=team").json()
    assert body["total"]["prompt_tokens"] == 30 and body["total"]["completion_tokens"] == 3
    assert [row["group"] for row in body["rows"]] == ["red"]
    admin = Client()
    admin.force_login(get_user_model().objects.create_user("root", password="x" * 16, is_staff=True))
    rows = {row["group"]: row for row in admin.get("/api/v1/usage/?by=team").json()["rows"]}
    assert rows["blue"]["total_tokens"] == 150 and rows["red"]["total_tokens"] == 33
    assert admin.get("/api/v1/usage/?by=model").json()["rows"][0]["group"] == "m"
    days = admin.get("/api/v1/usage/?by=day&days=7").json()["rows"]
    assert [row["group"] for row in days] == [timezone.now().date().isoformat()]
    assert admin.get("/api/v1/usage/?by=colour").status_code == 400


def test_the_csv_export_has_one_row_per_day_team_key_model_and_kind(teams):
    finished_job(teams, teams["red_key"], 10, 1)
    finished_job(teams, teams["red_key"], 20, 2)
    finished_job(teams, teams["blue_key"], 100, 50)
    alice = Client()
    alice.force_login(teams["alice"])
    response = alice.get("/api/v1/usage/export.csv")
    assert response["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.content.decode())))
    assert len(rows) == 1 and rows[0]["team"] == "red" and rows[0]["api_key"] == teams["red_key"].api_key.prefix
    assert (rows[0]["requests"], rows[0]["prompt_tokens"], rows[0]["total_tokens"]) == ("2", "30", "33")


def test_ended_fine_tuning_jobs_are_metered_in_gpu_seconds_once(teams, tmp_path):
    from citadel.finetuning.models import File, FineTuningJob
    from citadel.residency.models import DataClass, Site

    site = Site.objects.create(name="ft", jurisdiction="EU", storage_path=str(tmp_path))
    internal = DataClass.objects.get(name="internal")
    file = File.objects.create(filename="t.jsonl", bytes=1, sha256="0" * 64, site=site, path="/x",
                               data_class=internal, team=teams["red"])
    started = timezone.now() - timedelta(minutes=10)
    FineTuningJob.objects.create(status="succeeded", model=teams["model"], training_file=file, seed=1,
                                 hyperparameters={}, config={}, team=teams["red"], data_class=internal,
                                 output_dir="/x", started_at=started, finished_at=started + timedelta(seconds=90))
    FineTuningJob.objects.create(status="running", model=teams["model"], training_file=file, seed=1,
                                 hyperparameters={}, config={}, team=teams["red"], data_class=internal,
                                 output_dir="/x", started_at=started)
    assert usage_meter_fine_tuning() == 1
    assert usage_meter_fine_tuning() == 0
    record = UsageRecord.objects.get(kind="fine_tuning")
    assert record.gpu_seconds == pytest.approx(90) and record.team == teams["red"]


def test_the_token_quota_counts_batch_usage_from_the_ledger(teams, settings):
    from citadel.quotas.services import quota_set

    settings.CITADEL_QUOTA_REDIS_URL = ""
    key = teams["red_key"]
    quota_set(api_key=key.api_key, limits={"tokens_per_minute": 100}, actor=SYSTEM)
    client = Client(HTTP_AUTHORIZATION=f"Bearer {key.key}")
    assert client.get("/v1/models").status_code == 200
    usage_record(kind="batch", source="batch:test:1-4", model_name="m", api_key_id=key.api_key.pk,
                 team_id=teams["red"].pk, requests=4, prompt_tokens=80, completion_tokens=30)
    refused = client.get("/v1/models")
    assert refused.status_code == 429 and refused.json()["error"]["type"] == "tokens"


def test_readyz_wants_a_live_worker_for_each_deployed_model(teams):
    body = Client().get("/readyz")
    assert body.status_code == 503 and body.json()["checks"]["workers"] == "error: no live worker for m"
    worker_heartbeat(name="p@a", pool_name="p", hostname="h", pid=1, loaded_models=[])
    assert Client().get("/readyz").json()["checks"]["workers"] == "ok"
