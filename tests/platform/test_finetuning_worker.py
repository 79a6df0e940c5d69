"""The worker side of fine-tuning, in process: the task trains demo-v4 for real and records events,
checkpoints and the adapter; duplicates do nothing; cancel is seen within a second; beat's sweep
requeues a job whose worker died or fails it with the reason; a fine-tuned model's chat request
carries its adapter to its base model's deployment. A real worker killed mid-job is in
tests/e2e/test_finetuning_e2e.py."""

import json
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from django.utils import timezone

from citadel.audit.models import AuditRecord
from citadel.finetuning import services, tasks
from citadel.finetuning.models import File, FineTuningCheckpoint, FineTuningEvent, FineTuningJob
from citadel.jobs.models import InferenceJob
from citadel.registry.models import Model, Worker
from citadel.registry.services import model_variant_register, worker_heartbeat
from citadel.residency.models import Policy
from tests.platform import test_finetuning_api as api
from tests.platform.test_finetuning_api import TRAIN_LINES, call, create, uploaded

pytestmark = pytest.mark.django_db
world = api.world  # the same fixture: demo-v4 on ft-pool, a policy allowing fine-tuning, a key


@pytest.fixture
def job(world, django_capture_on_commit_callbacks):
    """A queued job over 16 examples: 2 steps of 8, a checkpoint after each."""
    file_id = uploaded(world, TRAIN_LINES[:16])
    with django_capture_on_commit_callbacks(execute=True):
        response = create(world, training_file=file_id, suffix="prices",
                          hyperparameters={"n_epochs": 1, "batch_size": 8}, citadel={"checkpoint_every": 1})
    assert response.status_code == 200, response.content
    return FineTuningJob.objects.get(pk=response.json()["id"].removeprefix("ftjob-"))


def actions(job) -> list[str]:
    return list(AuditRecord.objects.filter(target_id=job.openai_id).order_by("sequence")
                .values_list("action", flat=True))


def test_the_task_trains_records_progress_and_checkpoints_and_registers_the_adapter(world, job):
    job.validation_file = File.objects.get(pk=uploaded(world, TRAIN_LINES[16:24]).removeprefix("file-"))
    job.save(update_fields=["validation_file"])
    tasks.run_job(str(job.id))
    job.refresh_from_db()
    assert job.status == "succeeded", (job.error_code, job.error_message)
    assert job.valid_loss > 0  # evaluated on the validation file at the end
    assert job.trained_tokens > 0 and job.step == 2 and job.finished_at and job.attempts == 1
    variant = job.fine_tuned_model
    assert variant.name == f"ft:demo-v4:prices:{job.id.hex[:10]}" and variant.base == world.model
    assert variant.path == world.model.path and (Path(variant.adapter_path) / "adapter_config.json").is_file()
    metrics = [e.data for e in FineTuningEvent.objects.filter(job=job, type="metrics").order_by("id")
               if "train_loss" in e.data]
    assert [m["step"] for m in metrics] == [1, 2]
    for point in metrics:
        assert point["train_loss"] > 0 and point["learning_rate"] > 0 and point["tokens_per_second"] > 0
        assert point["eta_seconds"] is not None and point["total_steps"] == 2
    # A checkpoint after step 1; the last step ends with the adapter itself.
    assert list(FineTuningCheckpoint.objects.filter(job=job).values_list("step", flat=True)) == [1]
    body = call("get", f"/v1/fine_tuning/jobs/{job.openai_id}", world.key).json()
    assert body["status"] == "succeeded" and body["fine_tuned_model"] == variant.name
    assert body["trained_tokens"] == job.trained_tokens and isinstance(body["finished_at"], int)
    checkpoints = call("get", f"/v1/fine_tuning/jobs/{job.openai_id}/checkpoints", world.key).json()
    first = checkpoints["data"][0]
    assert first["object"] == "fine_tuning.job.checkpoint" and first["step_number"] == 1
    assert first["fine_tuning_job_id"] == job.openai_id and first["metrics"]["step"] == 1.0
    assert first["metrics"]["train_loss"] > 0
    assert first["fine_tuned_model_checkpoint"].endswith(":ckpt-step-1") and first["id"].startswith("ftckpt-")
    messages = [e["message"] for e in call("get", f"/v1/fine_tuning/jobs/{job.openai_id}/events?limit=50",
                                                 world.key).json()["data"]]
    assert messages[0] == "The job has successfully completed."
    assert any(m.startswith("Fine-tuning started on worker") for m in messages)
    assert any(m.startswith("training 16 examples") for m in messages)  # the trainer's own messages too
    assert actions(job) == ["finetuning.job.create", "finetuning.job.start", "finetuning.checkpoint.create",
                            "finetuning.job.complete"]
    assert AuditRecord.objects.filter(action="model.variant.register", target_id=variant.name).exists()
    assert variant.name in [m["id"] for m in call("get", "/v1/models", world.key).json()["data"]]
    [results] = body["result_files"]
    listed = call("get", "/v1/files?purpose=fine-tune-results", world.key).json()["data"]
    assert [f["id"] for f in listed] == [results] and listed[0]["purpose"] == "fine-tune-results"
    csv = b"".join(call("get", f"/v1/files/{results}/content", world.key).streaming_content).decode()
    rows = csv.splitlines()
    assert rows[0] == "step,train_loss,valid_loss,learning_rate,tokens_per_second" and rows[1].startswith("1,")
    assert len(rows) == 4  # two steps and the evaluation


