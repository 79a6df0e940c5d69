"""Fine-tuning through the OpenAI protocol, in process: uploads, validation, refusals, residency,
quotas, cancel, pagination and audit. The worker side is in test_finetuning_worker.py; the real
worker and the official client in tests/e2e/test_finetuning_e2e.py."""

import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from citadel.accounts.services import api_key_create
from citadel.audit.models import AuditRecord
from citadel.audit.services import Actor
from citadel.finetuning.models import File, FineTuningEvent, FineTuningJob
from citadel.registry.services import deployment_create, model_register, pool_create
from citadel.residency.models import DataClass, Policy
from citadel.residency.services import policy_create, site_create

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "models" / "demo-v4"
SYSTEM = Actor.system("test")
TRAIN_LINES = (DEMO / "finetune" / "train.jsonl").read_text().splitlines()


def jsonl(lines) -> bytes:
    return ("\n".join(lines) + "\n").encode()


@pytest.fixture
def world(tmp_path, monkeypatch):
    """demo-v4 deployed on pool ft-pool at site ft-site (EU, storage under tmp_path); keys without a
    team may process, store and fine-tune internal data there. Published job ids are collected."""
    site = site_create(name="ft-site", jurisdiction="EU", storage_path=str(tmp_path / "store"), actor=SYSTEM)
    model = model_register(name="demo-v4", path=str(DEMO), actor=SYSTEM)
    pool = pool_create(name="ft-pool", site=site, actor=SYSTEM)
    deployment_create(model=model, pool=pool, actor=SYSTEM)
    internal = DataClass.objects.get(name="internal")
    policy = policy_create(team=None, data_class=internal, processing_sites=[site], storage_sites=[site],
                           fine_tuning_allowed=True, actor=SYSTEM)
    user = get_user_model().objects.create_user("ml", password="x" * 16)
    key = api_key_create(user=user, name="ft", actor=SYSTEM)
    published = []
    from citadel.finetuning import tasks

    monkeypatch.setattr(tasks.run_job, "apply_async",
                        lambda args, queue, **kw: published.append((args[0], queue)))
    return SimpleNamespace(site=site, model=model, pool=pool, policy=policy, user=user, key=key.key,
                           published=published, store=tmp_path / "store")


def call(method: str, path: str, key: str, body=None, **extra):
    headers = {"HTTP_AUTHORIZATION": f"Bearer {key}", **extra}
    if body is not None:
        return getattr(Client(), method)(path, json.dumps(body), content_type="application/json", **headers)
    return getattr(Client(), method)(path, **headers)


def _named(content: bytes, name: str):
    handle = io.BytesIO(content)
    handle.name = name
    return handle


def upload(world, content: bytes, name="train.jsonl", purpose="fine-tune"):
    return Client().post("/v1/files", {"file": _named(content, name), "purpose": purpose},
                         HTTP_AUTHORIZATION=f"Bearer {world.key}")


def uploaded(world, lines=None) -> str:
    response = upload(world, jsonl(lines or TRAIN_LINES[:24]))
    assert response.status_code == 200, response.content
    return response.json()["id"]


def create(world, **body):
    return call("post", "/v1/fine_tuning/jobs", world.key, {"model": "demo-v4", **body})


def error_of(response) -> dict:
    return response.json()["error"]


def audits(action: str):
    return list(AuditRecord.objects.filter(action=action).order_by("sequence"))


# -- files ------------------------------------------------------------------------------------------

