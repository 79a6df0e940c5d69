"""A job longer than the broker's redelivery timeout is not run twice, with Redis (visibility
timeout 3 s here) and RabbitMQ (consumer_timeout 8 s here) as the broker.

The broker hands the unacknowledged message out again while the fine-tuning job still trains; the
redelivered message finds the job running under a live lease and is acknowledged without running
it. The job's start and completion are each recorded once, and it ran on one attempt."""

import time
import uuid

import pytest

from tests.chaos.conftest import RABBITMQ_CONSUMER_TIMEOUT_MS, REDIS_VISIBILITY_SECONDS
from tests.chaos.test_worker_kills import fine_tune, fine_tune_side_effects

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(1200)]


def test_a_job_longer_than_the_brokers_redelivery_timeout_runs_once(chaos_stack, request):
    broker = request.node.callspec.params["chaos_stack"]
    timeout = REDIS_VISIBILITY_SECONDS if broker == "redis" else RABBITMQ_CONSUMER_TIMEOUT_MS / 1000
    job_id = fine_tune(chaos_stack, examples=24, checkpoint_every=100)
    started = time.monotonic()
    chaos_stack.wait(lambda: chaos_stack.sql("SELECT 1 FROM finetuning_finetuningjob WHERE id = %s AND status IN "
                                             "('succeeded', 'failed', 'cancelled')", (job_id,)), 900,
                     "the long fine-tuning job finishing", interval=1.0)
    ran = chaos_stack.sql("SELECT extract(epoch FROM finished_at - started_at) FROM finetuning_finetuningjob "
                          "WHERE id = %s", (job_id,))[0][0]
    effects = fine_tune_side_effects(chaos_stack, job_id)
    status, attempts, step, total, error = effects["job"]
    assert status == "succeeded", (error, chaos_stack.log_tail())
    assert float(ran) > 2 * timeout, f"the job ran {ran} s, not longer than the broker's timeout of {timeout} s"
    starts = chaos_stack.sql("SELECT count(*) FROM audit_auditrecord WHERE action = 'finetuning.job.start' "
                             "AND target_id = %s", (f"ftjob-{job_id.replace('-', '')}",))[0][0]
    assert attempts == 1 and starts == 1, (attempts, starts)
    assert effects["completions"] == [("success",)] and len(effects["models"]) == 1, effects
    # The broker did hand the message out again, and the worker that got it ran nothing.
    logs = "".join(path.read_text(errors="replace") for path in chaos_stack.logs().glob("chaos-*.log"))
    redelivered = logs.count(f"fine-tuning job {uuid.UUID(job_id)} is not queued any more")
    assert redelivered >= 1, f"no redelivery seen in {time.monotonic() - started:.0f} s:\n{chaos_stack.log_tail()}"
    print(f"\nCHAOS redelivery broker={broker} job_ran={float(ran):.0f}s timeout={timeout}s "
          f"redelivered={redelivered} attempts={attempts}")
