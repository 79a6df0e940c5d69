"""OpenAI's shapes for batches: the Batch object and the lines of its output and error files.

A successful line's `response.body` is what the same request sent on its own returns (a
chat.completion or text_completion); a failed line carries OpenAI's error object, with the
input line number (Citadel's addition, as OpenAI's BatchError has it) so a malformed line can
be found in the file.
"""

import uuid
from datetime import datetime
from typing import NamedTuple

from citadel.batches.models import Batch, BatchRequest


class EndedLine(NamedTuple):
    """The columns of a finished BatchRequest that its output line needs. Finalizing reads them with
    values_list: building a model instance per line took ~20 of the ~85 ms a 1,024-line batch spent
    finalizing, between its last line and `completed`."""

    id: uuid.UUID
    line: int
    custom_id: str
    status: str
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    error: dict | None
    finished_at: datetime | None

    openai_id = property(BatchRequest.openai_id.fget)  # the model's own, from `id`


def _ts(value) -> int | None:
    return int(value.timestamp()) if value is not None else None


def batch_body(batch: Batch) -> dict:
    return {
        "id": batch.openai_id, "object": "batch", "endpoint": batch.endpoint, "errors": batch.errors,
        "input_file_id": batch.input_file.openai_id, "completion_window": batch.completion_window,
        "status": batch.status,
        "output_file_id": batch.output_file.openai_id if batch.output_file_id else None,
        "error_file_id": batch.error_file.openai_id if batch.error_file_id else None,
        "created_at": _ts(batch.created_at), "in_progress_at": _ts(batch.in_progress_at),
        "expires_at": _ts(batch.expires_at), "finalizing_at": _ts(batch.finalizing_at),
        "completed_at": _ts(batch.completed_at), "failed_at": _ts(batch.failed_at),
        "expired_at": _ts(batch.expired_at), "cancelling_at": _ts(batch.cancelling_at),
        "cancelled_at": _ts(batch.cancelled_at),
        "request_counts": {"total": batch.total, "completed": batch.completed, "failed": batch.failed},
        "metadata": batch.metadata, "model": batch.model.name if batch.model_id else None,
        "usage": {"input_tokens": batch.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
                  "output_tokens": batch.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                  "total_tokens": batch.prompt_tokens + batch.completion_tokens},
        "citadel": {"pool": batch.pool.name if batch.pool_id else None,
                    "site": batch.site.name if batch.site_id else None, "data_class": batch.data_class.name},
    }


def _completion(batch: Batch, line: EndedLine | BatchRequest) -> dict:
    created = int((line.finished_at or batch.created_at).timestamp())
    usage = {"prompt_tokens": line.prompt_tokens, "completion_tokens": line.completion_tokens,
             "total_tokens": line.prompt_tokens + line.completion_tokens}
    if batch.endpoint == Batch.Endpoint.CHAT:
        return {"id": f"chatcmpl-{line.id.hex}", "object": "chat.completion", "created": created,
                "model": batch.model.name, "system_fingerprint": None, "usage": usage,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": line.text, "refusal": None},
                             "logprobs": None, "finish_reason": line.finish_reason}]}
    return {"id": f"cmpl-{line.id.hex}", "object": "text_completion", "created": created, "model": batch.model.name,
            "system_fingerprint": None, "usage": usage,
            "choices": [{"index": 0, "text": line.text, "logprobs": None, "finish_reason": line.finish_reason}]}


def line_output(batch: Batch, line: EndedLine | BatchRequest) -> dict:
    """One line of the output file (succeeded) or of the error file (failed)."""
    request_id = f"{batch.request_id or batch.openai_id}-{line.line}"
    if line.status == BatchRequest.Status.SUCCEEDED:
        return {"id": line.openai_id, "custom_id": line.custom_id,
                "response": {"status_code": 200, "request_id": request_id, "body": _completion(batch, line)},
                "error": None}
    error = dict(line.error or {"code": "failed", "message": "The request failed.", "param": None})
    error["line"] = line.line
    invalid = error.get("code") not in ("engine_error", "batch_expired")
    body = {"error": {"message": error.get("message"), "type": "invalid_request_error" if invalid else "server_error",
                      "param": error.get("param"), "code": error.get("code")}}
    return {"id": line.openai_id, "custom_id": line.custom_id or None, "line": line.line,
            "response": {"status_code": 400 if invalid else 500, "request_id": request_id, "body": body},
            "error": {"code": error.get("code"), "message": error.get("message"), "line": line.line}}
