"""Per-token log-probabilities as the OpenAI API returns them, built on the worker.

The engine gives, per generated token, a mapping {token_id: logprob} holding the chosen token
first and then the `k` most likely ones (inference.outputs.TokenLogprobs). Clients need token
strings and their UTF-8 bytes, and only the worker has the tokenizer, so the worker turns each
mapping into the chat API's own entry and stores that with the job and its chunks:

    {"token": str, "logprob": float, "bytes": [int, ...],
     "top_logprobs": [{"token": str, "logprob": float, "bytes": [int, ...]}, ...]}   # k, best first

The gateway returns these as they are for chat and reshapes them into the legacy completions
form (tokens, token_logprobs, top_logprobs, text_offset).
"""

from __future__ import annotations

import math
import re
import threading

# OpenAI's stand-in for a log-probability too small to represent (JSON has no -Infinity).
UNLIKELY = -9999.0
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the printable character that stands for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(c): b for b, c in [*zip(printable, printable, strict=True),
                                   *zip(others, range(256, 256 + len(others)), strict=True)]}


_BYTE_OF_CHAR = _byte_level_alphabet()


class TokenTexts:
    """Token id -> (text, exact UTF-8 bytes), from the model's tokenizer, cached.

    Give it a tokenizer of its own: the engine's is used by the engine loop thread, and a fast
    tokenizer used by several threads at once can fail with "Already borrowed".
    """

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._lock = threading.Lock()
        self._cache: dict[int, tuple[str, list[int]]] = {}
        self.special_ids = frozenset(tokenizer.all_special_ids)

    def get(self, token_id: int) -> tuple[str, list[int]]:
        with self._lock:
            found = self._cache.get(token_id)
            if found is None:
                found = self._cache[token_id] = self._lookup(token_id)
            return found

    def _lookup(self, token_id: int) -> tuple[str, list[int]]:
        try:
            text = self._tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            raw = self._tokenizer.convert_ids_to_tokens(token_id)
        except (IndexError, KeyError, OverflowError, TypeError, ValueError):  # an id past the tokenizer's vocab
            return "", []
        return text, list(token_bytes(raw, text))


def token_bytes(raw: str | None, text: str) -> bytes:
    """A token's exact bytes, which its decoded text loses when it holds part of a character.

    A byte-level BPE token spells its bytes in GPT-2's alphabet ("Ã" is 0xC3) and a SentencePiece
    byte-fallback token is "<0xC3>"; any other token is its text's UTF-8.
    """
    if isinstance(raw, str) and raw:
        fallback = _BYTE_FALLBACK.fullmatch(raw)
        if fallback:
            return bytes([int(fallback.group(1), 16)])
        if all(char in _BYTE_OF_CHAR for char in raw):
            spelled = bytes(_BYTE_OF_CHAR[char] for char in raw)
            # Only when the tokenizer really is byte-level: then its decoded text is these bytes.
            if spelled.decode("utf-8", errors="replace") == text:
                return spelled
    return text.encode("utf-8")


def _finite(value: float) -> float:
    return value if math.isfinite(value) else UNLIKELY


def _entry(texts: TokenTexts, token_id: int, logprob: float) -> dict:
    text, raw = texts.get(token_id)
    return {"token": text, "logprob": _finite(logprob), "bytes": raw}


def token_entry(texts: TokenTexts, mapping: dict[int, float], *, top: int) -> dict:
    """One generated token's entry from the engine's {chosen id: logprob, then the top ids}."""
    (chosen, logprob), *_ = mapping.items()
    best = sorted(((token_id, _finite(value)) for token_id, value in mapping.items()),
                  key=lambda item: item[1], reverse=True)[:top]
    return {**_entry(texts, chosen, logprob), "top_logprobs": [_entry(texts, t, value) for t, value in best]}


def event_entries(texts: TokenTexts, event, *, top: int) -> list[dict]:
    """The entries of one engine StreamEvent's tokens.

    The special token that ends a request (end of sequence, or a stop token) is left out: its
    text is not part of the output, and OpenAI does not list it either.
    """
    if not event.logprobs:
        return []
    entries = []
    last = len(event.token_ids) - 1
    for position, (token_id, mapping) in enumerate(zip(event.token_ids, event.logprobs, strict=True)):
        if position == last and event.finish_reason == "stop" and token_id in texts.special_ids:
            continue
        entries.append(token_entry(texts, mapping, top=top))
    return entries
