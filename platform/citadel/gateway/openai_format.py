"""OpenAI response objects built from job rows and text deltas (chat and text completions)."""

import json

from citadel.jobs.models import InferenceJob


def _created(job: InferenceJob) -> int:
    return int(job.created_at.timestamp())


def _id(job: InferenceJob) -> str:
    return ("chatcmpl-" if job.kind == InferenceJob.Kind.CHAT else "cmpl-") + job.id.hex


def usage(job: InferenceJob) -> dict:
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": job.completion_tokens,
            "total_tokens": job.prompt_tokens + job.completion_tokens}


def completion_body(job: InferenceJob) -> dict:
    if job.kind == InferenceJob.Kind.CHAT:
        choice = {"index": 0, "message": {"role": "assistant", "content": job.text, "refusal": None},
                  "logprobs": None, "finish_reason": job.finish_reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": job.text, "logprobs": None, "finish_reason": job.finish_reason}
        obj = "text_completion"
    return {"id": _id(job), "object": obj, "created": _created(job), "model": job.model.name,
            "choices": [choice], "usage": usage(job), "system_fingerprint": None}


def chunk_body(job: InferenceJob, *, text: str | None = None, finish_reason: str | None = None,
               first: bool = False, with_usage: bool = False) -> dict:
    if job.kind == InferenceJob.Kind.CHAT:
        delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
        choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
        obj = "chat.completion.chunk"
    else:
        choices = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}]
        obj = "text_completion"
    body = {"id": _id(job), "object": obj, "created": _created(job), "model": job.model.name,
            "choices": choices, "system_fingerprint": None}
    if with_usage:
        body["choices"], body["usage"] = [], usage(job)
    return body


def sse(data: dict | str) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n"
