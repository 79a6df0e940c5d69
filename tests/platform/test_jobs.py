"""Jobs: the database holds the truth, a redelivered message does nothing, a dead worker fails its job."""

from datetime import timedelta

import pytest
from django.utils import timezone

from citadel.audit.models import AuditRecord
from citadel.audit.services import Actor
from citadel.jobs.models import InferenceChunk, InferenceJob
from citadel.jobs.selectors import Delta, Finished, job_follow
from citadel.jobs.services import job_append_chunk, job_claim, job_succeed
from citadel.jobs.tasks import run_inference
from citadel.registry.models import Worker
from citadel.registry.services import deployment_create, model_register, pool_create, worker_heartbeat
from citadel.registry.tasks import workers_mark_stale

pytestmark = pytest.mark.django_db


@pytest.fixture
def job(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "deepseek_v4"}')
    model = model_register(name="m", path=str(tmp_path), actor=Actor.system())
    pool = pool_create(name="p", site="s", actor=Actor.system())
    deployment = deployment_create(model=model, pool=pool, actor=Actor.system())
    return InferenceJob.objects.create(kind="chat", model=model, deployment=deployment, pool=pool,
                                       payload={"messages": [{"role": "user", "content": "hi"}], "sampling": {}})


def test_a_job_is_claimed_once_and_a_redelivered_message_finds_nothing_to_do(job):
    assert job_claim(job_id=job.id, worker_name="p@a").status == "running"
    assert job_claim(job_id=job.id, worker_name="p@b") is None
    job.refresh_from_db()
    assert job.worker_name == "p@a" and job.attempts == 1


def test_the_task_does_nothing_for_a_job_that_already_finished(job):
    job_claim(job_id=job.id, worker_name="p@a")
    job_succeed(job=job, text="done", finish_reason="stop", prompt_tokens=1, completion_tokens=1)
    run_inference.run(str(job.id))  # a redelivery after completion
    job.refresh_from_db()
    assert job.status == "succeeded" and job.text == "done" and job.attempts == 1


def test_a_generated_nul_character_is_stored_as_a_replacement_character_with_its_bytes_kept(job):
    """PostgreSQL's text and jsonb refuse NUL; a model can generate it, and the job must not fail for it."""
    job_claim(job_id=job.id, worker_name="p@a")
    entry = {"token": "a\x00", "logprob": -0.1, "bytes": [97, 0], "top_logprobs": [
        {"token": "\x00", "logprob": -0.1, "bytes": [0]}]}
    job_append_chunk(job=job, index=0, text="a\x00", logprobs=[entry])
    job_succeed(job=job, text="a\x00b", finish_reason="stop", prompt_tokens=1, completion_tokens=2,
                logprobs=[entry])
    job.refresh_from_db()
    assert job.text == "a\ufffdb" and job.status == "succeeded"
    stored = job.logprobs[0]
    assert stored["token"] == "a\ufffd" and stored["bytes"] == [97, 0] and stored["top_logprobs"][0]["bytes"] == [0]
    assert InferenceChunk.objects.get(job=job, index=0).text == "a\ufffd"


def test_following_a_job_yields_its_chunks_in_order_then_the_final_row(job):
    job_claim(job_id=job.id, worker_name="p@a")
    for index, text in enumerate(["Hel", "lo", "!"]):
        InferenceChunk.objects.create(job=job, index=index, text=text)
    job_succeed(job=job, text="Hello!", finish_reason="stop", prompt_tokens=2, completion_tokens=3)
    events = list(job_follow(job_id=job.id))
    assert [e.text for e in events if isinstance(e, Delta)] == ["Hel", "lo", "!"]
    assert isinstance(events[-1], Finished) and events[-1].job.status == "succeeded"
    assert AuditRecord.objects.filter(action="inference.chat.complete", outcome="success").exists()


def test_a_job_whose_worker_stopped_beating_fails_instead_of_hanging(job):
    worker_heartbeat(name="p@a", pool_name="p", hostname="h", pid=1, loaded_models=[])
    Worker.objects.update(last_heartbeat=timezone.now() - timedelta(minutes=5))
    job_claim(job_id=job.id, worker_name="p@a")
    final = list(job_follow(job_id=job.id, timeout=30))[-1].job
    assert final.status == "failed" and final.error_code == "worker_lost"
    assert AuditRecord.objects.filter(action="inference.chat.complete", outcome="failure").exists()


def test_beat_marks_silent_workers_offline_and_audits_it():
    pool_create(name="p", site="s", actor=Actor.system())
    worker_heartbeat(name="p@a", pool_name="p", hostname="h", pid=1, loaded_models=[])
    assert AuditRecord.objects.filter(action="worker.online", target_id="p@a").count() == 1
    worker_heartbeat(name="p@a", pool_name="p", hostname="h", pid=1, loaded_models=[])
    assert AuditRecord.objects.filter(action="worker.online", target_id="p@a").count() == 1
    Worker.objects.update(last_heartbeat=timezone.now() - timedelta(minutes=5))
    assert workers_mark_stale() == 1
    assert Worker.objects.get().status == "offline"
    assert AuditRecord.objects.filter(action="worker.offline", target_id="p@a").exists()


def test_a_job_whose_message_was_lost_is_sent_again_and_failed_after_too_many_tries(job):
    from citadel.celery import app
    from citadel.jobs.services import jobs_redispatch_queued

    InferenceJob.objects.filter(pk=job.pk).update(dispatch_count=1,
                                                  dispatched_at=timezone.now() - timedelta(minutes=1))
    with app.connection_for_write() as conn:
        conn.SimpleQueue("pool.p").clear()
        assert jobs_redispatch_queued(older_than=timedelta(seconds=30), max_dispatches=3) == 1
        message = conn.SimpleQueue("pool.p").get(timeout=2)
        assert message.payload[0] == [str(job.id)]
        message.ack()
    job.refresh_from_db()
    assert job.dispatch_count == 2 and job.status == "queued"
    InferenceJob.objects.filter(pk=job.pk).update(dispatch_count=3,
                                                  dispatched_at=timezone.now() - timedelta(minutes=1))
    assert jobs_redispatch_queued(older_than=timedelta(seconds=30), max_dispatches=3) == 0
    job.refresh_from_db()
    assert job.status == "failed" and job.error_code == "worker_lost"
