"""End to end: the official openai client against gunicorn, a real Celery worker, PostgreSQL and Redis."""

import concurrent.futures
import json
import math

import httpx
import openai
import pytest

from citadel.audit.models import AuditRecord
from citadel.jobs.models import InferenceJob

# The django_db mark makes pytest-django create the test database; each test's reads still see
# what the worker commits (PostgreSQL's read committed), and writes go through the HTTP API.
pytestmark = [pytest.mark.e2e, pytest.mark.django_db]

HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def client(live_stack):
    return openai.OpenAI(base_url=live_stack.v1, api_key=live_stack.api_key, max_retries=0, timeout=120)


def test_the_openai_client_lists_the_deployed_model(client):
    assert [model.id for model in client.models.list()] == ["tiny"]


def test_the_openai_client_gets_a_chat_completion(client):
    reply = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, temperature=0)
    assert reply.object == "chat.completion" and reply.model == "tiny"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 0 and 0 < reply.usage.completion_tokens <= 8
    assert reply.choices[0].message.content


def test_a_streamed_chat_completion_carries_the_same_text_as_the_whole_one(client):
    whole = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, temperature=0)
    stream = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_the_same_seed_gives_the_same_sampled_text(client):
    texts = {client.completions.create(model="tiny", prompt="The handbook says", max_tokens=10, temperature=1.0,
                                       seed=1234).choices[0].text for _ in range(2)}
    assert len(texts) == 1


def test_text_completions_work_streamed_and_not(client):
    whole = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6, temperature=0)
    assert whole.object == "text_completion" and whole.choices[0].finish_reason in ("stop", "length")
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=6, temperature=0, stream=True))
    assert streamed == whole.choices[0].text


def _assert_chat_logprobs(content, top):
    assert content, "no token logprobs"
    for entry in content:
        assert isinstance(entry.token, str) and entry.bytes is not None and entry.logprob <= 0
        assert len(entry.top_logprobs) == top
        best = [alternative.logprob for alternative in entry.top_logprobs]
        assert best == sorted(best, reverse=True) and all(value <= 0 for value in best)
        assert sum(math.exp(value) for value in best) <= 1 + 1e-5
        assert entry.logprob == pytest.approx(best[0], abs=1e-5)  # greedy: the chosen token is the likeliest


def test_a_chat_completion_returns_each_tokens_logprob_and_its_top_alternatives(client):
    reply = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, temperature=0,
                                           logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    _assert_chat_logprobs(content, 3)
    assert len(content) <= reply.usage.completion_tokens  # the ending <|end|>, when generated, is not listed


def test_a_streamed_chat_completion_carries_the_logprobs_of_each_deltas_tokens(client):
    whole = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, temperature=0,
                                           logprobs=True, top_logprobs=3)
    chunks = [c for c in client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, temperature=0,
                                                        logprobs=True, top_logprobs=3, stream=True) if c.choices]
    streamed = [entry for c in chunks if c.choices[0].logprobs for entry in c.choices[0].logprobs.content]
    _assert_chat_logprobs(streamed, 3)
    assert [e.token for e in streamed] == [e.token for e in whole.choices[0].logprobs.content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in whole.choices[0].logprobs.content],
                                                          abs=1e-4)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason and chunks[-1].choices[0].logprobs is None  # it has no tokens


def _assert_completion_logprobs(logprobs, top):
    n = len(logprobs.tokens)
    assert n and len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == len(logprobs.text_offset) == n
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)
    for token, logprob, alternatives in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs,
                                            strict=True):
        assert logprob <= 0 and sum(math.exp(value) for value in alternatives.values()) <= 1 + 1e-5
        # greedy, so the chosen token is among the `top` likeliest; two tokens that decode to the same
        # string (e.g. halves of characters, both "\ufffd") share one key, so there may be fewer
        assert 1 <= len(alternatives) <= top and alternatives[token] == pytest.approx(logprob, abs=1e-5)
    assert any(len(alternatives) == top for alternatives in logprobs.top_logprobs)


def test_a_text_completion_returns_logprobs_in_the_legacy_shape_streamed_and_not(client):
    whole = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6, temperature=0,
                                      logprobs=2)
    _assert_completion_logprobs(whole.choices[0].logprobs, 2)
    chunks = list(client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6, temperature=0,
                                            logprobs=2, stream=True))
    pieces = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert [t for p in pieces for t in p.tokens] == whole.choices[0].logprobs.tokens
    assert [o for p in pieces for o in p.text_offset] == whole.choices[0].logprobs.text_offset


def test_out_of_range_logprobs_get_a_400_naming_the_field(client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="tiny", messages=HELLO, logprobs=True, top_logprobs=25)
    assert refused.value.body["param"] == "top_logprobs"
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="tiny", prompt="x", logprobs=6)
    assert refused.value.body["param"] == "logprobs"


def test_concurrent_streams_are_all_answered(client):
    def one(i):
        stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"n{i}"}],
                                                max_tokens=6, temperature=0, stream=True)
        return [c.choices[0].finish_reason for c in stream if c.choices][-1]

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        assert all(reason in ("stop", "length") for reason in pool.map(one, range(6)))


def test_every_request_is_audited_and_recorded_as_a_job_with_its_worker(client, live_stack):
    reply = client.chat.completions.with_raw_response.create(model="tiny", messages=HELLO, max_tokens=4)
    request_id = reply.headers["x-request-id"]
    job = InferenceJob.objects.get(request_id=request_id)
    assert job.status == "succeeded" and job.worker_name == "e2e@e2e" and job.pool.name == "e2e"
    actions = set(AuditRecord.objects.filter(request_id=request_id).values_list("action", "outcome"))
    assert actions == {("inference.chat", "success"), ("inference.chat.complete", "success")}
    record = AuditRecord.objects.get(request_id=request_id, action="inference.chat")
    assert record.actor_type == "api_key" and record.source_address == "127.0.0.1"
    assert "Hello there" not in json.dumps(record.details)  # no raw prompt in the audit log


def test_an_unknown_model_and_a_bad_key_get_openai_errors(client, live_stack):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=HELLO)
    bad = openai.OpenAI(base_url=live_stack.v1, api_key="cit_deadbeef_nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    response = httpx.post(f"{live_stack.v1}/chat/completions", content=b"{oops",
                          headers={"Authorization": f"Bearer {live_stack.api_key}",
                                   "Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"


def test_a_worker_that_fails_while_generating_gives_an_error_not_a_hung_stream(client, live_stack, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "deepseek_v4"}))
    api = httpx.Client(base_url=f"{live_stack.base_url}/api/v1",
                       headers={"Authorization": f"Bearer {live_stack.api_key}"})
    assert api.post("/models/", json={"name": "broken", "path": str(broken)}).status_code == 201
    assert api.post("/deployments/", json={"model": "broken", "pool": live_stack.pool}).status_code == 201
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="broken", messages=HELLO, max_tokens=4)
    with pytest.raises(openai.APIError):
        list(client.chat.completions.create(model="broken", messages=HELLO, max_tokens=4, stream=True))
    # the worker survived and still serves the good model
    assert client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2).choices[0].message.content
