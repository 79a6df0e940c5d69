"""Batches end to end: the official openai client against gunicorn, a real Celery worker, PostgreSQL
and Redis. Upload, create, follow to completed, outputs equal to one-by-one requests at temperature 0,
malformed lines in the error file with their line numbers; cancel; a SIGKILLed worker's lines run
on another worker, none lost and none twice."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta

import openai
import pytest
from django.utils import timezone

from citadel.audit.models import AuditRecord
from citadel.batches.models import BatchRequest
from tests import live_stack as ls

pytestmark = [pytest.mark.e2e, pytest.mark.django_db]

PROMPTS = ["Hello there", "Tell me a story", "What is two plus two?", "Name a colour", "Good morning",
           "Write a haiku", "Count to five", "Who are you?"]


@pytest.fixture(scope="module")
def small_chunks():
    """Chunks of 4 lines, two in flight, so a cancel or a kill lands between chunks (read by the worker)."""
    saved = {name: os.environ.get(name) for name in ("CITADEL_BATCH_CHUNK_LINES", "CITADEL_BATCH_FEEDERS")}
    os.environ.update(CITADEL_BATCH_CHUNK_LINES="4", CITADEL_BATCH_FEEDERS="2")
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="module")
def client(small_chunks, live_stack, django_db_blocker, tmp_path_factory):
    from citadel.residency.models import Site

    with django_db_blocker.unblock():  # batch files are stored at the pool's site: give it a storage folder
        Site.objects.filter(name="site-a").update(storage_path=str(tmp_path_factory.mktemp("batch-store")))
    return openai.OpenAI(base_url=live_stack.v1, api_key=live_stack.api_key, max_retries=0, timeout=120)


def chat_line(custom_id: str, prompt: str, max_tokens: int = 8) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": "tiny", "messages": [{"role": "user", "content": prompt}],
                                "max_tokens": max_tokens, "temperature": 0}})


def submit(client, lines: list[str]):
    data = io.BytesIO(("\n".join(lines) + "\n").encode())
    uploaded = client.files.create(file=("batch.jsonl", data), purpose="batch")
    assert uploaded.purpose == "batch"
    return client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                 completion_window="24h", metadata={"suite": "e2e"})


def follow(client, batch_id: str, until=("completed", "failed", "cancelled", "expired"), timeout: float = 240):
    deadline, seen = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if not seen or seen[-1] != batch.request_counts.completed:
            seen.append(batch.request_counts.completed)
        if batch.status in until:
            return batch, seen
        time.sleep(0.3)
    raise AssertionError(f"batch {batch_id} did not finish: {client.batches.retrieve(batch_id)}")


def jsonl(client, file_id: str) -> list[dict]:
    return [json.loads(raw) for raw in client.files.content(file_id).text.splitlines()]


def test_a_batch_runs_to_completed_and_its_outputs_match_one_by_one_requests(client):
    lines = [chat_line(f"req-{i}", prompt) for i, prompt in enumerate(PROMPTS)]
    lines.insert(3, "{this is not json")
    lines.insert(6, json.dumps({"custom_id": "bad-body", "method": "POST", "url": "/v1/chat/completions",
                                "body": {"model": "tiny", "messages": []}}))
    batch = submit(client, lines)
    assert batch.status in ("validating", "in_progress") and batch.request_counts.total == len(lines)
    done, seen = follow(client, batch.id)
    assert done.status == "completed", done
    assert done.request_counts.completed == len(PROMPTS) and done.request_counts.failed == 2
    assert done.completed_at and done.finalizing_at and done.in_progress_at and done.metadata == {"suite": "e2e"}
    assert seen == sorted(seen)  # progress only grows
    output = jsonl(client, done.output_file_id)
    assert [o["custom_id"] for o in output] == [f"req-{i}" for i in range(len(PROMPTS))]
    for i, prompt in enumerate(PROMPTS):
        alone = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],
                                               max_tokens=8, temperature=0)
        body = output[i]["response"]["body"]
        assert body["choices"][0]["message"]["content"] == alone.choices[0].message.content, prompt
        assert body["usage"]["completion_tokens"] == alone.usage.completion_tokens
        assert body["usage"]["prompt_tokens"] == alone.usage.prompt_tokens
    errors = jsonl(client, done.error_file_id)
    assert [(e["error"]["line"], e["custom_id"]) for e in errors] == [(4, None), (7, "bad-body")]
    assert done.usage.total_tokens == sum(o["response"]["body"]["usage"]["total_tokens"] for o in output)
    listed = client.batches.list(limit=5)
    assert done.id in [b.id for b in listed.data]


def test_a_cancelled_batch_stops_between_chunks_and_keeps_what_finished(client):
    lines = [chat_line(f"c-{i}", PROMPTS[i % len(PROMPTS)], max_tokens=24) for i in range(120)]
    batch = submit(client, lines)
    follow(client, batch.id, until=("in_progress",), timeout=30)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    done, _ = follow(client, batch.id, timeout=120)
    assert done.status == "cancelled" and done.cancelled_at
    assert done.request_counts.completed < 120
    if done.request_counts.completed:
        assert len(jsonl(client, done.output_file_id)) == done.request_counts.completed
    assert AuditRecord.objects.filter(action="batch.cancelled", target_id=batch.id).exists()


def test_a_killed_workers_lines_run_on_another_worker_once_each(client, live_stack):
    from citadel.registry.models import Worker

    lines = [chat_line(f"k-{i}", PROMPTS[i % len(PROMPTS)], max_tokens=24) for i in range(60)]
    batch = submit(client, lines)
    pk = batch.id[len("batch_"):]
    deadline = time.monotonic() + 240  # the first chunk of 4 lines: 24+ engine steps, slow on a loaded machine
    while not BatchRequest.objects.filter(batch_id=pk, status="succeeded").exists():
        assert time.monotonic() < deadline, live_stack.log_tail()
        time.sleep(0.1)
    worker = Worker.objects.get(name=f"{live_stack.pool}@e2e")
    os.kill(worker.pid, signal.SIGKILL)
    assert BatchRequest.objects.filter(batch_id=pk).exclude(status="succeeded").exists()
    replacement = ls.start([sys.executable, "-m", "citadel.cli", "worker", "--pool", live_stack.pool, "--name",
                            f"{live_stack.pool}@e2e-2", "--concurrency", "4", "--loglevel", "info"],
                           live_stack.env, live_stack.logs / "worker-2.log")
    try:
        ls.wait_until(lambda: Worker.objects.filter(name=f"{live_stack.pool}@e2e-2", status="online")
                      .exclude(loaded_models=[]).exists(), 90, "the second worker online", live_stack)
        # The killed worker is silent from now on: wait until it counts as gone (stale after 10 s in tests).
        ls.wait_until(lambda: timezone.now() - Worker.objects.get(pk=worker.pk).last_heartbeat
                      > timedelta(seconds=11), 30, "the killed worker's heartbeat going stale", live_stack)
        recover = subprocess.run([sys.executable, "-m", "citadel.cli", "batches", "recover", "--resend-after", "0"],
                                 env=live_stack.env, capture_output=True, text=True, check=True)  # plays beat
        recovered = json.loads(recover.stdout.strip().splitlines()[-1])
        assert recovered["resent"] == 1, (recovered, list(BatchRequest.objects.filter(batch_id=pk).exclude(
            status="succeeded").values_list("status", "worker_name")), list(Worker.objects.values_list(
                "name", "status", "last_heartbeat")))
        done, _ = follow(client, batch.id, timeout=600)  # 60 lines on one worker; minutes on a loaded machine
        assert done.status == "completed" and done.request_counts.completed == 60, live_stack.log_tail()
        output = jsonl(client, done.output_file_id)
        assert sorted(o["custom_id"] for o in output) == sorted(f"k-{i}" for i in range(60))
        from citadel.usage.models import UsageRecord

        metered = UsageRecord.objects.filter(source__startswith=f"batch:{pk.replace('-', '')}:")
        assert sum(r.requests for r in metered) == 60
        assert sum(r.prompt_tokens + r.completion_tokens for r in metered) == done.usage.total_tokens
    finally:
        ls.stop([replacement])