def test_an_upload_is_validated_stored_at_the_policys_storage_site_and_shown_like_openais(world):
    response = upload(world, jsonl(TRAIN_LINES[:24]))
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["id"].startswith("file-") and body["object"] == "file" and body["purpose"] == "fine-tune"
    assert body["filename"] == "train.jsonl" and body["bytes"] == len(jsonl(TRAIN_LINES[:24]))
    assert body["status"] == "processed" and isinstance(body["created_at"], int)
    report = body["citadel_validation"]
    assert report["ok"] and report["examples"] == 24 and report["total_tokens"] > 0
    assert report["estimated_seconds"] > 0 and report["base_model"] == "demo-v4" and report["errors"] == []
    file = File.objects.get()
    assert Path(file.path).is_relative_to(world.store) and Path(file.path).read_bytes() == jsonl(TRAIN_LINES[:24])
    assert file.site == world.site
    record = audits("finetuning.file.upload")[-1]
    assert record.outcome == "success" and record.target_id == body["id"] and record.details["site"] == "ft-site"
    listed = call("get", "/v1/files", world.key).json()
    assert listed["object"] == "list" and [f["id"] for f in listed["data"]] == [body["id"]]
    assert call("get", f"/v1/files/{body['id']}", world.key).json()["id"] == body["id"]
    content = call("get", f"/v1/files/{body['id']}/content", world.key)
    assert b"".join(content.streaming_content) == jsonl(TRAIN_LINES[:24])


def test_a_malformed_file_is_refused_with_the_bad_lines_numbers_and_nothing_is_kept(world):
    lines = [TRAIN_LINES[0], "{not json", TRAIN_LINES[1], json.dumps({"messages": [{"role": "user", "content": "hi"}]})]
    response = upload(world, jsonl(lines))
    assert response.status_code == 400
    error = error_of(response)
    assert error["param"] == "file" and error["code"] == "invalid_file" and error["type"] == "invalid_request_error"
    assert "line 2" in error["message"] and "line 4" in error["message"] and "2 bad lines" in error["message"]
    assert not File.objects.exists() and not list(world.store.rglob("*.jsonl"))
    record = audits("finetuning.file.upload")[-1]
    assert record.outcome == "failure" and record.details["error"] == "invalid_file"
    assert [e["line"] for e in record.details["errors"]] == [2, 4]


def test_a_file_over_the_size_limit_or_of_another_purpose_is_refused(world, settings):
    settings.CITADEL_FINETUNE_MAX_FILE_BYTES = 100
    response = upload(world, jsonl(TRAIN_LINES[:24]))
    assert response.status_code == 400 and error_of(response)["code"] == "file_too_large"
    assert error_of(response)["param"] == "file" and "CITADEL_FINETUNE_MAX_FILE_BYTES" in error_of(response)["message"]
    response = upload(world, b"x", purpose="assistants")
    assert response.status_code == 400 and error_of(response)["param"] == "purpose"
    assert not File.objects.exists()


def test_an_upload_is_refused_with_403_and_audited_when_the_policy_allows_storage_nowhere(world):
    world.policy.storage_sites.clear()
    response = upload(world, jsonl(TRAIN_LINES[:24]))
    assert response.status_code == 403
    assert error_of(response)["code"] == "residency_denied" and "allows storage only at" in error_of(response)["message"]
    record = audits("finetuning.file.upload")[-1]
    assert record.outcome == "denied" and record.details["data_class"] == "internal"
    assert not File.objects.exists()


def test_a_deleted_file_is_gone_from_the_api_and_from_disk(world, django_capture_on_commit_callbacks):
    file_id = uploaded(world)
    path = Path(File.objects.get().path)
    with django_capture_on_commit_callbacks(execute=True):
        response = call("delete", f"/v1/files/{file_id}", world.key)
    assert response.json() == {"id": file_id, "object": "file", "deleted": True}
    assert not path.exists() and call("get", f"/v1/files/{file_id}", world.key).status_code == 404
    assert audits("finetuning.file.delete")[-1].target_id == file_id


def test_another_users_file_is_not_found(world):
    file_id = uploaded(world)
    other = get_user_model().objects.create_user("other", password="x" * 16)
    key = api_key_create(user=other, name="other", actor=SYSTEM).key
    assert call("get", f"/v1/files/{file_id}", key).status_code == 404
    response = call("post", "/v1/fine_tuning/jobs", key, {"model": "demo-v4", "training_file": file_id})
    assert response.status_code == 400 and error_of(response)["param"] == "training_file"


# -- jobs -------------------------------------------------------------------------------------------

