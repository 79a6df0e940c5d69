"""Token ids to text, one token at a time, for streaming and for stop strings.

Byte-level BPE tokens are not characters: one token may hold half of a UTF-8 character, and a
stop string may span several tokens. So each step decodes the whole completion and releases
only the part that can no longer change: an incomplete character at the end ("\\ufffd" after
decoding) and any tail that could be the start of a stop string are held back until the next
token settles them. The released deltas therefore always add up to the final text.

Decoding the whole completion each step costs O(n) per token; the runtime that replaces this
module's caller may switch to offset-based incremental decoding.
"""

from __future__ import annotations

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Accumulates generated token ids and releases text deltas that are final."""

    def __init__(self, tokenizer, stop: list[str]):
        self._tokenizer = tokenizer
        self._stop = stop
        self._token_ids: list[int] = []
        self._text = ""
        self._released = 0
        self.stop_string: str | None = None
        """The stop string that matched, once one has."""

    @property
    def text(self) -> str:
        """The completion text so far (cut before a matched stop string)."""
        return self._text

    def add(self, token_id: int) -> str:
        """Append one token; return the newly released text (possibly empty)."""
        assert self.stop_string is None, "no tokens may follow a matched stop string"
        self._token_ids.append(token_id)
        self._text = self._tokenizer.decode(
            self._token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        cut, self.stop_string = self._find_stop()
        if self.stop_string is not None:
            self._text = self._text[:cut]
            return self.flush()
        return self._release(len(self._text) - self._held_back())

    def flush(self) -> str:
        """Release everything still held back (the request has finished)."""
        return self._release(len(self._text))

    def _find_stop(self) -> tuple[int, str | None]:
        """Earliest position where a stop string starts, and which one."""
        # Released text never ends with the beginning of a stop string (see _held_back), so a
        # match can only start in the unreleased part: searching there keeps the released
        # deltas a prefix of the final text, and each step's search short.
        best: tuple[int, str | None] = (len(self._text), None)
        for s in self._stop:
            position = self._text.find(s, self._released)
            if position != -1 and position < best[0]:
                best = (position, s)
        return best

    def _held_back(self) -> int:
        """How many characters at the end of the text might still change or be cut."""
        text = self._text
        held = len(text) - len(text.rstrip(REPLACEMENT_CHAR))
        # The longest suffix (before the held characters) that is a proper prefix of a stop string.
        body = text[: len(text) - held]
        for s in self._stop:
            for n in range(min(len(s) - 1, len(body)), 0, -1):
                if body.endswith(s[:n]):
                    held = max(held, len(text) - len(body) + n)
                    break
        return held

    def _release(self, end: int) -> str:
        end = max(end, self._released)
        delta = self._text[self._released : end]
        self._released = end
        return delta
