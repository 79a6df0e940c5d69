"""Batches in process: OpenAI's shapes, every line checked (malformed ones in the error file with their
line numbers while the valid ones run), residency, cancel, pagination, and the worker side run on
demo-v4 by calling the task: chunks recorded once, a dead worker's lines taken back, usage metered.
The real worker and the official client are in tests/e2e/test_batches_e2e.py."""

import io
import json
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from django.utils import timezone

from citadel.accounts.services import api_key_create
from citadel.audit.models import AuditRecord
from citadel.audit.services import Actor
from citadel.batches.models import Batch, BatchRequest
from citadel.registry.services import deployment_create, model_register, pool_create, worker_heartbeat
from citadel.residency.models import DataClass
from citadel.residency.services import policy_create, site_create
from citadel.usage.models import UsageRecord

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "models" / "demo-v4"
SYSTEM = Actor.system("test")


@pytest.fixture
def world(tmp_path, monkeypatch, settings, django_capture_on_commit_callbacks):
    """demo-v4 deployed on pool b-pool at site b-site; keys without a team may use internal data there.
    Published batch ids are collected instead of sent to a broker."""
    settings.CITADEL_BATCH_CHUNK_LINES = 3
    settings.CITADEL_BATCH_FEEDERS = 1  # in the test's thread, inside its transaction (the e2e test runs 2)
    site = site_create(name="b-site", jurisdiction="EU", storage_path=str(tmp_path / "store"), actor=SYSTEM)
    model = model_register(name="demo-v4", path=str(DEMO), actor=SYSTEM)
    pool = pool_create(name="b-pool", site=site, actor=SYSTEM)
    deployment_create(model=model, pool=pool, actor=SYSTEM)
    internal = DataClass.objects.get(name="internal")
    policy_create(team=None, data_class=internal, processing_sites=[site], storage_sites=[site], actor=SYSTEM)
    user = get_user_model().objects.create_user("app", password="x" * 16)
    key = api_key_create(user=user, name="batch", actor=SYSTEM)
    published = []
    from citadel.batches import tasks

    monkeypatch.setattr(tasks.run_batch, "apply_async", lambda args, queue, **kw: published.append((args[0], queue)))
    return SimpleNamespace(site=site, model=model, pool=pool, user=user, key=key.key, api_key=key.api_key,
                           published=published, on_commit=django_capture_on_commit_callbacks)


def call(method: str, path: str, key: str, body=None):
    headers = {"HTTP_AUTHORIZATION": f"Bearer {key}"}
    if body is not None:
        return getattr(Client(), method)(path, json.dumps(body), content_type="application/json", **headers)
    return getattr(Client(), method)(path, **headers)


def line(custom_id: str, content: str, max_tokens: int = 4, **body) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": "demo-v4", "messages": [{"role": "user", "content": content}],
                                "max_tokens": max_tokens, "temperature": 0, **body}})


def upload(world, lines: list[str]) -> str:
    handle = io.BytesIO(("\n".join(lines) + "\n").encode())
    handle.name = "batch.jsonl"
    response = Client().post("/v1/files", {"file": handle, "purpose": "batch"},
                             HTTP_AUTHORIZATION=f"Bearer {world.key}")
    assert response.status_code == 200, response.content
    assert response.json()["purpose"] == "batch"
    return response.json()["id"]


def create(world, lines: list[str], **extra):
    body = {"input_file_id": upload(world, lines), "endpoint": "/v1/chat/completions", "completion_window": "24h",
            **extra}
    with world.on_commit(execute=True):  # the id is published once the batch is committed
        return call("post", "/v1/batches", world.key, body)


def run_worker(batch_id: str, name: str = "b-pool@w1"):
    from citadel.batches.tasks import run_batch

    worker_heartbeat(name=name, pool_name="b-pool", hostname="h", pid=1, loaded_models=[])
    run_batch.push_request(hostname=name)
    try:
        run_batch.run(batch_id)
    finally:
        run_batch.pop_request()


def content(world, file_id: str) -> list[dict]:
    response = call("get", f"/v1/files/{file_id}/content", world.key)
    assert response.status_code == 200
    return [json.loads(raw) for raw in b"".join(response.streaming_content).decode().splitlines()]


