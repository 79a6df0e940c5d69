"""Checking one line of a batch input file, as OpenAI does: JSON, custom_id, method, url, body.

The body goes through the same serializers as a one-by-one request to the same endpoint, so a
line is accepted exactly when the request itself would be. What a batch cannot do (streaming,
log-probabilities) is refused per line with a message that says so.
"""

import json
import math
from dataclasses import dataclass

from citadel.gateway.serializers import ROLES, ChatCompletionInput, CompletionInput

SERIALIZERS = {"/v1/chat/completions": ChatCompletionInput, "/v1/completions": CompletionInput}
PLAIN_FIELDS = {"/v1/chat/completions": frozenset({"model", "messages", "max_tokens", "temperature"}),
                "/v1/completions": frozenset({"model", "prompt", "max_tokens", "temperature"})}
# plain_payload's bounds are the serializers' own (both endpoints declare these two fields alike).
_MAX_TOKENS = ChatCompletionInput._declared_fields["max_tokens"]
_TEMPERATURE = ChatCompletionInput._declared_fields["temperature"]


@dataclass(frozen=True)
class LineError:
    line: int
    code: str
    message: str
    param: str | None = None
    custom_id: str = ""

    def as_dict(self) -> dict:
        return {"code": self.code, "message": self.message, "param": self.param, "line": self.line}


@dataclass(frozen=True)
class ValidLine:
    line: int
    custom_id: str
    model: str
    payload: dict


def _first_error(detail, prefix: str = "body") -> tuple[str, str]:
    """(param, message) of the first error in a DRF error dict, e.g. ('body.messages', 'This field is required.')."""
    if isinstance(detail, dict):
        for key, value in detail.items():
            name = prefix if key == "non_field_errors" else f"{prefix}.{key}"
            return _first_error(value, name)
    if isinstance(detail, list) and detail:
        for item in detail:
            if item:
                return _first_error(item, prefix)
    return prefix, str(detail)


class BodyChecker:
    """Checks the bodies of one file's lines with a single serializer, reset between lines.

    DRF deep-copies every declared field into each new serializer: one serializer per line made that
    copy most of the time a 1,024-line file took to be admitted (0.3 s of 0.35 s), all of it before
    the engine could start. Reset (its initial data and the results is_valid() caches), the one
    serializer checks each line exactly as a request of its own would be checked.
    """

    def __init__(self, endpoint: str):
        self._serializer = SERIALIZERS[endpoint](data={})

    def check(self, body: dict):
        """The serializer, validated against `body` (read is_valid's outcome from its `errors`)."""
        serializer = self._serializer
        for cached in ("_validated_data", "_errors", "_data"):
            serializer.__dict__.pop(cached, None)
        serializer.initial_data = body
        serializer.is_valid()
        return serializer


def plain_payload(endpoint: str, body: dict) -> dict | None:
    """The payload the endpoint's serializer makes of `body`, when the body is the plain kind most batch
    lines are (model, messages of role and text or a prompt text, max_tokens, temperature, each plainly
    valid); None for anything else, which the serializer then judges.

    Why a second reading of these four fields: the serializer costs ~80 us a line, 0.08-0.13 s for a
    1,024-line file, all of it between the create call and the engine's first step. Anything this path
    is not sure of (a missing or extra field, a number given as a string, an out-of-range value) goes to
    the serializer, so it can only accept what the serializer accepts, with the same payload; a test
    compares the two over many bodies (tests/platform/test_batches.py).
    """
    if not body.keys() <= PLAIN_FIELDS[endpoint]:
        return None
    model = body.get("model")
    if type(model) is not str or not model or not model.isascii() or not model.isprintable() or model != model.strip():
        return None
    max_tokens, temperature = body.get("max_tokens"), body.get("temperature")
    if max_tokens is not None and (type(max_tokens) is not int
                                   or not _MAX_TOKENS.min_value <= max_tokens <= _MAX_TOKENS.max_value):
        return None
    if temperature is not None and (type(temperature) not in (int, float) or not math.isfinite(temperature)
                                    or not _TEMPERATURE.min_value <= temperature <= _TEMPERATURE.max_value):
        return None
    serializer = SERIALIZERS[endpoint]
    sampling = {"max_tokens": max_tokens or serializer.default_max_tokens}
    if temperature is not None:
        sampling["temperature"] = float(temperature)
    if endpoint == "/v1/completions":
        prompt = body.get("prompt")
        return {"prompt": prompt, "sampling": sampling} if type(prompt) is str and prompt else None
    messages = body.get("messages")
    if type(messages) is not list or not messages:
        return None
    for message in messages:
        if (type(message) is not dict or message.keys() != {"role", "content"} or type(message["role"]) is not str
                or message["role"] not in ROLES or type(message["content"]) is not str):
            return None
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages], "sampling": sampling}


def line_parse(*, number: int, raw: bytes, endpoint: str, checker: BodyChecker | None = None) -> ValidLine | LineError:
    """A valid line, or why it is not (with its line number and, when it has one, its custom_id).
    Pass one `checker` for all the lines of a file (see BodyChecker)."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as error:
        return LineError(number, "invalid_json_line", f"Line {number} is not valid JSON: {error}.")
    if not isinstance(data, dict):
        return LineError(number, "invalid_json_line", f"Line {number} is not a JSON object.")
    custom_id = data.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return LineError(number, "missing_custom_id", f"Line {number} has no custom_id (a non-empty string).",
                         "custom_id")
    if len(custom_id) > 512:
        return LineError(number, "invalid_custom_id", f"Line {number}: custom_id is longer than 512 characters.",
                         "custom_id", custom_id[:512])
    if data.get("method") != "POST":
        return LineError(number, "invalid_method", f"Line {number}: method must be \"POST\".", "method", custom_id)
    if data.get("url") != endpoint:
        return LineError(number, "mismatched_url", f"Line {number}: url is {data.get('url')!r} but the batch's "
                         f"endpoint is {endpoint!r}; every line must use the batch's endpoint.", "url", custom_id)
    body = data.get("body")
    if not isinstance(body, dict):
        return LineError(number, "invalid_body", f"Line {number}: body must be a JSON object (the request).", "body",
                         custom_id)
    if body.get("stream"):
        return LineError(number, "invalid_body", f"Line {number}: body.stream is not possible in a batch; leave it "
                         "out.", "body.stream", custom_id)
    if body.get("logprobs") not in (None, False) or body.get("top_logprobs") is not None:
        return LineError(number, "invalid_body", f"Line {number}: log-probabilities are not returned by Citadel's "
                         "batches yet; leave logprobs out or send the request on its own.", "body.logprobs", custom_id)
    payload = plain_payload(endpoint, body)
    if payload is not None:
        return ValidLine(number, custom_id, body["model"], payload)
    serializer = (checker or BodyChecker(endpoint)).check(body)
    if serializer.errors:
        param, message = _first_error(serializer.errors)
        return LineError(number, "invalid_body", f"Line {number}: {param}: {message}", param, custom_id)
    return ValidLine(number, custom_id, serializer.validated_data["model"], serializer.payload())


def metadata_check(metadata) -> str | None:
    """Why `metadata` is not OpenAI's: up to 16 string keys of 64 characters, string values of 512."""
    if metadata is None:
        return None
    if not isinstance(metadata, dict) or len(metadata) > 16:
        return "metadata must be an object of at most 16 keys."
    for key, value in metadata.items():
        if not isinstance(key, str) or len(key) > 64 or not isinstance(value, str) or len(value) > 512:
            return "metadata keys must be strings of up to 64 characters and values strings of up to 512."
    return None
