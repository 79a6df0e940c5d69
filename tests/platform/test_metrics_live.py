"""/metrics of a running Citadel (gunicorn with two processes and a real worker): a scrape before and
after a small load shows every family of the issue present, and the ones the load moves moving."""

import io
import json
import os
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [pytest.mark.e2e, pytest.mark.django_db]

FAMILIES = [
    "citadel_http_request_duration_seconds",  # request latency by route and status
    "citadel_queue_depth",  # per pool
    "citadel_inference_jobs",  # jobs by state
    "citadel_batches",
    "citadel_worker_heartbeat_age_seconds", "citadel_worker_last_heartbeat_timestamp_seconds",
    "citadel_engine_tokens", "citadel_engine_tokens_per_second", "citadel_generated_tokens",
    "citadel_time_to_first_token_seconds", "citadel_inter_token_latency_seconds",
    "citadel_engine_batch_size", "citadel_engine_running",  # running batch sizes
    "citadel_engine_kv_cache_usage_ratio", "citadel_engine_lora_loads",  # KV and adapter use
    "citadel_audit_append_seconds",
]


def scrape(base: str) -> dict[str, dict[tuple, float]]:
    """{family: {(sample name, labels...): value}} of one scrape."""
    text = httpx.get(f"{base}/metrics", timeout=30).text
    families = {}
    for family in text_string_to_metric_families(text):
        samples = families.setdefault(family.name, {})
        for sample in family.samples:
            samples[(sample.name, *sorted(sample.labels.items()))] = sample.value
    return families


def total(families: dict, family: str, suffix: str = "_count", **labels) -> float:
    return sum(value for (name, *pairs), value in families.get(family, {}).items()
               if name == family + suffix and all((k, v) in pairs for k, v in labels.items()))


@pytest.fixture(scope="module")
def worker_port():
    """The worker serves its own metrics here (read from the environment the live stack copies)."""
    from tests.live_stack import free_port

    port = free_port()
    saved = os.environ.get("CITADEL_WORKER_METRICS_PORT")
    os.environ["CITADEL_WORKER_METRICS_PORT"] = str(port)
    yield port
    if saved is None:
        os.environ.pop("CITADEL_WORKER_METRICS_PORT", None)
    else:
        os.environ["CITADEL_WORKER_METRICS_PORT"] = saved


@pytest.fixture(scope="module")
def client(worker_port, live_stack, django_db_blocker, tmp_path_factory):
    from citadel.residency.models import Site

    with django_db_blocker.unblock():  # committed, for gunicorn to see: batch files are stored at site-a
        Site.objects.filter(name="site-a").update(storage_path=str(tmp_path_factory.mktemp("metrics-store")))
    return openai.OpenAI(base_url=live_stack.v1, api_key=live_stack.api_key, max_retries=0, timeout=120)


def test_the_metric_families_are_present_and_change_under_a_small_load(client, live_stack):
    time.sleep(6)  # one sample of the worker's engine sampler
    before = scrape(live_stack.base_url)
    for i in range(4):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"Hello {i}"}],
                                       max_tokens=8, temperature=0)
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Stream"}],
                                            max_tokens=8, temperature=0, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) is not None
    time.sleep(6)  # heartbeats (1 s here) carry the engine's counters; the sampler runs every 5 s
    after = scrape(live_stack.base_url)
    missing = [name for name in FAMILIES if name not in after]
    assert not missing, missing
    route = "/v1/chat/completions"
    assert total(after, "citadel_http_request_duration_seconds", route=route, status="200") \
        >= total(before, "citadel_http_request_duration_seconds", route=route, status="200") + 5
    assert total(after, "citadel_time_to_first_token_seconds") >= total(before, "citadel_time_to_first_token_seconds") + 5
    assert total(after, "citadel_inter_token_latency_seconds") > total(before, "citadel_inter_token_latency_seconds")
    assert total(after, "citadel_audit_append_seconds") >= total(before, "citadel_audit_append_seconds") + 10
    assert total(after, "citadel_generated_tokens", "_total") > total(before, "citadel_generated_tokens", "_total")
    assert total(after, "citadel_engine_tokens", "_total", phase="decode") \
        > total(before, "citadel_engine_tokens", "_total", phase="decode")
    assert total(after, "citadel_engine_batch_size") > total(before, "citadel_engine_batch_size")
    assert total(after, "citadel_inference_jobs", "", status="succeeded") \
        >= total(before, "citadel_inference_jobs", "", status="succeeded") + 5
    ages = after["citadel_worker_heartbeat_age_seconds"]
    assert any(dict(pairs)["worker"] == f"{live_stack.pool}@e2e" and value < 10 for (_, *pairs), value in ages.items())


def test_a_batch_moves_the_batch_families(client, live_stack):
    before = scrape(live_stack.base_url)
    lines = [json.dumps({"custom_id": f"m{i}", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"model": "tiny", "messages": [{"role": "user", "content": f"Hi {i}"}],
                                  "max_tokens": 6, "temperature": 0}}) for i in range(6)]
    uploaded = client.files.create(file=("m.jsonl", io.BytesIO("\n".join(lines).encode())), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 120
    while client.batches.retrieve(batch.id).status != "completed":
        assert time.monotonic() < deadline
        time.sleep(0.3)
    after = scrape(live_stack.base_url)
    assert total(after, "citadel_batches", "", status="completed") \
        == total(before, "citadel_batches", "", status="completed") + 1
    assert total(after, "citadel_batch_chunk_lines") > total(before, "citadel_batch_chunk_lines")
    assert total(after, "citadel_generated_tokens", "_total", source="batch") \
        > total(before, "citadel_generated_tokens", "_total", source="batch")
    assert ("citadel_queue_depth", ("kind", "batch_line"), ("pool", live_stack.pool)) in after["citadel_queue_depth"]


def test_a_worker_serves_its_own_metrics_on_its_port(client, worker_port):
    text = httpx.get(f"http://127.0.0.1:{worker_port}/metrics", timeout=30).text
    names = {family.name for family in text_string_to_metric_families(text)}
    assert {"citadel_time_to_first_token_seconds", "citadel_inter_token_latency_seconds",
            "citadel_generated_tokens", "citadel_engine_tokens_per_second"} <= names
