"""The engine's knobs, validated once, so a bad deployment setting fails at load with a clear message."""

from __future__ import annotations

from dataclasses import dataclass

QUANTIZATIONS = (None, "fp8")


@dataclass
class EngineConfig:
    """Scheduling and cache settings (each may come from a deployment's engine_settings)."""

    max_num_seqs: int = 128
    """Most sequences in the running batch at once."""
    max_num_batched_tokens: int = 512
    """Token budget of one step: decodes (one token each) plus prefill chunks; longer prompts are
    prefilled in chunks over several steps, so running decodes are never stalled behind them."""
    block_size: int = 16
    """Entries per cache page of the model's widest paged cache group: tokens, for a plain K/V cache;
    compressed entries (each `tokens_per_entry` tokens) for DeepSeek-V4's CSA/HCA caches."""
    kv_cache_memory: int | None = None
    """Bytes of cache memory; None: a share of free memory, capped at what max_num_seqs full
    sequences can use."""
    max_model_len: int | None = None
    """Most tokens (prompt plus completion) per sequence; None: the model's maximum."""
    quantization: str | None = None
    """"fp8": quantize the linear weights to block-wise FP8 at load time (inference/quant). Checkpoints
    that ship FP8 weights (DeepSeek's `weight_scale_inv` format) are served in FP8 either way."""
    max_loras: int = 8
    """Most LoRA adapters on the model's device at once (requests for others wait for a free place)."""

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "max_loras"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        for name in ("kv_cache_memory", "max_model_len"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
