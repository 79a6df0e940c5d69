"""Log-probabilities: request validation, the worker's per-token entries, and OpenAI's two response shapes.

The worker is run here with a stand-in engine whose events are scripted, so the tests need no
model weights; tests/e2e/test_openai_api.py covers the real engine through the `openai` client.
"""

import json
import math

import pytest

from citadel.audit.services import Actor
from citadel.gateway.openai_format import TextOffsets, choice_logprobs, completion_body
from citadel.gateway.serializers import ChatCompletionInput, CompletionInput
from citadel.gateway.streaming import job_event_stream
from citadel.jobs import tasks
from citadel.jobs.logprobs import UNLIKELY, TokenTexts, event_entries, token_bytes
from citadel.jobs.models import InferenceChunk, InferenceJob
from citadel.registry.services import deployment_create, model_register, pool_create

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "tiny", "prompt": "Once"}
EOS = 1  # the tiny checkpoint's <|end|>


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    from inference.loader import load_tokenizer

    return load_tokenizer(tiny_checkpoint)


@pytest.fixture(scope="module")
def texts(tokenizer):
    return TokenTexts(tokenizer)


# -- validation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, sampling_logprobs", [
    ({"logprobs": True}, 0),
    ({"logprobs": True, "top_logprobs": 3}, 3),
    ({"logprobs": True, "top_logprobs": 20}, 20),
    ({"logprobs": False}, None),
    ({"logprobs": None, "top_logprobs": None}, None),
])
def test_a_chat_request_with_valid_logprobs_asks_the_engine_for_that_many_alternatives(extra, sampling_logprobs):
    data = ChatCompletionInput(data={**CHAT, **extra})
    assert data.is_valid(), data.errors
    assert data.sampling().get("logprobs") == sampling_logprobs


@pytest.mark.parametrize("value, sampling_logprobs", [(0, 0), (2, 2), (5, 5), (None, None)])
def test_a_completion_request_with_valid_logprobs_asks_the_engine_for_that_many_alternatives(value, sampling_logprobs):
    data = CompletionInput(data={**COMPLETION, "logprobs": value})
    assert data.is_valid(), data.errors
    assert data.sampling().get("logprobs") == sampling_logprobs


@pytest.mark.parametrize("extra, param, hint", [
    ({"logprobs": "yes"}, "logprobs", "true or false"),
    ({"logprobs": 1}, "logprobs", "true or false"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "0 to 20"),
    ({"logprobs": True, "top_logprobs": -1}, "top_logprobs", "0 to 20"),
    ({"logprobs": True, "top_logprobs": "3"}, "top_logprobs", "0 to 20"),
    ({"logprobs": True, "top_logprobs": 2.5}, "top_logprobs", "0 to 20"),
    ({"logprobs": True, "top_logprobs": True}, "top_logprobs", "0 to 20"),
    ({"top_logprobs": 3}, "top_logprobs", '"logprobs": true'),
    ({"logprobs": False, "top_logprobs": 3}, "top_logprobs", '"logprobs": true'),
])
def test_bad_chat_logprobs_get_a_400_naming_the_field_and_the_fix(gateway_post, extra, param, hint):
    error = gateway_post("/v1/chat/completions", {**CHAT, **extra})
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert param in error["message"] and hint in error["message"]


@pytest.mark.parametrize("extra, param, hint", [
    ({"logprobs": 6}, "logprobs", "0 to 5"),
    ({"logprobs": -1}, "logprobs", "0 to 5"),
    ({"logprobs": True}, "logprobs", "0 to 5"),
    ({"logprobs": "2"}, "logprobs", "0 to 5"),
    ({"logprobs": [2]}, "logprobs", "0 to 5"),
    ({"logprobs": 2, "top_logprobs": 2}, "top_logprobs", "takes logprobs"),
])
def test_bad_completion_logprobs_get_a_400_naming_the_field(gateway_post, extra, param, hint):
    error = gateway_post("/v1/completions", {**COMPLETION, **extra})
    assert error["param"] == param and param in error["message"] and hint in error["message"]


@pytest.fixture
def gateway_post(db):
    """POST a body to /v1 with a valid key; return the OpenAI error of the 400 it must get (and no job)."""
    from django.contrib.auth import get_user_model
    from django.test import Client

    from citadel.accounts.services import api_key_create

    key = api_key_create(user=get_user_model().objects.create_user("lp", password="x" * 16), name="t",
                         actor=Actor.system())

    def post(path, body):
        response = Client().post(path, json.dumps(body), content_type="application/json",
                                 HTTP_AUTHORIZATION=f"Bearer {key.key}")
        assert response.status_code == 400, response.content
        assert not InferenceJob.objects.exists()
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        return error

    return post


