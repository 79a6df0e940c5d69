"""How one request is decoded: the validated, vLLM-shaped `SamplingParams`.

Everything a client may set per request lives here, checked once when the object is built, so
the decode loop can trust its input and a bad value comes back as a ValueError that names
the field and what to do, which the API layer can hand straight to the client.
"""

from __future__ import annotations

from dataclasses import dataclass

# Below this temperature sampling is numerically greedy; vLLM uses the same cut-off.
GREEDY_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    """Decoding parameters for one request (same names and meanings as vLLM's)."""

    max_tokens: int = 16
    """Most tokens to generate; reaching it ends the request with finish_reason "length"."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy (argmax) decoding."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (0 < top_p <= 1)."""
    top_k: int | None = -1
    """Keep only the k most likely tokens; -1, 0 or None turn it off."""
    stop: list[str] | str | None = None
    """Strings that end generation; the matched stop string is not part of the returned text."""
    stop_token_ids: list[int] | None = None
    """Token ids that end generation (in addition to the model's end-of-sequence tokens)."""
    ignore_eos: bool = False
    """Keep generating past the model's end-of-sequence tokens."""
    seed: int | None = None
    """Random seed for this request: same seed, same output. None draws from the engine's generator."""
    logprobs: int | None = None
    """Return, per generated token, the log-probabilities of the sampled token and of the top `logprobs`."""
    prompt_logprobs: int | None = None
    """Return, per prompt token, its log-probability and the top `prompt_logprobs` alternatives."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop) if self.stop is not None else []
        self.stop_token_ids = list(self.stop_token_ids) if self.stop_token_ids is not None else []
        if self.top_k is None or self.top_k == 0:
            self.top_k = -1
        self._validate()

    def _validate(self) -> None:
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 turns it off), got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(
                f"top_k must be an integer >= 1, or -1, 0 or None to turn it off, got {self.top_k!r}"
            )
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must be a non-empty string or a list of non-empty strings, got {s!r}")
        for t in self.stop_token_ids:
            if not _is_int(t) or t < 0:
                raise ValueError(f"stop_token_ids must be a list of token ids (integers >= 0), got {t!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                raise ValueError(
                    f"{name} must be an integer >= 0 (how many top alternatives) or None, got {value!r}"
                )

    @property
    def greedy(self) -> bool:
        """True when decoding takes the argmax (temperature 0)."""
        return self.temperature < GREEDY_TEMPERATURE


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
