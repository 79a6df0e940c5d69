"""What the engine returns: vLLM-shaped request outputs and the events of a token stream.

Plain dataclasses with no torch inside, so a Celery worker can turn them into JSON without
knowing anything about the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# {token_id: log-probability}; the first entry is the token that was sampled (or is in the prompt).
TokenLogprobs = dict[int, float]


@dataclass
class CompletionOutput:
    """One generated completion of a request."""

    index: int
    text: str
    """The generated text, without the prompt and without a matched stop string or stop token."""
    token_ids: list[int]
    """Generated token ids; includes the eos or stop token that ended generation, as in vLLM."""
    finish_reason: str | None
    """"stop" (eos, stop token or stop string) or "length" (max_tokens reached)."""
    logprobs: list[TokenLogprobs] | None = None
    """Per generated token, when SamplingParams.logprobs was set."""
    stop_reason: int | str | None = None
    """The stop string or token id that ended generation; None for eos or length."""


@dataclass
class RequestOutput:
    """The result of one prompt: the prompt as the engine saw it and its completions."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[TokenLogprobs | None] | None
    """Per prompt token when SamplingParams.prompt_logprobs was set; None at position 0."""
    outputs: list[CompletionOutput] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def logprobs(self) -> list[TokenLogprobs] | None:
        return self.outputs[0].logprobs


@dataclass
class StreamEvent:
    """One step of a token stream: the new text and tokens since the previous event.

    The concatenation of every event's `text` equals the final text that `generate` returns.
    `text` may be empty while the tail is held back (an incomplete UTF-8 character, or text
    that could be the beginning of a stop string).
    """

    text: str
    token_ids: list[int]
    finish_reason: str | None
    """Set on the last event only."""
    prompt_tokens: int
    completion_tokens: int
    """Tokens generated so far, including this event's."""
    logprobs: list[TokenLogprobs] | None = None
    """Per token of this event, when SamplingParams.logprobs was set."""
