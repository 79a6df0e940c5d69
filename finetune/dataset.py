"""Reading fine-tuning JSONL: every line checked, tokenized, and masked so only replies are trained.

One parser serves both the validation report a user sees before a job starts and the trainer,
so what validates is exactly what trains. Accepted lines:

- chat (OpenAI's fine-tuning format): {"messages": [{"role": ..., "content": ...}, ...]} with
  roles system, developer, user, assistant (and tool); every assistant message is trained
  unless it carries "weight": 0. The conversation is rendered with the checkpoint's own chat
  template, and the loss covers the characters each assistant turn adds to the rendered text
  (its content and the template's end-of-turn marker), found by rendering the conversation up
  to that turn with and without it.
- chat with an "answer" (the eval files of models/*/eval/): {"messages": [... user], "answer":
  "..."} reads as the same messages followed by the answer as the assistant's reply.
- prompt/completion (OpenAI's legacy format): {"prompt": "...", "completion": "..."}, trained
  as plain text: <bos> prompt completion <eos>, loss on the completion and <eos>.

The first well-formed line fixes the file's format; lines of the other one are errors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

ROLES = ("system", "developer", "user", "assistant", "tool")
"""Roles a chat message may have."""
MESSAGE_KEYS = {"role", "content", "name", "weight"}
"""Keys a chat message may carry."""
MAX_LISTED = 100
"""At most this many bad lines (and too-long examples) are listed; the counts cover all of them."""
IGNORE = -100
"""Label of a token that carries no loss."""


class LineError(Exception):
    """A bad line's reason."""


@dataclass(frozen=True)
class Example:
    """One tokenized training example."""

    line: int
    """1-based line number in its file."""
    input_ids: list[int]
    """Token ids of the whole example."""
    labels: list[int]
    """Same length as input_ids; IGNORE except on the tokens the loss covers."""

    @property
    def trained_tokens(self) -> int:
        return sum(label != IGNORE for label in self.labels)


@dataclass
class ParsedFile:
    """Everything learnt from one pass over a JSONL file."""

    format: str | None = None
    """chat or prompt_completion (None: no well-formed line)."""
    examples: list[Example] = field(default_factory=list)
    """Well-formed examples within max_seq_len."""
    errors: list[dict] = field(default_factory=list)
    """The first MAX_LISTED bad lines: {"line": n, "reason": "..."}."""
    error_count: int = 0
    """Bad lines in all."""
    too_long: list[dict] = field(default_factory=list)
    """The first MAX_LISTED well-formed examples over max_seq_len: {"line": n, "tokens": n}."""
    too_long_count: int = 0
    """Examples over max_seq_len in all (left out of training)."""
    lines: int = 0
    """Non-blank lines read."""


def parse_file(path: Path, tokenizer, max_seq_len: int) -> ParsedFile:
    """Check, tokenize and mask every line of a JSONL file; never raises on bad content."""
    parsed = ParsedFile()
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            parsed.lines += 1
            try:
                kind, record = _check_line(raw, parsed.format)
                example = _encode(tokenizer, kind, record, number)
            except LineError as error:
                parsed.error_count += 1
                if len(parsed.errors) < MAX_LISTED:
                    parsed.errors.append({"line": number, "reason": str(error)})
                continue
            parsed.format = parsed.format or kind
            if len(example.input_ids) > max_seq_len:
                parsed.too_long_count += 1
                if len(parsed.too_long) < MAX_LISTED:
                    parsed.too_long.append({"line": number, "tokens": len(example.input_ids)})
                continue
            parsed.examples.append(example)
    return parsed


def _check_line(raw: str, expected: str | None) -> tuple[str, dict]:
    """(format, record) of a well-formed line, or LineError saying what is wrong with it."""
    try:
        record = json.loads(raw)
    except ValueError as error:
        raise LineError(f"invalid JSON: {error}") from None
    if not isinstance(record, dict):
        raise LineError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        kind = "chat"
    elif "prompt" in record or "completion" in record:
        kind = "prompt_completion"
    else:
        raise LineError('expected a "messages" list (chat) or "prompt" and "completion" strings')
    if expected is not None and kind != expected:
        raise LineError(f"this line is {kind} but the file's first well-formed line is {expected}: "
                        "use one format per file")
    if kind == "chat":
        _check_chat(record)
    else:
        _check_prompt_completion(record)
    return kind, record


