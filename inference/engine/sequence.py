"""One request's state: its tokens, where it stands in the scheduler, and the output it becomes.

`append_token` is the one place where a generated token is checked against stop tokens, eos,
stop strings and max_tokens and turned into a StreamEvent, so `generate` and `stream` end
requests the same way.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from ..detokenizer import IncrementalDetokenizer
from ..lora.adapter import LoRAAdapter
from ..outputs import CompletionOutput, RequestOutput, StreamEvent, TokenLogprobs
from ..sampling_params import SamplingParams

NO_TIE = 2**62
"""Sequence.first_tie of a sequence whose cache entries depend on its tokens alone."""


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    """Generated tokens."""
    logprobs: list[TokenLogprobs] | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    # -- scheduling state (the engine's) --
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    """Tokens whose cache entries are written; the rest are fed at the next steps."""
    block_tables: list[list[int]] = field(default_factory=list)
    """Pages held, one list per paged cache group (in CacheSpec.paged_groups order)."""
    slot: int | None = None
    """The slot holding this sequence's per-sequence cache state (models that declare some)."""
    generator: torch.Generator | None = None
    """This request's sampling randomness (seeded: same draws alone or in any batch)."""
    num_preemptions: int = 0
    lora: LoRAAdapter | None = None
    """The adapter this request is served with (None: the base model)."""
    lora_held: bool = False
    """Whether the request holds its adapter's place on the device (while it runs)."""
    cache_salt: str | None = None
    """Namespace of this request's prefix-cache entries: only requests with the same salt share them."""
    block_hashes: list[bytes] = field(default_factory=list)
    """Prefix-cache names of this sequence's full blocks so far (engine/prefix_cache.py)."""
    cached_blocks: list = field(default_factory=list)
    """The cached blocks at the start of its block tables, one per full block (None: kept private)."""
    counted_prefix: bool = False
    """Whether its admission was counted in the prefix cache's hits and misses."""
    first_tie: int = NO_TIE
    """The first position whose cache entries depend on the prompt's length (DeepSeek-V4 breaks exact
    ties of its indexer's top-k as transformers does, by the prompt's length): blocks from there on
    are not cached, so a hit never gives what another prompt length would not have computed."""

    def __post_init__(self) -> None:
        if self.params.logprobs is not None and self.logprobs is None:
            self.logprobs = []
        if self.params.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = [None]  # position 0 has nothing before it

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens: the position of the next token to feed."""
        return len(self.prompt_token_ids) + len(self.token_ids)

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    def tokens(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + completion."""
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.token_ids[max(start - n, 0) : end - n]

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.finish_reason, self.stop_reason = reason, stop_reason

    def append_token(
        self, token: int, logprobs: TokenLogprobs | None, eos_token_ids: set[int], max_model_len: int
    ) -> StreamEvent:
        """Add a generated token, decide whether the request ends, and return its stream event."""
        params = self.params
        self.token_ids.append(token)
        if logprobs is not None and self.logprobs is not None:
            self.logprobs.append(logprobs)
        if token in params.stop_token_ids:
            self.finish("stop", stop_reason=token)
        elif token in eos_token_ids and not params.ignore_eos:
            self.finish("stop")
        if self.finish_reason is not None:  # the stopping token's own text is not part of the output
            delta = self.detokenizer.flush()
        else:
            delta = self.detokenizer.add(token)
            if self.detokenizer.stop_string is not None:
                self.finish("stop", stop_reason=self.detokenizer.stop_string)
            elif len(self.token_ids) >= params.max_tokens or self.num_tokens >= max_model_len:
                self.finish("length")
                delta += self.detokenizer.flush()
        return StreamEvent(
            text=delta,
            token_ids=[token],
            finish_reason=self.finish_reason,
            prompt_tokens=self.num_prompt_tokens,
            completion_tokens=len(self.token_ids),
            logprobs=[logprobs] if logprobs is not None and self.logprobs is not None else None,
        )

    def to_output(self) -> RequestOutput:
        completion = CompletionOutput(
            index=0,
            text=self.detokenizer.text,
            token_ids=list(self.token_ids),
            finish_reason=self.finish_reason,
            logprobs=self.logprobs,
            stop_reason=self.stop_reason,
        )
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=list(self.prompt_token_ids),
            prompt_logprobs=self.prompt_logprobs,
            outputs=[completion],
        )