def test_a_batch_is_created_in_openais_shape_with_malformed_lines_counted_as_failed(world):
    lines = [line("a", "Hello"), "{not json", line("b", "Hi"),
             json.dumps({"custom_id": "c", "method": "POST", "url": "/v1/completions", "body": {}}),
             json.dumps({"method": "POST", "url": "/v1/chat/completions", "body": {"model": "demo-v4"}}),
             line("a", "duplicate id"), line("d", "bad", max_tokens=0)]
    response = create(world, lines, metadata={"night": "monday"})
    assert response.status_code == 200, response.content
    body = response.json()
    from openai.types import Batch as OpenAIBatch

    parsed = OpenAIBatch.model_validate(body)
    assert parsed.status == "in_progress" and parsed.id.startswith("batch_")
    assert parsed.request_counts.total == 7 and parsed.request_counts.failed == 5
    assert parsed.metadata == {"night": "monday"} and parsed.model == "demo-v4"
    assert world.published == [(str(Batch.objects.get().pk), world.pool.queue)]
    failed = {r.line: r for r in BatchRequest.objects.filter(status="failed")}
    assert sorted(failed) == [2, 4, 5, 6, 7]
    assert failed[4].custom_id == "c" and failed[4].error["code"] == "mismatched_url"
    assert failed[5].error["code"] == "missing_custom_id"
    assert failed[6].error["code"] == "duplicate_custom_id"
    assert failed[7].error["param"] == "body.max_tokens"
    assert AuditRecord.objects.filter(action="batch.create", outcome="success").exists()
    assert AuditRecord.objects.filter(action="batch.in_progress").exists()


def test_the_worker_runs_the_valid_lines_and_writes_output_and_error_files_in_line_order(world):
    lines = [line("a", "Hello"), "{not json", line("b", "Hi there"), line("c", "One"), line("d", "Two")]
    batch_id = create(world, lines).json()["id"]
    run_worker(str(Batch.objects.get().pk))
    body = call("get", f"/v1/batches/{batch_id}", world.key).json()
    assert body["status"] == "completed", body
    assert body["request_counts"] == {"total": 5, "completed": 4, "failed": 1}
    output = content(world, body["output_file_id"])
    assert [o["custom_id"] for o in output] == ["a", "b", "c", "d"]
    assert all(o["response"]["status_code"] == 200 for o in output)
    assert output[0]["response"]["body"]["object"] == "chat.completion"
    errors = content(world, body["error_file_id"])
    assert len(errors) == 1 and errors[0]["error"]["line"] == 2 and errors[0]["custom_id"] is None
    usage = sum(o["response"]["body"]["usage"]["total_tokens"] for o in output)
    assert body["usage"]["total_tokens"] == usage
    recorded = UsageRecord.objects.filter(kind="batch")
    assert sum(r.prompt_tokens + r.completion_tokens for r in recorded) == usage
    assert sum(r.requests for r in recorded) == 4
    assert AuditRecord.objects.filter(action="batch.completed").count() == 1


def test_batch_outputs_match_the_same_requests_run_one_by_one_on_the_engine(world):
    from citadel.jobs.engines import engines
    from inference import SamplingParams

    prompts = ["Hello", "Tell me a story", "What is two plus two?"]
    batch_id = create(world, [line(str(i), p, max_tokens=6) for i, p in enumerate(prompts)]).json()["id"]
    run_worker(str(Batch.objects.get().pk))
    output = content(world, call("get", f"/v1/batches/{batch_id}", world.key).json()["output_file_id"])
    llm = engines.get(path=str(DEMO), engine_settings={})
    for i, prompt in enumerate(prompts):
        alone = llm.chat([{"role": "user", "content": prompt}], SamplingParams(max_tokens=6, temperature=0))[0]
        assert output[i]["response"]["body"]["choices"][0]["message"]["content"] == alone.text


def test_a_redelivered_message_records_nothing_twice(world):
    batch_id = create(world, [line("a", "Hello"), line("b", "Hi")]).json()["id"]
    pk = str(Batch.objects.get().pk)
    run_worker(pk)
    run_worker(pk)  # the same message again, after completion
    assert call("get", f"/v1/batches/{batch_id}", world.key).json()["request_counts"]["completed"] == 2
    assert sum(r.requests for r in UsageRecord.objects.filter(kind="batch")) == 2
    assert AuditRecord.objects.filter(action="batch.completed").count() == 1


