"""A job longer than the broker's redelivery timeout is not run twice, with Redis (visibility
timeout 3 s here) and RabbitMQ (consumer_timeout 8 s here; RabbitMQ checks it about once a
minute) as the broker.

A long fine-tuning job trains while the broker hands its unacknowledged message out again; the
redelivered message finds the job running under a live lease and is acknowledged without running
it. The job is then cancelled (it would train for a long time): it ran on one attempt, started
once, and no worker ever claimed it a second time."""

import time
import uuid

import httpx
import pytest

from tests.chaos.conftest import RABBITMQ_CONSUMER_TIMEOUT_MS, REDIS_VISIBILITY_SECONDS, ROUNDS
from tests.chaos.test_worker_kills import fine_tune

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(1200)]


def _redeliveries(stack, job_id: str) -> int:
    logs = "".join(path.read_text(errors="replace") for path in stack.logs().glob("chaos-*.log"))
    return logs.count(f"fine-tuning job {uuid.UUID(job_id)} is not queued any more")


def test_a_job_longer_than_the_brokers_redelivery_timeout_runs_once(chaos_stack, request):
    broker = request.node.callspec.params["chaos_stack"]
    if broker == "rabbitmq" and ROUNDS < 10:
        pytest.skip("make chaos runs the RabbitMQ case (about two minutes: RabbitMQ checks its consumer timeout "
                    "once a minute); make test runs the Redis one")
    timeout = REDIS_VISIBILITY_SECONDS if broker == "redis" else RABBITMQ_CONSUMER_TIMEOUT_MS / 1000
    job_id = fine_tune(chaos_stack, examples=24, checkpoint_every=1000, epochs=100)
    chaos_stack.wait(lambda: chaos_stack.sql("SELECT 1 FROM finetuning_finetuningjob WHERE id = %s AND status = "
                                             "'running'", (job_id,)), 300, "the long job starting")
    started = time.monotonic()
    chaos_stack.wait(lambda: _redeliveries(chaos_stack, job_id), timeout + 180,
                     "the broker handing the message out again", interval=1.0)
    waited = time.monotonic() - started
    status, attempts = chaos_stack.sql("SELECT status, attempts FROM finetuning_finetuningjob WHERE id = %s",
                                       (job_id,))[0]
    assert (status, attempts) == ("running", 1), "the redelivered message must not have touched the running job"
    time.sleep(2 * timeout if broker == "redis" else 5)  # more redeliveries may come; none may run it
    cancelled = httpx.post(f"{chaos_stack.base_url}/v1/fine_tuning/jobs/ftjob-{job_id}/cancel", timeout=60,
                           headers={"Authorization": f"Bearer {chaos_stack.api_key}"})
    assert cancelled.status_code == 200, cancelled.text
    chaos_stack.wait(lambda: chaos_stack.sql("SELECT 1 FROM finetuning_finetuningjob WHERE id = %s AND "
                                             "stopped_at IS NOT NULL", (job_id,)), 120, "training stopping")
    status, attempts, step = chaos_stack.sql("SELECT status, attempts, step FROM finetuning_finetuningjob "
                                             "WHERE id = %s", (job_id,))[0]
    starts = chaos_stack.sql("SELECT count(*) FROM audit_auditrecord WHERE action = 'finetuning.job.start' "
                             "AND target_id = %s", (f"ftjob-{job_id.replace('-', '')}",))[0][0]
    assert status == "cancelled" and attempts == 1 and starts == 1, (status, attempts, starts)
    redelivered = _redeliveries(chaos_stack, job_id)
    print(f"\nCHAOS redelivery broker={broker} timeout={timeout}s first_redelivery_after={waited:.0f}s "
          f"redelivered={redelivered} attempts={attempts} trained_steps={step}")
