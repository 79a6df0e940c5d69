"""SIGKILL a worker mid-inference and mid-fine-tune, with Redis and with RabbitMQ as the broker:
every job reaches a terminal state within the lease plus 5 minutes, none is lost, and none has
duplicate side effects (usage rows, audit completion records, a fine-tuned model registered twice).

The killed worker comes back under the same name, as a supervisor would restart it; the jobs it
held are found by beat's reconciler when their leases expire and run again on a live worker."""

import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.chaos.conftest import rounds
from tests.chaos.stack import LEASE_SECONDS, WORKERS, check_no_duplicate_side_effects

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(3600)]

ROOT = Path(__file__).resolve().parents[2]
TRAIN = (ROOT / "models" / "demo-v4" / "finetune" / "train.jsonl").read_text().splitlines()
BOUND = LEASE_SECONDS + 300  # the bound: the lease plus 5 minutes


WAVES = 5  # of `requests` chats each, sent until the victim is seen running one


def _running_on(stack, victim: str) -> list:
    return [row[0] for row in stack.sql("SELECT id FROM jobs_inferencejob WHERE status = 'running' AND worker_name = %s",
                                        (victim,))]


def _kill_round(stack, victim: str, first_seed: int, requests: int = 4) -> list:
    """Kill `victim` while it runs a job; the answers. The worker killed in the round before may
    still be starting again: its restart overlaps this round, and the jobs held here wait for a
    live worker like any others (the bound below still applies).

    A job of 16 tokens takes a few tenths of a second, and the broker may hand all of a wave's jobs
    to the other worker: a wave can be answered without the victim being seen running one of them
    (1 round in 90 of the first 100-kill run). Then another wave is sent."""
    stack.wait_worker_online(victim)  # a live worker to kill mid-job
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=requests * WAVES) as pool:
        futures, held = [], []
        for wave in range(WAVES):
            futures += [pool.submit(stack.chats, [first_seed + wave * requests + i], 16) for i in range(requests)]
            stack.wait(lambda wave=futures: _running_on(stack, victim) or all(f.done() for f in wave), 120,
                       f"{victim} running a job, or the wave answered", interval=0.05)
            held = _running_on(stack, victim)
            if held:
                break
        assert held, f"{victim} was never seen running a job in {WAVES} waves of {requests} chats"
        stack.kill_worker(victim)  # and started again, as its supervisor would; it rejoins while others run its jobs
        killed = time.monotonic()
        results = [future.result()[0] for future in futures]
    answered = time.monotonic()
    for job_id in held:
        stack.wait(lambda job_id=job_id: stack.sql("SELECT 1 FROM jobs_inferencejob WHERE id = %s AND status IN "
                                                   "('succeeded', 'failed')", (job_id,)),
                   max(1.0, BOUND - (time.monotonic() - killed)), f"job {job_id} of the killed worker finishing")
    print(f"CHAOS round victim={victim} held={len(held)} running_after={killed - started:.1f}s "
          f"answered_after_kill={answered - killed:.1f}s held_done_after_kill={time.monotonic() - killed:.1f}s",
          flush=True)
    return results


def test_a_worker_killed_mid_inference_loses_no_job_and_runs_none_twice(chaos_stack, request):
    broker = request.node.callspec.params["chaos_stack"]
    statuses = Counter()
    kills = rounds("inference", broker)
    for round_ in range(kills):
        for result in _kill_round(chaos_stack, WORKERS[round_ % 2], first_seed=1000 * round_):
            assert isinstance(result, httpx.Response), f"a request ended without an answer: {result!r}"
            statuses[result.status_code] += 1
            # A job the worker was running is run again; it fails (503, retry) only if it ran out of attempts.
            assert result.status_code in (200, 503), (result.status_code, result.text)
    chaos_stack.wait(lambda: not chaos_stack.sql("SELECT 1 FROM jobs_inferencejob WHERE status IN ('queued', 'running')"),
                     BOUND, "every job finishing")
    for name in WORKERS:  # the last victim back, for the next test
        chaos_stack.wait_worker_online(name)
    counts = check_no_duplicate_side_effects(chaos_stack)
    assert counts["requeued"] >= 1, counts  # the kills did land mid-job
    print(f"\nCHAOS inference kills={kills} broker={broker} http={dict(statuses)} jobs={json.dumps(counts)}")


def _upload(stack, lines: list[str]) -> str:
    response = httpx.post(f"{stack.base_url}/v1/files", headers={"Authorization": f"Bearer {stack.api_key}"},
                          data={"purpose": "fine-tune"}, timeout=60,
                          files={"file": ("train.jsonl", ("\n".join(lines) + "\n").encode(), "application/jsonl")})
    assert response.status_code == 200, response.text
    return response.json()["id"]


def fine_tune(stack, *, examples: int, checkpoint_every: int, epochs: int = 1) -> str:
    """Create a fine-tuning job of demo-v4 (batches of 2); its database id."""
    file_id = _upload(stack, TRAIN[:examples])
    response = httpx.post(f"{stack.base_url}/v1/fine_tuning/jobs", headers={"Authorization": f"Bearer {stack.api_key}"},
                          timeout=60, json={"model": "demo-v4", "training_file": file_id, "seed": 1,
                                            "hyperparameters": {"n_epochs": epochs, "batch_size": 2},
                                            "citadel": {"checkpoint_every": checkpoint_every, "rank": 4}})
    assert response.status_code == 200, response.text
    return response.json()["id"].removeprefix("ftjob-")


def fine_tune_side_effects(stack, job_id: str) -> dict:
    hex_id = job_id.replace("-", "")
    return {
        "completions": stack.sql("SELECT outcome FROM audit_auditrecord WHERE action = 'finetuning.job.complete' "
                                 "AND target_id = %s", (f"ftjob-{hex_id}",)),
        "models": stack.sql("SELECT name FROM registry_model WHERE name LIKE %s", (f"ft:demo-v4:%:{hex_id[:10]}",)),
        "job": stack.sql("SELECT status, attempts, step, total_steps, error_message FROM finetuning_finetuningjob "
                         "WHERE id = %s", (job_id,))[0],
    }


def test_a_worker_killed_mid_fine_tune_resumes_the_job_and_registers_its_model_once(redis_stack):
    stack = redis_stack
    for round_ in range(rounds("fine_tune", "redis")):
        job_id = fine_tune(stack, examples=16, checkpoint_every=2)
        stack.wait(lambda job_id=job_id: stack.sql("SELECT 1 FROM finetuning_finetuningcheckpoint WHERE job_id = %s",
                                                   (job_id,)),
                   300, "the first checkpoint")
        victim = stack.sql("SELECT worker_name FROM finetuning_finetuningjob WHERE id = %s", (job_id,))[0][0]
        stack.kill_worker(victim)
        killed = time.monotonic()
        stack.wait(lambda job_id=job_id: stack.sql("SELECT 1 FROM finetuning_finetuningjob WHERE id = %s AND status IN "
                                     "('succeeded', 'failed', 'cancelled')", (job_id,)), BOUND,
                   "the fine-tuning job of the killed worker finishing", interval=1.0)
        took = time.monotonic() - killed
        effects = fine_tune_side_effects(stack, job_id)
        status, attempts, step, total, error = effects["job"]
        assert status == "succeeded", (error, stack.log_tail())
        assert attempts >= 2 and step == total, effects
        assert effects["completions"] == [("success",)], effects
        assert len(effects["models"]) == 1, effects
        print(f"\nCHAOS fine-tune kill round={round_} job={job_id} attempts={attempts} recovered_in={took:.0f}s")
        stack.wait_worker_online(victim)
