"""Leases and the reconciler: a dead worker's job is taken back within a bounded time, re-enqueued
or failed with the reason; a live lease keeps a redelivered message from running the job twice;
a worker that lost its lease records nothing (the attempt fences its writes)."""

from datetime import timedelta

import pytest
from django.test import override_settings
from django.utils import timezone

from citadel.audit.models import AuditRecord
from citadel.audit.services import Actor
from citadel.jobs.leases import LeaseKeeper, lease_is_live
from citadel.jobs.models import InferenceChunk, InferenceJob, JobLease
from citadel.jobs.reconcile import jobs_reconcile
from citadel.jobs.services import job_append_chunk, job_claim, job_fail, job_succeed
from citadel.jobs.tasks import run_inference
from citadel.registry.services import deployment_create, model_register, pool_create
from citadel.usage.models import UsageRecord
from tests.platform import test_batches

pytestmark = pytest.mark.django_db


@pytest.fixture
def job(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "deepseek_v4"}')
    model = model_register(name="m", path=str(tmp_path), actor=Actor.system())
    pool = pool_create(name="p", site="s", actor=Actor.system())
    deployment = deployment_create(model=model, pool=pool, actor=Actor.system())
    return InferenceJob.objects.create(kind="chat", model=model, deployment=deployment, pool=pool,
                                       payload={"messages": [{"role": "user", "content": "hi"}], "sampling": {}})


def expire(job_id) -> None:
    JobLease.objects.filter(job_id=str(job_id)).update(expires_at=timezone.now() - timedelta(seconds=1))


def test_claiming_a_job_takes_a_lease_that_the_job_ending_releases(job):
    claimed = job_claim(job_id=job.id, worker_name="p@a")
    lease = JobLease.objects.get(kind="inference", job_id=str(job.id))
    assert lease.worker_name == "p@a" and lease.attempt == 1 and lease.expires_at > timezone.now()
    job_succeed(job=claimed, text="ok", finish_reason="stop", prompt_tokens=1, completion_tokens=1, attempt=1)
    assert not JobLease.objects.filter(job_id=str(job.id)).exists()


def test_a_redelivered_message_for_a_job_under_a_live_lease_runs_nothing(job):
    job_claim(job_id=job.id, worker_name="p@a")
    run_inference.run(str(job.id))  # the broker hands the message out again while the job runs
    job.refresh_from_db()
    assert job.status == "running" and job.attempts == 1 and job.worker_name == "p@a"
    assert lease_is_live(kind="inference", job_id=job.id)


def test_the_reconciler_leaves_a_job_with_a_live_lease_alone(job):
    job_claim(job_id=job.id, worker_name="p@a")
    assert jobs_reconcile()["inference_requeued"] == 0
    job.refresh_from_db()
    assert job.status == "running"


def test_a_job_whose_lease_expired_goes_back_to_the_queue_without_its_partial_output(job, django_capture_on_commit_callbacks):
    job_claim(job_id=job.id, worker_name="p@a")
    job_append_chunk(job=job, index=0, text="partial")
    expire(job.id)
    with django_capture_on_commit_callbacks(execute=True):
        counts = jobs_reconcile()
    assert counts["inference_requeued"] == 1
    job.refresh_from_db()
    assert job.status == "queued" and job.worker_name == "" and job.dispatch_count == 1
    assert not InferenceChunk.objects.filter(job=job).exists()
    assert not JobLease.objects.filter(job_id=str(job.id)).exists()
    record = AuditRecord.objects.get(action="inference.chat.requeue")
    assert record.details["worker"] == "p@a" and "stopped renewing its lease" in record.details["reason"]


def test_the_worker_that_lost_its_lease_records_nothing_once_another_attempt_runs(job, django_capture_on_commit_callbacks):
    first = job_claim(job_id=job.id, worker_name="p@a")
    expire(job.id)
    with django_capture_on_commit_callbacks(execute=True):
        jobs_reconcile()
    second = job_claim(job_id=job.id, worker_name="p@b")
    assert second.attempts == 2
    # The first worker was only slow: its result and its failure are both refused.
    job_succeed(job=first, text="late", finish_reason="stop", prompt_tokens=1, completion_tokens=1, attempt=1)
    assert not job_fail(job_id=job.id, code="engine_error", message="late", actor=Actor.system("p@a"), attempt=1)
    job_succeed(job=second, text="ok", finish_reason="stop", prompt_tokens=1, completion_tokens=2, attempt=2)
    job.refresh_from_db()
    assert job.status == "succeeded" and job.text == "ok"
    assert UsageRecord.objects.filter(source=f"job:{job.pk.hex}").count() == 1
    assert AuditRecord.objects.filter(action="inference.chat.complete", details__job=str(job.id)).count() == 1