def test_lines_of_a_dead_worker_go_back_to_pending_and_a_late_result_of_theirs_is_dropped(world):
    from citadel.batches.services import batches_recover, lines_claim, lines_record
    from citadel.registry.models import Worker

    create(world, [line("a", "Hello"), line("b", "Hi"), line("c", "Hey"), line("d", "Yo")])
    batch = Batch.objects.get()
    worker_heartbeat(name="b-pool@dead", pool_name="b-pool", hostname="h", pid=2, loaded_models=[])
    claimed = lines_claim(batch_id=batch.pk, claim="b-pool@dead#1", limit=3)
    assert [r.line for r in claimed] == [1, 2, 3]
    Worker.objects.filter(name="b-pool@dead").update(last_heartbeat=timezone.now() - timedelta(minutes=5))
    Batch.objects.filter(pk=batch.pk).update(dispatched_at=timezone.now() - timedelta(minutes=5))
    world.published.clear()
    result = batches_recover()
    assert result["released"] == 3 and result["resent"] == 1 and world.published
    late = {r.pk: {"text": "late", "finish_reason": "stop", "prompt_tokens": 1, "completion_tokens": 1}
            for r in claimed}
    assert lines_record(batch_id=batch.pk, claim="b-pool@dead#1", results=late) == 0
    run_worker(str(batch.pk), name="b-pool@w2")
    batch.refresh_from_db()
    assert batch.status == "completed" and batch.completed == 4
    assert not BatchRequest.objects.filter(text="late").exists()
    assert set(BatchRequest.objects.values_list("worker_name", flat=True)) <= {""} | {
        w for w in BatchRequest.objects.values_list("worker_name", flat=True) if w.startswith("b-pool@w2#")}


def test_cancel_of_a_batch_no_worker_has_started_ends_it_at_once_and_a_finished_one_refuses(world):
    batch_id = create(world, [line("a", "Hello"), line("b", "Hi")]).json()["id"]
    cancelled = call("post", f"/v1/batches/{batch_id}/cancel", world.key).json()
    assert cancelled["status"] == "cancelled" and cancelled["cancelled_at"] and cancelled["cancelling_at"]
    run_worker(str(Batch.objects.get().pk))
    assert BatchRequest.objects.filter(status="succeeded").count() == 0
    second = create(world, [line("a", "Hello")]).json()["id"]
    run_worker(str(Batch.objects.get(pk=second[len("batch_"):]).pk))
    refused = call("post", f"/v1/batches/{second}/cancel", world.key)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "batch_not_cancellable"
    assert AuditRecord.objects.filter(action="batch.cancelled").count() == 1


def test_a_file_without_a_valid_line_makes_a_failed_batch_listing_the_lines(world):
    body = create(world, ["{oops", json.dumps({"custom_id": "x"})]).json()
    assert body["status"] == "failed" and body["failed_at"]
    assert [e["line"] for e in body["errors"]["data"]] == [1, 2]
    assert world.published == []


def test_refusals_name_the_field_and_store_nothing(world):
    file_id = upload(world, [line("a", "Hello")])
    bad = {"input_file_id": file_id, "endpoint": "/v1/embeddings", "completion_window": "24h"}
    assert call("post", "/v1/batches", world.key, bad).json()["error"]["param"] == "endpoint"
    bad = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "1h"}
    assert call("post", "/v1/batches", world.key, bad).json()["error"]["param"] == "completion_window"
    bad = {"input_file_id": "file-00000000000000000000000000000000", "endpoint": "/v1/chat/completions",
           "completion_window": "24h"}
    assert call("post", "/v1/batches", world.key, bad).json()["error"]["param"] == "input_file_id"
    unknown = create(world, [line("a", "Hello").replace("demo-v4", "nope")])
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    assert Batch.objects.count() == 0
    assert AuditRecord.objects.filter(action="batch.create", outcome="failure").count() == 4