# -- token strings and bytes --------------------------------------------------------------------

def test_tokens_that_split_a_character_carry_its_exact_bytes(tokenizer, texts):
    ids = tokenizer("Café €", add_special_tokens=False).input_ids
    pieces = [texts.get(token_id) for token_id in ids]
    assert bytes(b for _, raw in pieces for b in raw).decode("utf-8") == "Café €"
    assert any(text == "\ufffd" for text, _ in pieces)  # a byte-level token holding half of "é" or "€"
    assert texts.get(EOS) == ("<|end|>", list(b"<|end|>"))


def test_bytes_come_from_byte_fallback_tokens_and_otherwise_from_the_text():
    assert token_bytes("<0xE2>", "\ufffd") == b"\xe2"
    assert token_bytes("▁hello", " hello") == b" hello"  # SentencePiece: not GPT-2's byte alphabet
    assert token_bytes("é", "é") == "é".encode()  # in the byte alphabet, but this tokenizer is not byte-level


def _event(token_id, mapping, *, text="", finish_reason=None):
    from inference.outputs import StreamEvent

    return StreamEvent(text=text, token_ids=[token_id], finish_reason=finish_reason, prompt_tokens=3,
                       completion_tokens=1, logprobs=[mapping])


def test_an_entry_holds_the_chosen_token_and_exactly_the_top_k_best_first(texts):
    # The engine's mapping: the chosen token first, then the top k (the chosen one may be among them).
    [entry] = event_entries(texts, _event(40, {40: -3.0, 41: -0.5, 42: -1.0, 43: -2.0}), top=2)
    assert entry["logprob"] == -3.0 and entry["token"] == texts.get(40)[0]
    assert [alt["logprob"] for alt in entry["top_logprobs"]] == [-0.5, -1.0]
    [entry] = event_entries(texts, _event(41, {41: -0.5, 42: -1.0}), top=2)
    assert [alt["logprob"] for alt in entry["top_logprobs"]] == [-0.5, -1.0]
    [entry] = event_entries(texts, _event(41, {41: float("-inf")}), top=0)
    assert entry["logprob"] == UNLIKELY and entry["top_logprobs"] == []  # JSON has no -Infinity


def test_the_end_of_sequence_token_that_ends_a_request_is_not_listed(texts):
    assert event_entries(texts, _event(EOS, {EOS: -0.1}, finish_reason="stop"), top=1) == []
    assert len(event_entries(texts, _event(EOS, {EOS: -0.1}), top=1)) == 1  # mid-text it is a token like others
    assert len(event_entries(texts, _event(40, {40: -0.1}, finish_reason="length"), top=1)) == 1


# -- the worker, with a scripted engine ---------------------------------------------------------

class ScriptedEngine:
    """Stands in for inference.LLM and the worker's EngineCache: replays events, records the params."""

    def __init__(self, events, texts):
        self.events, self.texts, self.params = events, texts, None

    def get(self, *, path, engine_settings=None):
        return self

    def token_texts(self, *, path):
        return self.texts

    def stream_chat(self, messages, params):
        self.params = params
        return iter(self.events)

    stream = stream_chat


@pytest.fixture
def make_job(db, tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "deepseek_v4"}')
    model = model_register(name="m", path=str(tmp_path), actor=Actor.system())
    pool = pool_create(name="p", site="s", actor=Actor.system())
    deployment = deployment_create(model=model, pool=pool, actor=Actor.system())

    def make(*, kind="chat", stream=False, logprobs=None):
        sampling = {} if logprobs is None else {"logprobs": logprobs}
        body = {"messages": [{"role": "user", "content": "hi"}]} if kind == "chat" else {"prompt": "Once"}
        return InferenceJob.objects.create(kind=kind, model=model, deployment=deployment, pool=pool, stream=stream,
                                           payload={**body, "sampling": sampling})

    return make


def _naive_events(tokenizer):
    """"naïve" one token at a time, each chosen as the second most likely, then the end-of-sequence token."""
    ids = tokenizer("naïve", add_special_tokens=False).input_ids
    events, shown = [], ""
    for n, token_id in enumerate(ids, 1):
        text = tokenizer.decode(ids[:n])
        delta = "" if text.endswith("\ufffd") else text[len(shown):]
        shown += delta
        events.append(_event(token_id, {token_id: -1.5, 50: -1.0, 51: -2.0, 52: -3.5}, text=delta))
    events.append(_event(EOS, {EOS: -0.1, 50: -4.0}, finish_reason="stop"))
    return events


