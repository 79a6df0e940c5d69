"""Usage totals equal the sum of the tokens the API returned, under concurrency: many chat and
completion requests (some streamed) at once through gunicorn and a real worker, and a batch
running beside them; the ledger, the usage API and its CSV agree with what the client was told."""

import concurrent.futures
import csv
import io
import json
import time

import openai
import pytest
from django.test import Client

pytestmark = [pytest.mark.e2e, pytest.mark.django_db]


@pytest.fixture(scope="module")
def client(live_stack, django_db_blocker, tmp_path_factory):
    from citadel.residency.models import Site

    with django_db_blocker.unblock():  # committed, for gunicorn to see: batch files are stored at site-a
        Site.objects.filter(name="site-a").update(storage_path=str(tmp_path_factory.mktemp("usage-store")))
    return openai.OpenAI(base_url=live_stack.v1, api_key=live_stack.api_key, max_retries=0, timeout=120)


def one(client, i: int) -> int:
    """Tokens the API reported for request i (chat, completion or streamed chat with include_usage)."""
    if i % 3 == 0:
        reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"Hi {i}"}],
                                               max_tokens=4 + i % 5, temperature=0)
        return reply.usage.total_tokens
    if i % 3 == 1:
        reply = client.completions.create(model="tiny", prompt=f"Count {i}", max_tokens=3 + i % 4, temperature=0)
        return reply.usage.total_tokens
    # The tiny random model can emit a NUL character that a streamed job's chunk rows cannot hold on
    # PostgreSQL (a known limitation of the jobs app); this prompt is one test_openai_api streams too.
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello there"}],
                                            max_tokens=4 + i % 8, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    return [chunk.usage.total_tokens for chunk in stream if chunk.usage][-1]


def run_batch(client) -> int:
    lines = [json.dumps({"custom_id": f"u{i}", "method": "POST", "url": "/v1/completions",
                         "body": {"model": "tiny", "prompt": f"Batch {i}", "max_tokens": 5, "temperature": 0}})
             for i in range(10)]
    uploaded = client.files.create(file=("u.jsonl", io.BytesIO("\n".join(lines).encode())), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h")
    deadline = time.monotonic() + 120
    while (batch := client.batches.retrieve(batch.id)).status != "completed":
        assert time.monotonic() < deadline, batch
        time.sleep(0.3)
    output = [json.loads(raw) for raw in client.files.content(batch.output_file_id).text.splitlines()]
    return sum(line["response"]["body"]["usage"]["total_tokens"] for line in output)


def test_usage_totals_equal_the_tokens_the_api_returned_under_concurrency(client, live_stack):
    from django.contrib.auth import get_user_model

    from citadel.usage.models import UsageRecord

    with concurrent.futures.ThreadPoolExecutor(max_workers=10) as pool:
        batch = pool.submit(run_batch, client)
        returned = sum(pool.map(lambda i: one(client, i), range(24)))
        returned += batch.result()
    records = UsageRecord.objects.all()
    assert sum(r.prompt_tokens + r.completion_tokens for r in records) == returned
    assert sum(r.requests for r in records) == 24 + 10
    admin = Client()
    admin.force_login(get_user_model().objects.get(username="e2e-admin"))
    body = admin.get("/api/v1/usage/?by=kind").json()
    assert body["total"]["total_tokens"] == returned and body["total"]["requests"] == 34
    assert {row["group"] for row in body["rows"]} == {"inference", "batch"}
    rows = list(csv.DictReader(io.StringIO(admin.get("/api/v1/usage/export.csv").content.decode())))
    assert sum(int(row["total_tokens"]) for row in rows) == returned