def test_a_job_is_created_queued_sent_to_the_allowed_pool_and_shaped_like_openais(
        world, django_capture_on_commit_callbacks):
    file_id = uploaded(world)
    with django_capture_on_commit_callbacks(execute=True):
        response = create(world, training_file=file_id, suffix="prices", seed=7,
                          hyperparameters={"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 2},
                          citadel={"rank": 4, "alpha": 8, "checkpoint_every": 3})
    assert response.status_code == 200, response.content
    job = response.json()
    assert job["id"].startswith("ftjob-") and job["object"] == "fine_tuning.job" and job["status"] == "queued"
    assert job["model"] == "demo-v4" and job["training_file"] == file_id and job["validation_file"] is None
    assert job["hyperparameters"] == {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 2.0}
    assert job["method"] == {"type": "supervised", "supervised": {"hyperparameters": job["hyperparameters"]}}
    assert job["seed"] == 7 and job["fine_tuned_model"] is None and job["error"] is None
    assert job["trained_tokens"] is None and job["finished_at"] is None and job["result_files"] == []
    row = FineTuningJob.objects.get()
    assert row.config["rank"] == 4 and row.config["alpha"] == 8 and row.config["epochs"] == 2
    assert row.config["learning_rate"] == pytest.approx(2e-3) and row.config["seed"] == 7
    assert row.pool == world.pool and Path(row.output_dir).is_relative_to(world.store)
    assert world.published == [(str(row.id), "pool.ft-pool")]
    record = audits("finetuning.job.create")[-1]
    assert record.outcome == "success" and record.target_id == job["id"]
    assert record.details["residency"]["allowed"] and record.details["residency"]["purpose"] == "fine_tuning"
    events = call("get", f"/v1/fine_tuning/jobs/{job['id']}/events", world.key).json()
    assert events["object"] == "list" and events["data"][0]["object"] == "fine_tuning.job.event"
    assert "queued on pool 'ft-pool'" in events["data"][0]["message"]
    assert "Validated the training file: 24 examples" in events["data"][-1]["message"]


def test_method_supervised_hyperparameters_are_read_like_the_top_level_ones(world):
    file_id = uploaded(world)
    response = create(world, training_file=file_id,
                      method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1}}})
    assert response.status_code == 200 and response.json()["hyperparameters"]["n_epochs"] == 1
    response = create(world, training_file=file_id, method={"type": "dpo"})
    assert response.status_code == 400 and error_of(response)["param"] == "method.type"


def test_an_unknown_or_fine_tuned_base_model_is_refused_with_param_model(world):
    file_id = uploaded(world)
    response = call("post", "/v1/fine_tuning/jobs", world.key, {"model": "gpt-9", "training_file": file_id})
    assert response.status_code == 400
    assert error_of(response)["param"] == "model" and error_of(response)["code"] == "model_not_available"
    assert "gpt-9" in error_of(response)["message"]
    assert not FineTuningJob.objects.exists() and world.published == []
    assert audits("finetuning.job.create")[-1].outcome == "failure"


@pytest.mark.parametrize(("body", "param"), [
    ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"batch_size": "many"}}, "hyperparameters.batch_size"),
    ({"hyperparameters": {"learning_rate_multiplier": -1}}, "hyperparameters.learning_rate_multiplier"),
    ({"hyperparameters": {"warmup": 3}}, "hyperparameters.warmup"),
    ({"citadel": {"rank": 0}}, "citadel.rank"),
    ({"citadel": {"target_modules": "everything"}}, "citadel.target_modules"),
    ({"citadel": {"flux": 1}}, "citadel.flux"),
    ({"suffix": "no spaces please"}, "suffix"),
])
def test_bad_hyperparameters_are_refused_naming_the_field(world, body, param):
    file_id = uploaded(world)
    response = create(world, training_file=file_id, **body)
    assert response.status_code == 400, response.content
    assert error_of(response)["param"] == param, error_of(response)
    assert param.split(".")[-1] in error_of(response)["message"]
    assert not FineTuningJob.objects.exists()