def test_the_worker_asks_for_logprobs_and_stores_them_with_the_job_and_each_streamed_chunk(
        make_job, tokenizer, texts, monkeypatch):
    engine = ScriptedEngine(_naive_events(tokenizer), texts)
    monkeypatch.setattr(tasks, "engines", engine)
    monkeypatch.setattr(tasks, "CHUNK_FLUSH_SECONDS", 0)  # one chunk per event
    job = make_job(stream=True, logprobs=2)
    tasks.run_inference.run(str(job.id))
    job.refresh_from_db()
    assert job.status == "succeeded" and job.text == "naïve" and engine.params.logprobs == 2
    assert bytes(b for entry in job.logprobs for b in entry["bytes"]).decode() == "naïve"  # no <|end|>
    assert all(len(entry["top_logprobs"]) == 2 for entry in job.logprobs)
    chunks = list(InferenceChunk.objects.filter(job=job))
    assert len(chunks) > 1 and [e for c in chunks for e in c.logprobs] == job.logprobs

    events = [json.loads(line[6:]) for line in job_event_stream(job) if line.startswith("data: {")]
    streamed = [e for event in events for choice in event["choices"] if choice["logprobs"]
                for e in choice["logprobs"]["content"]]
    assert streamed == job.logprobs
    assert "".join(c["delta"].get("content", "") for event in events for c in event["choices"]) == "naïve"


def test_the_worker_stores_no_logprobs_when_none_were_asked_for(make_job, tokenizer, texts, monkeypatch):
    engine = ScriptedEngine(_naive_events(tokenizer), texts)
    monkeypatch.setattr(tasks, "engines", engine)
    job = make_job(stream=True)
    tasks.run_inference.run(str(job.id))
    job.refresh_from_db()
    assert job.text == "naïve" and engine.params.logprobs is None and job.logprobs is None
    assert not InferenceChunk.objects.filter(job=job, logprobs__isnull=False).exists()
    assert completion_body(job)["choices"][0]["logprobs"] is None


def test_a_whole_chat_answer_carries_the_chat_logprobs_shape(make_job, tokenizer, texts, monkeypatch):
    monkeypatch.setattr(tasks, "engines", ScriptedEngine(_naive_events(tokenizer), texts))
    job = make_job(logprobs=3)
    tasks.run_inference.run(str(job.id))
    job.refresh_from_db()
    assert not InferenceChunk.objects.filter(job=job, logprobs__isnull=False).exists()  # not streamed
    logprobs = completion_body(job)["choices"][0]["logprobs"]
    assert set(logprobs) == {"content", "refusal"}
    for entry in logprobs["content"]:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"} and entry["logprob"] <= 0
        assert len(entry["top_logprobs"]) == 3
        assert all(set(alt) == {"token", "logprob", "bytes"} for alt in entry["top_logprobs"])
        assert sum(math.exp(alt["logprob"]) for alt in entry["top_logprobs"]) <= 1 + 1e-5


def test_a_completion_carries_the_legacy_logprobs_shape_with_offsets_into_its_text(
        make_job, tokenizer, texts, monkeypatch):
    monkeypatch.setattr(tasks, "engines", ScriptedEngine(_naive_events(tokenizer), texts))
    job = make_job(kind="completion", logprobs=1)
    tasks.run_inference.run(str(job.id))
    job.refresh_from_db()
    logprobs = completion_body(job)["choices"][0]["logprobs"]
    assert set(logprobs) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    n = len(tokenizer("naïve", add_special_tokens=False).input_ids)
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["text_offset"]) == n
    assert logprobs["token_logprobs"] == [-1.5] * n
    # The best alternative, and always the chosen token: up to logprobs + 1 of them, as OpenAI says.
    assert all(len(top) == 2 and top[logprobs["tokens"][i]] == -1.5 for i, top in enumerate(logprobs["top_logprobs"]))
    # "n", "a" + half of "ï", the rest of "ï" + "ve": the third token starts where "ï" does.
    assert [texts.get(t)[0] for t in tokenizer("naïve", add_special_tokens=False).input_ids] == logprobs["tokens"]
    assert logprobs["tokens"] == ["n", "a\ufffd", "\ufffdve"] and logprobs["text_offset"] == [0, 1, 2]


def test_text_offsets_continue_from_one_streamed_chunk_to_the_next():
    offsets = TextOffsets()
    euro = list("€".encode())
    assert offsets.take([{"token": "a", "bytes": [97]}, {"token": "\ufffd", "bytes": euro[:1]}]) == [0, 1]
    assert offsets.take([{"token": "\ufffd", "bytes": euro[1:]}, {"token": "b", "bytes": [98]}]) == [1, 2]


def test_a_job_without_stored_logprobs_answers_none_even_when_they_were_asked_for(make_job):
    job = make_job(logprobs=2)
    assert choice_logprobs(job, None) is None