def test_a_redelivered_message_does_nothing_for_a_job_that_is_running_or_finished(job):
    assert services.job_claim(job_id=job.id, worker_name="w1") is not None
    assert services.job_claim(job_id=job.id, worker_name="w2") is None
    tasks.run_job(str(job.id))  # a duplicate delivery: not queued, so not touched
    job.refresh_from_db()
    assert job.status == "running" and job.worker_name == "w1" and job.attempts == 1


def test_a_worker_busy_training_sends_another_job_back_to_its_queue(world, job, monkeypatch):
    monkeypatch.setattr(tasks, "_slots", SimpleNamespace(acquire=lambda timeout: False))
    world.published.clear()
    tasks.run_job(str(job.id))  # no slot free in this process
    job.refresh_from_db()
    assert job.status == "queued" and job.attempts == 0 and world.published == [(str(job.id), "pool.ft-pool")]


def test_the_trainer_is_told_to_stop_within_a_second_of_a_cancel(world, job):
    job = services.job_claim(job_id=job.id, worker_name="w1")
    progress = tasks._Progress(job, "w1")
    assert progress.should_stop() is False
    services.job_cancel(job=job, actor=services.Actor.system("test"))
    progress._checked -= tasks.CANCEL_POLL_SECONDS  # the next poll is due
    assert progress.should_stop() is True and progress.stop_reason == "not_ours"
    services.job_stopped(job_id=job.id, worker_name="w1", step=3)
    job.refresh_from_db()
    assert job.status == "cancelled" and job.stopped_at is not None
    assert FineTuningEvent.objects.filter(job=job, message="Training stopped at step 3 after the cancel.").exists()
    assert AuditRecord.objects.filter(action="finetuning.job.stopped", target_id=job.openai_id).exists()


def test_a_worker_shutting_down_hands_its_job_back_to_resume_elsewhere(world, job, monkeypatch,
                                                                      django_capture_on_commit_callbacks):
    job = services.job_claim(job_id=job.id, worker_name="w1")
    services.job_checkpoint_record(job_id=job.id, worker_name="w1", step=1, path="/x/step-1")
    progress = tasks._Progress(job, "w1")
    monkeypatch.setattr(tasks, "_shutting_down", SimpleNamespace(is_set=lambda: True))
    assert progress.should_stop() and progress.stop_reason == "shutdown"
    world.published.clear()
    with django_capture_on_commit_callbacks(execute=True):
        assert services.job_release(job_id=job.id, worker_name="w1", step=1)
    job.refresh_from_db()
    assert job.status == "queued" and job.attempts == 0 and world.published == [(str(job.id), "pool.ft-pool")]
    assert "is shutting down at step 1" in FineTuningEvent.objects.filter(job=job).first().message
    assert AuditRecord.objects.get(action="finetuning.job.requeue").details["reason"] == "worker shutting down"


def test_a_queued_job_does_not_start_where_the_policy_no_longer_allows_it(world, job):
    world.policy.processing_sites.clear()
    assert services.job_claim(job_id=job.id, worker_name="w1") is None
    job.refresh_from_db()
    assert job.status == "failed" and job.error_code == "residency_denied" and job.attempts == 0
    assert "Not started: Policy" in job.error_message and job.started_at is None
    assert AuditRecord.objects.filter(action="finetuning.job.complete", outcome="failure",
                                      target_id=job.openai_id).exists()


def _running_on_dead_worker(job, worker="w1"):
    job = services.job_claim(job_id=job.id, worker_name=worker)
    long_ago = timezone.now() - timedelta(minutes=5)
    FineTuningJob.objects.filter(pk=job.pk).update(started_at=long_ago, last_progress_at=long_ago)
    return job


