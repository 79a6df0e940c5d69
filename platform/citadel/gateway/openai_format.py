"""OpenAI response objects built from job rows and text deltas (chat and text completions)."""

import codecs
import json

from citadel.jobs.models import InferenceJob


def _created(job: InferenceJob) -> int:
    return int(job.created_at.timestamp())


def _id(job: InferenceJob) -> str:
    return ("chatcmpl-" if job.kind == InferenceJob.Kind.CHAT else "cmpl-") + job.id.hex


def usage(job: InferenceJob) -> dict:
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": job.completion_tokens,
            "total_tokens": job.prompt_tokens + job.completion_tokens}


class TextOffsets:
    """Where each token starts in the completion's text, in characters, for completions' `text_offset`.

    Counted from the tokens' UTF-8 bytes, so a character split over several tokens counts once
    and the tokens that carry its pieces all start where it does. One instance follows a whole
    stream, so offsets continue from chunk to chunk.
    """

    def __init__(self):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._chars = 0

    def take(self, entries: list[dict]) -> list[int]:
        offsets = []
        for entry in entries:
            offsets.append(self._chars)
            raw = entry["bytes"] if entry.get("bytes") is not None else entry["token"].encode("utf-8")
            self._chars += len(self._decoder.decode(bytes(raw)))
        return offsets


def _chat_entry(entry: dict) -> dict:
    """The stored entry in OpenAI's key order (PostgreSQL's jsonb does not keep it)."""
    return {"token": entry["token"], "logprob": entry["logprob"], "bytes": entry["bytes"],
            "top_logprobs": [{"token": alternative["token"], "logprob": alternative["logprob"],
                              "bytes": alternative["bytes"]} for alternative in entry["top_logprobs"]]}


def _completion_top(entry: dict) -> dict[str, float]:
    """The legacy form: the most likely tokens and, always, the chosen one (so up to k + 1 of them)."""
    top = {alternative["token"]: alternative["logprob"] for alternative in entry["top_logprobs"]}
    top.setdefault(entry["token"], entry["logprob"])
    return top


def choice_logprobs(job: InferenceJob, entries: list[dict] | None, offsets: TextOffsets | None = None) -> dict | None:
    """A choice's `logprobs` from the stored per-token entries (see citadel.jobs.logprobs); None when not asked."""
    if entries is None or job.payload.get("sampling", {}).get("logprobs") is None:
        return None
    if job.kind == InferenceJob.Kind.CHAT:
        return {"content": [_chat_entry(entry) for entry in entries], "refusal": None}
    return {"tokens": [entry["token"] for entry in entries],
            "token_logprobs": [entry["logprob"] for entry in entries],
            "top_logprobs": [_completion_top(entry) for entry in entries],
            "text_offset": (offsets or TextOffsets()).take(entries)}


def completion_body(job: InferenceJob) -> dict:
    logprobs = choice_logprobs(job, job.logprobs)
    if job.kind == InferenceJob.Kind.CHAT:
        choice = {"index": 0, "message": {"role": "assistant", "content": job.text, "refusal": None},
                  "logprobs": logprobs, "finish_reason": job.finish_reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": job.text, "logprobs": logprobs, "finish_reason": job.finish_reason}
        obj = "text_completion"
    return {"id": _id(job), "object": obj, "created": _created(job), "model": job.model.name,
            "choices": [choice], "usage": usage(job), "system_fingerprint": None}


def chunk_body(job: InferenceJob, *, text: str | None = None, logprobs: dict | None = None,
               finish_reason: str | None = None, first: bool = False, with_usage: bool = False) -> dict:
    """One streamed chunk; `logprobs` is the choice's, already built by choice_logprobs."""
    if job.kind == InferenceJob.Kind.CHAT:
        if first:
            delta = {"role": "assistant", "content": ""}
        else:
            delta = {"content": text or ""} if text or logprobs else {}
        choices = [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]
        obj = "chat.completion.chunk"
    else:
        choices = [{"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}]
        obj = "text_completion"
    body = {"id": _id(job), "object": obj, "created": _created(job), "model": job.model.name,
            "choices": choices, "system_fingerprint": None}
    if with_usage:
        body["choices"], body["usage"] = [], usage(job)
    return body


def sse(data: dict | str) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n"