@override_settings(CITADEL_JOB_MAX_ATTEMPTS=2)
def test_a_job_is_failed_with_the_reason_after_its_attempts_are_used(job, django_capture_on_commit_callbacks):
    for worker in ("p@a", "p@b"):
        job_claim(job_id=job.id, worker_name=worker)
        expire(job.id)
        with django_capture_on_commit_callbacks(execute=True):
            jobs_reconcile()
    job.refresh_from_db()
    assert job.status == "failed" and job.error_code == "worker_lost" and job.attempts == 2
    assert "tried 2 times" in job.error_message and "CITADEL_JOB_MAX_ATTEMPTS" in job.error_message


def test_a_streamed_job_whose_client_already_saw_output_is_failed_not_run_again(job):
    InferenceJob.objects.filter(pk=job.pk).update(stream=True)
    job_claim(job_id=job.id, worker_name="p@a")
    job_append_chunk(job=job, index=0, text="seen by the client")
    expire(job.id)
    assert jobs_reconcile()["inference_failed"] == 1
    job.refresh_from_db()
    assert job.status == "failed" and job.error_code == "worker_lost" and "already streamed" in job.error_message


def test_a_running_job_without_a_lease_is_taken_back_after_one_lease_time(job, django_capture_on_commit_callbacks):
    job_claim(job_id=job.id, worker_name="p@a")
    JobLease.objects.all().delete()  # killed between the claim and the lease, or claimed by an older release
    assert jobs_reconcile()["inference_requeued"] == 0  # not yet: it may have just been claimed
    InferenceJob.objects.filter(pk=job.pk).update(started_at=timezone.now() - timedelta(hours=1))
    with django_capture_on_commit_callbacks(execute=True):
        assert jobs_reconcile()["inference_requeued"] == 1


def test_the_keeper_renews_held_leases_and_marks_one_taken_back_as_lost(job):
    claimed = job_claim(job_id=job.id, worker_name="p@a")
    keeper = LeaseKeeper()  # not started: the test turns the crank
    held = keeper.hold(kind="inference", job_id=job.id, attempt=claimed.attempts)
    JobLease.objects.update(expires_at=timezone.now() + timedelta(seconds=1))
    keeper.renew_now()
    assert JobLease.objects.get().expires_at > timezone.now() + timedelta(seconds=30)
    assert not held.lost.is_set()
    JobLease.objects.update(attempt=2)  # the reconciler took it back and another worker claimed it
    keeper.renew_now()
    assert held.lost.is_set()
    keeper.drop(held)


batch_world = test_batches.world  # demo-v4 on b-pool; published batch ids collected, not sent


def test_the_lines_of_a_batch_chunk_whose_lease_expired_go_back_to_pending_and_recorded_ones_stay(batch_world):
    from citadel.batches.models import BatchRequest
    from citadel.batches.services import lines_claim, lines_record
    from citadel.jobs.leases import lease_acquire

    response = test_batches.create(batch_world, [test_batches.line(f"l{i}", "Hello") for i in range(4)])
    batch_id = response.json()["id"].removeprefix("batch_")
    done = lines_claim(batch_id=batch_id, claim="b-pool@w1#done", limit=2)
    lines_record(batch_id=batch_id, claim="b-pool@w1#done", results={
        line.pk: {"text": "ok", "finish_reason": "stop", "prompt_tokens": 1, "completion_tokens": 1} for line in done})
    held = lines_claim(batch_id=batch_id, claim="b-pool@w1#dead", limit=2)
    lease_acquire(kind="batch", job_id=f"{batch_id}:dead", worker_name="b-pool@w1#dead", attempt=1)
    assert jobs_reconcile()["batch_lines_released"] == 0  # the lease is live: the chunk is still being worked on
    expire(f"{batch_id}:dead")
    assert jobs_reconcile()["batch_lines_released"] == 2
    statuses = dict(BatchRequest.objects.filter(batch_id=batch_id).values_list("pk", "status"))
    assert {statuses[line.pk] for line in held} == {"pending"} and {statuses[line.pk] for line in done} == {"succeeded"}
    assert not JobLease.objects.filter(kind="batch").exists()
    # The dead claim's late results are refused: the lines are no longer its own.
    assert lines_record(batch_id=batch_id, claim="b-pool@w1#dead", results={
        line.pk: {"text": "late", "finish_reason": "stop", "prompt_tokens": 1, "completion_tokens": 1}
        for line in held}) == 0
