"""End to end: LoRA fine-tuning with the official openai client against gunicorn, a real Celery
worker, PostgreSQL and Redis, on demo-v4: upload, create, follow events to `succeeded`, chat with
the fine-tuned model; cancel; and a worker SIGKILLed mid-job whose job resumes from its last
checkpoint on another worker. `citadel finetuning recover` plays beat."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from citadel.finetuning.models import FineTuningCheckpoint, FineTuningJob
from citadel.registry.models import Worker
from tests import live_stack as ls
from tests.conftest import database_url, port_open, require

pytestmark = [pytest.mark.e2e, pytest.mark.django_db]

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "models" / "demo-v4"
POOL = "ft-e2e"
TRAIN = (DEMO / "finetune" / "train.jsonl").read_text().splitlines()


class Stack:
    def __init__(self, live: ls.LiveStack, processes: list):
        self.live, self.processes = live, processes

    @property
    def worker(self):
        return self.processes[0]

    def start_worker(self, name: str):
        process = ls.start([sys.executable, "-m", "citadel.cli", "worker", "--pool", POOL, "--name", name,
                            "--concurrency", "4", "--loglevel", "info"], self.live.env,
                           self.live.logs / f"worker-{name.replace('@', '-')}.log")
        self.processes.append(process)
        return process


@pytest.fixture(scope="module")
def stack(django_db_setup, django_db_blocker, tmp_path_factory):
    """gunicorn + a worker of pool ft-e2e (site ft-site, storage in a temp folder) serving demo-v4;
    keys without a team may process, store and fine-tune internal data there."""
    import redis
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.db import connection

    from citadel.accounts.services import api_key_create
    from citadel.audit.services import Actor
    from citadel.registry.services import deployment_create, model_register, pool_create
    from citadel.residency.models import DataClass
    from citadel.residency.services import policy_create, site_create

    require(connection.vendor == "postgresql", "PostgreSQL on 127.0.0.1:5432")
    require(port_open("127.0.0.1", 6379), "Redis on 127.0.0.1:6379")
    redis.Redis.from_url(ls.REDIS_URL).flushdb()
    logs = tmp_path_factory.mktemp("ft-logs")
    env = ls.process_env(database_url(), tmp_path_factory.mktemp("ft-data"))
    env["CITADEL_FINETUNE_DEVICE"] = "cpu"
    system = Actor.system("e2e")
    with django_db_blocker.unblock():
        user = get_user_model().objects.create_user("ft-e2e", password="ft-e2e-password-123")
        site = site_create(name="ft-site", jurisdiction="EU", storage_path=str(tmp_path_factory.mktemp("ft-store")),
                           actor=system)
        model = model_register(name="demo-v4", path=str(DEMO), actor=system)
        pool = pool_create(name=POOL, site=site, actor=system)
        deployment_create(model=model, pool=pool, actor=system, engine_settings={"device": "cpu"})
        policy_create(team=None, data_class=DataClass.objects.get(name="internal"), actor=system,
                      processing_sites=[site], storage_sites=[site], fine_tuning_allowed=True, prompt_retention="full")
        key = api_key_create(user=user, name="ft-e2e", actor=system).key
    live, processes = ls.launch(env=env, pool=POOL, api_key=key, logs=logs)
    try:
        with django_db_blocker.unblock():
            ls.wait_until(lambda: Worker.objects.filter(pool__name=POOL, status="online")
                          .exclude(loaded_models=[]).exists(), 120, "the worker coming online with demo-v4", live)
        yield Stack(live, processes)
    finally:
        ls.stop(processes)
        with django_db_blocker.unblock():
            call_command("flush", interactive=False, verbosity=0)
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                               "WHERE datname = current_database() AND pid <> pg_backend_pid()")


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=stack.live.v1, api_key=stack.live.api_key, max_retries=0, timeout=120)


def upload(client, lines: list[str]) -> str:
    handle = io.BytesIO(("\n".join(lines) + "\n").encode())
    handle.name = "train.jsonl"
    file = client.files.create(file=handle, purpose="fine-tune")
    assert file.status == "processed" and file.purpose == "fine-tune"
    return file.id


def wait_for(predicate, timeout: float, what: str, stack: Stack, interval: float = 0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} did not happen within {timeout}s\n{stack.live.log_tail()}")


def all_events(client, job_id: str) -> list:
    """Every event, oldest first, paging with `after` like a client following a job."""
    return list(reversed(list(client.fine_tuning.jobs.list_events(job_id, limit=100).data)))


def test_the_openai_client_fine_tunes_demo_v4_and_chats_with_the_result(client, stack):
    file_id = upload(client, TRAIN[:48])
    assert client.files.retrieve(file_id).model_extra["citadel_validation"]["examples"] == 48
    job = client.fine_tuning.jobs.create(model="demo-v4", training_file=file_id, suffix="e2e", seed=3,
                                         hyperparameters={"n_epochs": 1, "batch_size": 8},
                                         extra_body={"citadel": {"checkpoint_every": 2, "rank": 4}})
    assert job.status in ("queued", "running") and job.model == "demo-v4" and job.seed == 3
    statuses = set()

    def finished():
        current = client.fine_tuning.jobs.retrieve(job.id)
        statuses.add(current.status)
        return current if current.status in ("succeeded", "failed", "cancelled") else None

    done = wait_for(finished, 180, "the fine-tuning job finishing", stack, interval=0.5)
    assert done.status == "succeeded", (done.error, stack.live.log_tail())
    assert "running" in statuses or "queued" in statuses
    assert done.fine_tuned_model == f"ft:demo-v4:e2e:{job.id.removeprefix('ftjob-')[:10]}"
    assert done.trained_tokens > 0 and done.finished_at >= done.created_at
    events = all_events(client, job.id)
    steps = [e.data["step"] for e in events if e.type == "metrics" and "train_loss" in (e.data or {})]
    assert steps == list(range(1, 7))
    assert all(e.data["tokens_per_second"] > 0 for e in events if e.type == "metrics" and "train_loss" in e.data)
    assert events[-1].message == "The job has successfully completed."
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [4, 2]
    assert done.fine_tuned_model in [m.id for m in client.models.list()]
    reply = client.chat.completions.create(model=done.fine_tuned_model, max_tokens=8, temperature=0,
                                           messages=[{"role": "user", "content": "What's the list price of the "
                                                                                 "Mistral Barometer?"}])
    assert reply.model == done.fine_tuned_model and reply.choices[0].message.content
    page = client.fine_tuning.jobs.list(limit=10)
    assert job.id in [j.id for j in page.data]


def test_a_cancelled_job_stops_training_within_seconds(client, stack):
    file_id = upload(client, TRAIN[:64])
    job = client.fine_tuning.jobs.create(model="demo-v4", training_file=file_id,
                                         hyperparameters={"n_epochs": 3, "batch_size": 2})
    wait_for(lambda: any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(job.id).data), 90,
             "the first training step", stack)
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    started = time.monotonic()
    row = wait_for(lambda: FineTuningJob.objects.filter(pk=job.id.removeprefix("ftjob-"),
                                                        stopped_at__isnull=False).first(), 15,
                   "the worker stopping the training", stack, interval=0.1)
    assert time.monotonic() - started < 8  # about a second on a quiet machine; this one is shared
    events = all_events(client, job.id)
    stopped = next(i for i, e in enumerate(events) if e.message.startswith("Training stopped at step"))
    cancel = next(i for i, e in enumerate(events) if e.message.startswith("Job cancelled"))
    assert cancel < stopped and not [e for e in events[cancel:] if e.type == "metrics"]
    time.sleep(1)
    final = client.fine_tuning.jobs.retrieve(job.id)
    assert final.status == "cancelled" and final.fine_tuned_model is None
    assert row.step < row.total_steps


def recover(stack: Stack) -> dict:
    """Beat's sweep, run as beat would: in its own process (this test's writes would stay uncommitted)."""
    done = subprocess.run([sys.executable, "-m", "citadel.cli", "finetuning", "recover"], env=stack.live.env,
                          capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_job_whose_worker_is_killed_resumes_from_its_checkpoint_on_another_worker(client, stack):
    file_id = upload(client, TRAIN[:48])
    job = client.fine_tuning.jobs.create(model="demo-v4", training_file=file_id,
                                         hyperparameters={"n_epochs": 1, "batch_size": 2},
                                         extra_body={"citadel": {"checkpoint_every": 4}})
    pk = job.id.removeprefix("ftjob-")
    wait_for(lambda: FineTuningCheckpoint.objects.filter(job_id=pk, step__gte=4).exists(), 120,
             "the first checkpoint", stack, interval=0.1)
    victim = FineTuningJob.objects.get(pk=pk).worker_name
    os.kill(stack.worker.pid, signal.SIGKILL)
    stack.worker.wait(timeout=10)
    killed_at = FineTuningJob.objects.get(pk=pk)
    assert killed_at.status == "running" and killed_at.step < 24
    resumed_from = FineTuningCheckpoint.objects.filter(job_id=pk).order_by("-step").first().step
    stack.start_worker(f"{POOL}@second")
    wait_for(lambda: Worker.objects.filter(name=f"{POOL}@second", status="online").exists(), 120,
             "the second worker coming online", stack)

    def recovered():
        recover(stack)
        return FineTuningJob.objects.filter(pk=pk, attempts=2).exists()

    # The test settings call a worker gone 10 s after its last heartbeat.
    wait_for(recovered, 60, "the job being requeued and claimed by the second worker", stack, interval=1.0)
    done = wait_for(lambda: (lambda j: j if j.status in ("succeeded", "failed") else None)(
        client.fine_tuning.jobs.retrieve(job.id)), 180, "the resumed job finishing", stack, interval=0.5)
    assert done.status == "succeeded", done.error
    row = FineTuningJob.objects.get(pk=pk)
    assert row.worker_name == f"{POOL}@second" and row.attempts == 2 and row.step == 24
    messages = [e.message for e in all_events(client, job.id)]
    assert any(f"Worker {victim} stopped responding" in m for m in messages)
    assert f"Resuming from the checkpoint at step {resumed_from} on worker {POOL}@second (attempt 2)." in messages
    assert any(m.startswith(f"resumed from checkpoint step-{resumed_from}") for m in messages), messages