def test_residency_refuses_a_batch_whose_team_may_not_use_the_models_pools_and_audits_it(world, tmp_path):
    from citadel.accounts.models import Role, Team
    from citadel.accounts.services import membership_set

    team = Team.objects.create(name="risk")
    membership_set(team=team, user=world.user, role=Role.ML_ENGINEER, actor=SYSTEM)
    us = site_create(name="us-site", jurisdiction="US", storage_path=str(tmp_path / "us"), actor=SYSTEM)
    policy_create(team=team, data_class=DataClass.objects.get(name="internal"), processing_sites=[us],
                  storage_sites=[us], actor=SYSTEM)  # demo-v4 runs only at b-site
    key = api_key_create(user=world.user, name="risk", team=team, actor=SYSTEM)
    handle = io.BytesIO((line("a", "Hello") + "\n").encode())
    handle.name = "b.jsonl"
    file_id = Client().post("/v1/files", {"file": handle, "purpose": "batch"},
                            HTTP_AUTHORIZATION=f"Bearer {key.key}").json()["id"]
    refused = call("post", "/v1/batches", key.key, {"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                                    "completion_window": "24h"})
    assert refused.status_code == 403, refused.content
    assert Batch.objects.count() == 0 and world.published == []
    assert AuditRecord.objects.filter(action="batch.create", outcome="denied").count() == 1


def test_batches_are_listed_newest_first_with_after_and_limit_and_other_keys_see_none(world):
    ids = [create(world, [line("a", f"Hello {i}")]).json()["id"] for i in range(3)]
    page = call("get", "/v1/batches?limit=2", world.key).json()
    assert [b["id"] for b in page["data"]] == ids[::-1][:2] and page["has_more"] is True
    rest = call("get", f"/v1/batches?limit=2&after={page['last_id']}", world.key).json()
    assert [b["id"] for b in rest["data"]] == [ids[0]] and rest["has_more"] is False
    other = api_key_create(user=get_user_model().objects.create_user("other", password="x" * 16), name="o",
                           actor=SYSTEM)
    assert call("get", "/v1/batches", other.key).json()["data"] == []
    assert call("get", f"/v1/batches/{ids[0]}", other.key).status_code == 404


def test_claims_take_pending_lines_in_line_order_once_and_only_while_the_batch_runs(world):
    from citadel.batches.services import lines_claim

    create(world, [line(f"l{i}", "Hello") for i in range(5)])
    batch = Batch.objects.get()
    first = lines_claim(batch_id=batch.pk, claim="b-pool@w1#1", limit=2)
    second = lines_claim(batch_id=batch.pk, claim="b-pool@w2#1", limit=10)
    assert [c.line for c in first] == [1, 2] and [c.line for c in second] == [3, 4, 5]
    assert second[0].payload["messages"] == [{"role": "user", "content": "Hello"}]  # decoded, as the engine takes it
    assert lines_claim(batch_id=batch.pk, claim="b-pool@w3#1", limit=10) == []
    claims = dict(BatchRequest.objects.values_list("line", "worker_name"))
    assert claims == {1: "b-pool@w1#1", 2: "b-pool@w1#1", 3: "b-pool@w2#1", 4: "b-pool@w2#1", 5: "b-pool@w2#1"}
    assert not BatchRequest.objects.exclude(status="running").exists()
    assert not BatchRequest.objects.filter(claimed_at__isnull=True).exists()
    BatchRequest.objects.filter(line=5).update(status="pending", worker_name="")
    Batch.objects.filter(pk=batch.pk).update(status="cancelling")
    assert lines_claim(batch_id=batch.pk, claim="b-pool@w3#1", limit=10) == []  # a stopping batch hands out nothing


def test_a_recorded_chunk_stores_each_lines_result_counters_and_one_usage_record_in_one_go(world):
    from citadel.batches.services import lines_claim, lines_record

    create(world, [line("a", "Hello"), line("b", "Hi"), line("c", "Hey")])
    batch = Batch.objects.get()
    claimed = lines_claim(batch_id=batch.pk, claim="b-pool@w1#1", limit=3)
    results = {claimed[0].pk: {"text": "a\x00b", "finish_reason": "length", "prompt_tokens": 5, "completion_tokens": 4},
               claimed[1].pk: {"error": {"code": "invalid_sampling_params", "message": "no", "param": None}},
               claimed[2].pk: {"text": "ok", "finish_reason": "stop", "prompt_tokens": 6, "completion_tokens": 2}}
    assert lines_record(batch_id=batch.pk, claim="b-pool@w1#1", results=results) == 3
    rows = {r.custom_id: r for r in BatchRequest.objects.all()}
    assert rows["a"].status == "succeeded" and rows["a"].text == "a\ufffdb"  # PostgreSQL's text refuses NUL
    assert rows["a"].finish_reason == "length" and rows["a"].error is None and rows["a"].finished_at
    assert rows["b"].status == "failed" and rows["b"].error["code"] == "invalid_sampling_params"
    assert (rows["c"].prompt_tokens, rows["c"].completion_tokens) == (6, 2)
    batch.refresh_from_db()
    assert (batch.completed, batch.failed, batch.prompt_tokens, batch.completion_tokens) == (2, 1, 11, 6)
    usage = UsageRecord.objects.get(kind="batch")
    assert (usage.requests, usage.prompt_tokens, usage.completion_tokens) == (2, 11, 6)
    assert lines_record(batch_id=batch.pk, claim="b-pool@w1#1", results=results) == 0  # already recorded
    assert lines_record(batch_id=batch.pk, claim="b-pool@w1#1", results={}) == 0


def _serializer_reading(endpoint: str, body: dict):
    from citadel.batches.lines import SERIALIZERS

    serializer = SERIALIZERS[endpoint](data=body)
    return (serializer.validated_data["model"], serializer.payload()) if serializer.is_valid() else None


PLAIN_VALUES = {
    "model": ["demo-v4", " demo-v4", "demo-v4 ", "", "   ", "dé", "a\x00b", "a\ud800", 7, None, True, ["m"]],
    "max_tokens": [None, 1, 7, 32768, 32769, 0, -1, 3.0, "3", True, False, [1]],
    "temperature": [None, 0, 0.0, 1, 2, 2.0001, -0.1, 0.7, "0.5", True, float("nan"), float("inf")],
    "messages": [[{"role": "user", "content": "Hi"}], [{"role": "system", "content": ""}, {"role": "user",
                 "content": "x"}], [], None, "Hi", [{"role": "robot", "content": "Hi"}], [{"role": "user"}],
                 [{"role": "user", "content": 3}], [{"role": "user", "content": [{"type": "text", "text": "a"}]}],
                 [{"role": "user", "content": "Hi", "name": "bob"}], ["Hi"], [{"role": ["user"], "content": "x"}]],
    "prompt": ["Once", "", ["Once"], [1, 2], None, 5],
}


@pytest.mark.parametrize("endpoint,text", [("/v1/chat/completions", "messages"), ("/v1/completions", "prompt")])
def test_the_plain_reading_of_a_line_gives_what_the_serializer_gives_or_leaves_the_line_to_it(endpoint, text):
    """plain_payload (lines.py) skips the serializer for the common body; it must never accept a body the
    serializer refuses, nor read one differently. Every combination of the values above, and a few
    thousand random bodies with extra fields, absent fields and wrong types."""
    import itertools
    import random

    from citadel.batches.lines import plain_payload

    names = ("model", text, "max_tokens", "temperature")
    bodies = [dict(zip(names, values, strict=True)) for values in itertools.product(*(PLAIN_VALUES[n] for n in names))]
    rng = random.Random(0)
    extras = {"top_p": [0.5, 0], "stream": [False], "seed": [1], "n": [1, 2], "stop": ["x"], "logprobs": [False]}
    for _ in range(3000):
        body = {name: rng.choice(PLAIN_VALUES[name]) for name in names if rng.random() < 0.85}
        for name, values in extras.items():
            if rng.random() < 0.1:
                body[name] = rng.choice(values)
        bodies.append(body)
    taken = 0
    for body in bodies:
        plain = plain_payload(endpoint, body)
        if plain is not None:
            taken += 1
            assert (body["model"], plain) == _serializer_reading(endpoint, body), body
    assert taken >= 20
    assert plain_payload(endpoint, json.loads(line("a", "Hi"))["body"] if text == "messages" else
                         {"model": "demo-v4", "prompt": "Once", "max_tokens": 4, "temperature": 0}) is not None


def test_one_checker_for_a_whole_file_judges_each_line_as_a_request_of_its_own_would_be_judged():
    from citadel.batches.lines import BodyChecker, line_parse

    chat = [line("a", "Hi", max_completion_tokens=7), line("b", "Hi"), json.dumps(
        {"custom_id": "c", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "demo-v4"}}),
        line("d", "Hi", temperature=9), line("e", "Hi", top_logprobs=2), line("f", "Hello", stop=["x"])]
    completion = [json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/completions",
                              "body": {"model": "demo-v4", "prompt": "Once", **body}})
                  for cid, body in (("g", {"top_logprobs": 1}), ("h", {}), ("i", {"logprobs": 2}), ("j", {"n": 1}))]
    parsed = {}
    for endpoint, lines in (("/v1/chat/completions", chat), ("/v1/completions", completion)):
        checker = BodyChecker(endpoint)
        parsed[endpoint] = [line_parse(number=n, raw=raw.encode(), endpoint=endpoint, checker=checker)
                            for n, raw in enumerate(lines, start=1)]
        assert parsed[endpoint] == [line_parse(number=n, raw=raw.encode(), endpoint=endpoint)
                                    for n, raw in enumerate(lines, start=1)]
    a, b, c, d, e, f = parsed["/v1/chat/completions"]
    assert a.payload["sampling"]["max_tokens"] == 7 and b.payload["sampling"].get("max_tokens") != 7
    assert (c.param, d.param, e.param) == ("body.messages", "body.temperature", "body.logprobs")
    assert f.payload["sampling"]["stop"] == ["x"] and "stop" not in b.payload["sampling"]
    g, h, *_ = parsed["/v1/completions"]
    assert g.param == "body.logprobs" and h.payload["prompt"] == "Once"