def test_a_job_whose_worker_died_is_requeued_to_resume_from_its_checkpoint(world, job,
                                                                           django_capture_on_commit_callbacks):
    job = _running_on_dead_worker(job)
    services.job_checkpoint_record(job_id=job.id, worker_name="w1", step=1, path="/x/step-1")
    worker_heartbeat(name="ft-pool@other", pool_name="ft-pool", hostname="h", pid=2, loaded_models=[])
    world.published.clear()
    with django_capture_on_commit_callbacks(execute=True):
        assert services.jobs_recover() == {"requeued": 1, "failed": 0, "resent": 0}
    job.refresh_from_db()
    assert job.status == "queued" and job.worker_name == "" and world.published == [(str(job.id), "pool.ft-pool")]
    event = FineTuningEvent.objects.filter(job=job).first()
    assert "Worker w1 stopped responding" in event.message and "Resuming from step 1" in event.message
    record = AuditRecord.objects.filter(action="finetuning.job.requeue").get()
    assert record.details["resume_step"] == 1 and record.details["worker"] == "w1"
    claimed = services.job_claim(job_id=job.id, worker_name="ft-pool@other")
    assert claimed.attempts == 2
    assert "Resuming from the checkpoint at step 1" in FineTuningEvent.objects.filter(job=job).first().message


def test_a_job_that_lost_its_workers_too_often_fails_with_the_reason(world, job, settings):
    settings.CITADEL_FINETUNE_MAX_ATTEMPTS = 1
    job = _running_on_dead_worker(job)
    assert services.jobs_recover()["failed"] == 1
    job.refresh_from_db()
    assert job.status == "failed" and job.error_code == "worker_lost"
    assert "Worker w1 stopped responding" in job.error_message and "CITADEL_FINETUNE_MAX_ATTEMPTS=1" in job.error_message
    body = call("get", f"/v1/fine_tuning/jobs/{job.openai_id}", world.key).json()
    assert body["status"] == "failed" and body["error"]["code"] == "worker_lost"
    assert AuditRecord.objects.filter(action="finetuning.job.complete", outcome="failure",
                                      target_id=job.openai_id).exists()


def test_a_job_whose_worker_is_alive_is_left_alone_but_not_after_that_worker_restarted(world, job):
    job = services.job_claim(job_id=job.id, worker_name="ft-pool@alive", pid=3)
    worker_heartbeat(name="ft-pool@alive", pool_name="ft-pool", hostname="h", pid=3, loaded_models=[])
    FineTuningJob.objects.filter(pk=job.pk).update(last_progress_at=timezone.now() - timedelta(minutes=5))
    assert services.jobs_recover() == {"requeued": 0, "failed": 0, "resent": 0}
    job.refresh_from_db()
    assert job.status == "running"
    worker_heartbeat(name="ft-pool@alive", pool_name="ft-pool", hostname="h", pid=4, loaded_models=[])
    assert services.jobs_recover()["requeued"] == 1
    job.refresh_from_db()
    assert job.status == "queued"
    assert "restarted (process 3 is gone, 4 runs now)" in FineTuningEvent.objects.filter(job=job).first().message


def test_a_lost_message_is_sent_again_and_a_revoked_policy_fails_the_queued_job(world, job):
    worker_heartbeat(name="ft-pool@w", pool_name="ft-pool", hostname="h", pid=4, loaded_models=[])
    FineTuningJob.objects.filter(pk=job.pk).update(dispatched_at=timezone.now() - timedelta(minutes=5))
    world.published.clear()
    assert services.jobs_recover()["resent"] == 1 and world.published == [(str(job.id), "pool.ft-pool")]
    Policy.objects.filter(pk=world.policy.pk).update(fine_tuning_allowed=False)
    FineTuningJob.objects.filter(pk=job.pk).update(dispatched_at=timezone.now() - timedelta(minutes=5))
    assert services.jobs_recover()["failed"] == 1
    job.refresh_from_db()
    assert job.status == "failed" and job.error_code == "residency_denied"


