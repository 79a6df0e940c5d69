"""Hyperparameters of a LoRA fine-tuning job, validated before anything is loaded.

A job's settings come from users (the OpenAI API's `hyperparameters`, the console's form), so
every field is checked here and a bad one is refused with a ConfigError that names the field
and says what would be accepted, before a dataset is read or a GPU is touched.
`TrainConfig.from_dict(cfg.to_dict())` gives back the same config, so a job row can store it
as JSON.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

TARGET_PRESETS = ("attention", "attention+shared_experts", "attention+experts")
"""Named target-module sets; families.py says which modules each one means for a family."""

LR_SCHEDULES = ("cosine", "linear", "constant")
"""Learning-rate decay after warm-up: cosine or linear down to zero at the last step, or none."""


TRAINABLE_TOKENS = ("none", "new", "reply")
"""Embedding rows trained besides the LoRA matrices (tokens.py): none, the reply tokens the base model
cannot produce, or every reply token."""


class ConfigError(ValueError):
    """An unusable setting or argument: `field` names it, `message` says what is wrong and what to do."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def to_dict(self) -> dict:
        return {"field": self.field, "message": self.message}


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one LoRA fine-tuning run (every field optional in from_dict)."""

    rank: int = 8
    """LoRA rank r: the inner width of each adapter's A (r x in) and B (out x r) matrices."""
    alpha: float = 16.0
    """LoRA alpha: the adapter's output is scaled by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapters' inputs (0 to 1 excluded); routed experts need 0 (PEFT's parameter LoRA)."""
    learning_rate: float = 1e-3
    """Peak learning rate of AdamW, reached after warmup_steps."""
    lr_schedule: str = "cosine"
    """Decay after warm-up: cosine, linear (both to zero at the last step) or constant."""
    warmup_steps: int = 0
    """Steps of linear warm-up from zero to learning_rate."""
    epochs: int = 3
    """Passes over the training file."""
    batch_size: int = 8
    """Examples per optimizer step."""
    max_seq_len: int = 256
    """Longest example in tokens (prompt + reply); longer ones are flagged and left out of training."""
    target_modules: str | tuple[str, ...] = "attention"
    """attention, attention+shared_experts, attention+experts, or a list of module names (PEFT's target_modules)."""
    seed: int = 0
    """Seed of the adapter's initialisation, the data order and dropout: same seed, same adapter."""
    checkpoint_every: int = 50
    """Write a resumable checkpoint every this many steps (0: only at the end)."""
    eval_every: int = 50
    """Compute the validation loss every this many steps and at the end (0: only at the end)."""
    weight_decay: float = 0.0
    """AdamW weight decay on the adapter weights."""
    max_grad_norm: float = 1.0
    """Gradients are clipped to this global norm (0: no clipping)."""
    trainable_tokens: str = "none"
    """none, new or reply: also train the embedding rows of the reply tokens the base cannot produce, or of all."""

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> TrainConfig:
        """Validated config from a JSON-like dict; unknown keys and bad values raise ConfigError."""
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ConfigError("config", "must be a JSON object of hyperparameters")
        values = dict(values)
        known = {f.name for f in fields(cls)}
        for key in values:
            if key not in known:
                raise ConfigError(str(key), f"unknown hyperparameter; the known ones are {', '.join(sorted(known))}")
        if "target_modules" in values and isinstance(values["target_modules"], list):
            values["target_modules"] = tuple(values["target_modules"])
        config = cls(**values)
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable settings; from_dict(to_dict()) round-trips."""
        out = asdict(self)
        if isinstance(self.target_modules, tuple):
            out["target_modules"] = list(self.target_modules)
        return out

    def validate(self) -> None:
        """Raise ConfigError naming the first bad field."""
        _integer("rank", self.rank, 1, 1024)
        _number("alpha", self.alpha, low=0.0, low_open=True)
        _number("dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        _number("learning_rate", self.learning_rate, low=0.0, high=1.0, low_open=True)
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError("lr_schedule", f"{self.lr_schedule!r} is not one of {', '.join(LR_SCHEDULES)}")
        _integer("warmup_steps", self.warmup_steps, 0, 10**7)
        _integer("epochs", self.epochs, 1, 1000)
        _integer("batch_size", self.batch_size, 1, 4096)
        _integer("max_seq_len", self.max_seq_len, 8, 1 << 20)
        _integer("seed", self.seed, 0, 2**63 - 1)
        _integer("checkpoint_every", self.checkpoint_every, 0, 10**9)
        _integer("eval_every", self.eval_every, 0, 10**9)
        _number("weight_decay", self.weight_decay, low=0.0, high=1.0)
        _number("max_grad_norm", self.max_grad_norm, low=0.0)
        if self.trainable_tokens not in TRAINABLE_TOKENS:
            raise ConfigError("trainable_tokens", f"{self.trainable_tokens!r} is not one of "
                                                  f"{', '.join(TRAINABLE_TOKENS)}")
        targets = self.target_modules
        if isinstance(targets, str):
            if targets not in TARGET_PRESETS:
                raise ConfigError("target_modules", f"{targets!r} is not one of {', '.join(TARGET_PRESETS)} "
                                                    "(or give a list of module names)")
        elif isinstance(targets, tuple):
            if not targets or not all(isinstance(t, str) and t.strip() for t in targets):
                raise ConfigError("target_modules", "a list of module names must be non-empty and hold only "
                                                    "non-empty strings, e.g. [\"q_proj\", \"v_proj\"]")
        else:
            raise ConfigError("target_modules", f"must be one of {', '.join(TARGET_PRESETS)} or a list of "
                                                "module names")
        if self.target_modules == "attention+experts" and self.dropout:
            raise ConfigError("dropout", "routed experts are adapted through their fused parameters "
                                         "(PEFT target_parameters), which support no dropout: set dropout to 0 "
                                         "or choose target_modules attention+shared_experts")


def _integer(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, f"must be a whole number from {low} to {high}, got {value!r}")
    if not low <= value <= high:
        raise ConfigError(name, f"must be from {low} to {high}, got {value}")


def _number(name: str, value: Any, low: float | None = None, high: float | None = None,
            low_open: bool = False, high_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(name, f"must be a finite number, got {value!r}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ConfigError(name, f"must be {'above' if low_open else 'at least'} {low}, got {value}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ConfigError(name, f"must be {'below' if high_open else 'at most'} {high}, got {value}")