def test_a_dataset_too_large_for_the_quota_is_refused_before_anything_runs(world, settings):
    file_id = uploaded(world)
    settings.CITADEL_FINETUNE_MAX_JOB_TOKENS = 500
    response = create(world, training_file=file_id, hyperparameters={"n_epochs": 3})
    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == "quota_exceeded" and error["param"] == "training_file" and "500" in error["message"]
    settings.CITADEL_FINETUNE_MAX_JOB_TOKENS = 0
    settings.CITADEL_FINETUNE_TEAM_TOKENS_30D = 1_000_000
    assert create(world, training_file=file_id, hyperparameters={"n_epochs": 2}).status_code == 200
    settings.CITADEL_FINETUNE_TEAM_TOKENS_30D = FineTuningJob.objects.get().estimated_tokens * 2
    response = create(world, training_file=file_id, hyperparameters={"n_epochs": 3})
    assert response.status_code == 400 and "last 30 days" in error_of(response)["message"]
    assert FineTuningJob.objects.count() == 1


def test_examples_longer_than_max_seq_len_are_refused_when_none_is_left(world):
    file_id = uploaded(world)
    response = create(world, training_file=file_id, citadel={"max_seq_len": 8})
    assert response.status_code == 400 and error_of(response)["param"] == "training_file"
    assert "max_seq_len" in error_of(response)["message"]


def test_fine_tuning_is_refused_with_403_and_audited_when_the_policy_does_not_allow_it(world):
    file_id = uploaded(world)
    Policy.objects.filter(pk=world.policy.pk).update(fine_tuning_allowed=False)
    response = create(world, training_file=file_id)
    assert response.status_code == 403
    assert error_of(response)["code"] == "residency_denied" and "does not allow fine-tuning" in error_of(response)[
        "message"]
    record = audits("finetuning.job.create")[-1]
    assert record.outcome == "denied" and record.details["residency"]["purpose"] == "fine_tuning"
    assert not FineTuningJob.objects.exists() and world.published == []


def test_fine_tuning_is_refused_where_no_allowed_pool_serves_the_base_model(world):
    file_id = uploaded(world)
    world.policy.processing_sites.clear()
    response = create(world, training_file=file_id)
    assert response.status_code == 403 and "allows processing only at" in error_of(response)["message"]


def test_a_raised_data_class_applies_its_own_policy(world):
    file_id = uploaded(world)
    response = call("post", "/v1/fine_tuning/jobs", world.key, {"model": "demo-v4", "training_file": file_id},
                    HTTP_X_CITADEL_DATA_CLASS="restricted")
    assert response.status_code == 403 and "restricted" in error_of(response)["message"]


def test_jobs_list_newest_first_with_after_and_limit(world):
    file_id = uploaded(world)
    ids = [create(world, training_file=file_id).json()["id"] for _ in range(3)]
    page = call("get", "/v1/fine_tuning/jobs?limit=2", world.key).json()
    assert [j["id"] for j in page["data"]] == ids[::-1][:2] and page["has_more"] is True
    rest = call("get", f"/v1/fine_tuning/jobs?limit=2&after={page['data'][-1]['id']}", world.key).json()
    assert [j["id"] for j in rest["data"]] == [ids[0]] and rest["has_more"] is False
    assert call("get", f"/v1/fine_tuning/jobs/{ids[1]}", world.key).json()["id"] == ids[1]
    assert call("get", "/v1/fine_tuning/jobs/ftjob-nope", world.key).status_code == 404


def test_events_come_newest_first_and_page_with_after(world):
    file_id = uploaded(world)
    job_id = create(world, training_file=file_id).json()["id"]
    job = FineTuningJob.objects.get()
    for step in range(1, 6):
        FineTuningEvent.objects.create(job=job, message=f"step {step}")
    first = call("get", f"/v1/fine_tuning/jobs/{job_id}/events?limit=2", world.key).json()
    assert [e["message"] for e in first["data"]] == ["step 5", "step 4"] and first["has_more"]
    after = call("get", f"/v1/fine_tuning/jobs/{job_id}/events?limit=3&after={first['data'][-1]['id']}",
                 world.key).json()
    assert [e["message"] for e in after["data"]] == ["step 3", "step 2", "step 1"]