def _check_chat(record: dict) -> None:
    unknown = set(record) - {"messages", "answer"}
    if unknown:
        raise LineError(f"unknown key {sorted(unknown)[0]!r}: a chat line holds only \"messages\"")
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise LineError('"messages" must be a non-empty list of {"role", "content"} objects')
    for index, message in enumerate(messages, start=1):
        where = f"message {index}"
        if not isinstance(message, dict):
            raise LineError(f"{where} is not an object")
        if "role" not in message:
            raise LineError(f"{where} has no role")
        role = message["role"]
        if role not in ROLES:
            raise LineError(f"{where} has unknown role {role!r}; use one of {', '.join(ROLES)}")
        extra = set(message) - MESSAGE_KEYS
        if extra:
            key = sorted(extra)[0]
            hint = " (tool calls are not supported)" if key in ("tool_calls", "function_call") else ""
            raise LineError(f"{where} has unknown key {key!r}{hint}")
        if "content" not in message or message["content"] is None:
            raise LineError(f"{where} ({role}) has no content")
        if not isinstance(message["content"], str):
            raise LineError(f"{where} ({role}) content must be a string, got {type(message['content']).__name__}")
        if not message["content"].strip():
            raise LineError(f"{where} ({role}) has empty content")
        if "weight" in message and (role != "assistant" or message["weight"] not in (0, 1)
                                    or isinstance(message["weight"], bool)):
            raise LineError(f"{where}: weight must be 0 or 1, on assistant messages only")
        if "name" in message and not isinstance(message["name"], str):
            raise LineError(f"{where}: name must be a string")
    if "answer" in record:
        if not isinstance(record["answer"], str) or not record["answer"].strip():
            raise LineError('"answer" must be a non-empty string')
        if messages[-1]["role"] == "assistant":
            raise LineError('a line with an "answer" must end with a user turn, not an assistant one')
        messages.append({"role": "assistant", "content": record["answer"]})
    if not any(m["role"] == "assistant" and m.get("weight", 1) for m in messages):
        raise LineError("no assistant message to train on (each line needs at least one, with weight 1)")


def _check_prompt_completion(record: dict) -> None:
    unknown = set(record) - {"prompt", "completion"}
    if unknown:
        raise LineError(f"unknown key {sorted(unknown)[0]!r}: a prompt/completion line holds only "
                        "\"prompt\" and \"completion\"")
    for key in ("prompt", "completion"):
        if key not in record:
            raise LineError(f'missing "{key}"')
        if not isinstance(record[key], str):
            raise LineError(f'"{key}" must be a string, got {type(record[key]).__name__}')
    if not record["completion"].strip():
        raise LineError('"completion" is empty')


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    plain = [{"role": m["role"], "content": m["content"], **({"name": m["name"]} if "name" in m else {})}
             for m in messages]
    try:
        return tokenizer.apply_chat_template(plain, add_generation_prompt=generation_prompt, tokenize=False)
    except Exception as error:  # the template's own raise_exception, or a Jinja error
        raise LineError(f"the model's chat template refuses this conversation: {error}") from None


def _encode(tokenizer, kind: str, record: dict, line: int) -> Example:
    if kind == "prompt_completion":
        return _encode_prompt_completion(tokenizer, record, line)
    messages = record["messages"]
    text = _render(tokenizer, messages, generation_prompt=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant" or not message.get("weight", 1):
            continue
        before = _render(tokenizer, messages[:index], generation_prompt=True)
        through = _render(tokenizer, messages[: index + 1], generation_prompt=False)
        if not (through.startswith(before) and text.startswith(through)):
            raise LineError("the model's chat template does not render this conversation turn by turn "
                            "(a prefix changes), so the assistant tokens cannot be located")
        spans.append((len(before), len(through)))
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoding["input_ids"])
    labels = [IGNORE] * len(ids)
    for position, (start, end) in enumerate(encoding["offset_mapping"]):
        if end > start and any(a <= start < b for a, b in spans):
            labels[position] = ids[position]
    if all(label == IGNORE for label in labels):
        raise LineError("the assistant reply tokenizes to nothing")
    return Example(line, ids, labels)


def _encode_prompt_completion(tokenizer, record: dict, line: int) -> Example:
    prompt = tokenizer(record["prompt"], add_special_tokens=False).input_ids if record["prompt"] else []
    completion = tokenizer(record["completion"], add_special_tokens=False).input_ids
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = bos + prompt + completion + eos
    labels = [IGNORE] * (len(bos) + len(prompt)) + completion + eos
    return Example(line, ids, labels)