def test_a_fine_tuned_model_runs_on_its_base_deployment_with_its_adapter(world, monkeypatch):
    variant = model_variant_register(base=world.model, name="ft:demo-v4:x:0123456789", adapter_path="/a/x",
                                     actor=services.Actor.system("test"))
    worker_heartbeat(name="ft-pool@w", pool_name="ft-pool", hostname="h", pid=5, loaded_models=[])
    from citadel.gateway import apis as gateway

    monkeypatch.setattr("citadel.jobs.services._publish", lambda job: None)

    def finished(*, job_id, timeout=None):
        InferenceJob.objects.filter(pk=job_id).update(status="succeeded", text="ok", finish_reason="stop")
        return InferenceJob.objects.get(pk=job_id)

    monkeypatch.setattr(gateway, "job_wait", finished)
    response = call("post", "/v1/chat/completions", world.key,
                    {"model": variant.name, "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 200, response.content
    assert response.json()["model"] == variant.name
    inference = InferenceJob.objects.get()
    assert inference.model == variant and inference.deployment.model == world.model
    assert inference.payload["adapter"] == {"name": variant.name, "path": "/a/x"}
    ids = [m["id"] for m in call("get", "/v1/models", world.key).json()["data"]]
    assert ids == ["demo-v4", variant.name]
    assert Model.objects.get(name="demo-v4").deployments.count() == 1  # the variant has none of its own


def test_the_inference_task_passes_a_lora_request_only_for_a_fine_tuned_model(world, tmp_path):
    from citadel.jobs.tasks import _events

    (tmp_path / "a").mkdir()  # the adapter's files, checked against their manifest first (test_adapter_manifest.py)
    (tmp_path / "a" / "adapter_config.json").write_text("{}")
    model_variant_register(base=world.model, name="ft:a", adapter_path=str(tmp_path / "a"),
                           actor=services.Actor.system("test"))

    class Engine:
        def stream_chat(self, messages, params, **kwargs):
            return kwargs

    plain = SimpleNamespace(kind="chat", payload={"messages": [], "sampling": {}}, team_id=None, api_key_id=None)
    assert _events(Engine(), plain) == {}
    tuned = SimpleNamespace(kind="chat", payload={"messages": [], "sampling": {}, "adapter": {"name": "ft:a", "path":
                                                                                                str(tmp_path / "a")}},
                            team_id=None, api_key_id=None)
    request = _events(Engine(), tuned)["lora_request"]
    assert (request.name, request.path) == ("ft:a", str(tmp_path / "a"))


def test_events_written_by_the_worker_read_back_as_openai_events(world, job):
    job = services.job_claim(job_id=job.id, worker_name="w1")
    assert services.job_progress(job_id=job.id, worker_name="w1", event={
        "type": "metrics", "step": 3, "total_steps": 10, "epoch": 1, "loss": 1.5, "learning_rate": 1e-3,
        "tokens_per_second": 400.0, "eta_seconds": 7.0})
    assert services.job_progress(job_id=job.id, worker_name="w1", event={"type": "eval", "step": 3,
                                                                         "valid_loss": 1.7})
    assert not services.job_progress(job_id=job.id, worker_name="w2", event={"type": "message", "text": "x"})
    events = call("get", f"/v1/fine_tuning/jobs/{job.openai_id}/events?limit=2", world.key).json()["data"]
    assert events[0]["type"] == "metrics" and events[0]["data"] == {"step": 3, "valid_loss": 1.7}
    assert events[1]["data"]["train_loss"] == 1.5 and events[1]["message"].startswith("Step 3/10: training loss=1.5")
    body = call("get", f"/v1/fine_tuning/jobs/{job.openai_id}", world.key).json()
    assert body["status"] == "running" and body["estimated_finish"] > 0 and body["citadel"]["valid_loss"] == 1.7
    assert json.dumps(body)  # plain JSON all the way down
    assert Worker.objects.count() == 0


def test_a_fine_tuned_model_is_usable_only_by_those_who_can_see_its_job(world, job):
    from django.contrib.auth import get_user_model

    from citadel.accounts.services import api_key_create

    services.job_claim(job_id=job.id, worker_name="w1")
    result = SimpleNamespace(adapter_dir="/a/x", steps=2, train_loss=1.0, valid_loss=None, trained_tokens=10)
    name = services.job_succeed(job_id=job.id, worker_name="w1", result=result).fine_tuned_model.name
    worker_heartbeat(name="ft-pool@w", pool_name="ft-pool", hostname="h", pid=6, loaded_models=[])
    assert name in [m["id"] for m in call("get", "/v1/models", world.key).json()["data"]]
    assert call("get", f"/v1/models/{name}", world.key).status_code == 200
    other = get_user_model().objects.create_user("other", password="x" * 16)
    key = api_key_create(user=other, name="other", actor=services.Actor.system("test")).key
    assert [m["id"] for m in call("get", "/v1/models", key).json()["data"]] == ["demo-v4"]
    assert call("get", f"/v1/models/{name}", key).status_code == 404
    response = call("post", "/v1/chat/completions", key, {"model": name, "messages": [{"role": "user",
                                                                                      "content": "hi"}]})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    assert not InferenceJob.objects.exists()