def test_a_queued_job_is_cancelled_at_once_and_a_finished_one_cannot_be(world):
    file_id = uploaded(world)
    job_id = create(world, training_file=file_id).json()["id"]
    response = call("post", f"/v1/fine_tuning/jobs/{job_id}/cancel", world.key)
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    assert response.json()["finished_at"] is not None
    assert audits("finetuning.job.cancel")[-1].target_id == job_id
    again = call("post", f"/v1/fine_tuning/jobs/{job_id}/cancel", world.key)
    assert again.status_code == 400 and error_of(again)["code"] == "job_not_cancellable"
    from citadel.finetuning.services import job_claim

    assert job_claim(job_id=FineTuningJob.objects.get().id, worker_name="w") is None  # it never starts


def test_a_file_in_use_by_an_unfinished_job_cannot_be_deleted(world):
    file_id = uploaded(world)
    create(world, training_file=file_id)
    response = call("delete", f"/v1/files/{file_id}", world.key)
    assert response.status_code == 400 and error_of(response)["code"] == "file_in_use"


def test_integrations_are_refused_rather_than_ignored(world):
    file_id = uploaded(world)
    response = create(world, training_file=file_id, integrations=[{"type": "wandb", "wandb": {"project": "x"}}])
    assert response.status_code == 400 and error_of(response)["param"] == "integrations"


# -- the management API --------------------------------------------------------------------------------

def test_the_management_api_offers_the_same_to_a_signed_in_user(world):
    client = Client()
    client.force_login(world.user)
    response = client.post("/api/v1/fine-tuning/files/", {"file": _named(jsonl(TRAIN_LINES[:24]), "t.jsonl")})
    assert response.status_code == 201, response.content
    file_id = response.json()["id"]
    assert response.json()["report"]["examples"] == 24 and response.json()["site"] == "ft-site"
    response = client.post("/api/v1/fine-tuning/jobs/", json.dumps({"model": "demo-v4", "training_file": file_id,
                                                                     "hyperparameters": {"n_epochs": 1}}),
                           content_type="application/json")
    assert response.status_code == 201, response.content
    job_id = response.json()["id"]
    jobs = client.get("/api/v1/fine-tuning/jobs/").json()
    assert [j["id"] for j in jobs["results"]] == [job_id] and jobs["has_more"] is False
    assert client.get(f"/api/v1/fine-tuning/jobs/{job_id}/events/").json()["results"]
    assert client.get(f"/api/v1/fine-tuning/jobs/{job_id}/metrics/").json() == []
    assert client.post(f"/api/v1/fine-tuning/jobs/{job_id}/cancel/").json()["status"] == "cancelled"
    response = client.post("/api/v1/fine-tuning/jobs/", json.dumps({"model": "demo-v4", "training_file": file_id,
                                                                     "citadel": {"rank": -1}}),
                           content_type="application/json")
    assert response.status_code == 400 and response.json()["field"] == "citadel.rank"
    schema = client.get("/api/schema/").content.decode()
    assert "/api/v1/fine-tuning/jobs/{job_id}/cancel/" in schema


def test_the_embedded_install_lets_keys_without_a_team_fine_tune_the_demo_model(tmp_path, settings,
                                                                               django_capture_on_commit_callbacks):
    from django.core.management import call_command

    settings.DATA_DIR = tmp_path / "data"
    call_command("bootstrap")
    call_command("bootstrap")  # twice: nothing new
    user = get_user_model().objects.create_user("ml", password="x" * 16)
    key = api_key_create(user=user, name="ft", actor=SYSTEM).key
    response = Client().post("/v1/files", {"file": _named(jsonl(TRAIN_LINES[:16]), "t.jsonl"),
                                           "purpose": "fine-tune"}, HTTP_AUTHORIZATION=f"Bearer {key}")
    assert response.status_code == 200, response.content
    assert Path(File.objects.get().path).is_relative_to(tmp_path / "data" / "storage" / "local")
    with django_capture_on_commit_callbacks(execute=False):
        job = call("post", "/v1/fine_tuning/jobs", key, {"model": "citadel-demo", "training_file": response.json()[
            "id"]})
    assert job.status_code == 200, job.content
    assert FineTuningJob.objects.get().pool.name == "local"
