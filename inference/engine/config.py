"""The engine's knobs, validated once, so a bad deployment setting fails at load with a clear message."""

from __future__ import annotations

from dataclasses import dataclass

QUANTIZATIONS = (None, "fp8")
KV_CACHE_DTYPES = ("auto", "fp8")  # engine/kv_quant.py (this file imports nothing but dataclasses)


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
    kv_cache_dtype: str = "auto"
    """How KV cache pages store their entries: "auto", the model's dtype; "fp8", float8_e4m3fn with a
    power-of-two scale per token and head (engine/kv_quant.py): half the bytes of bf16, so the same
    kv_cache_memory or KV tier budgets hold twice as many pages, at a small accuracy cost."""
    max_loras: int = 8
    """Most LoRA adapters on the model's device at once (requests for others wait for a free place)."""
    enable_prefix_caching: bool = True
    """Reuse the cache pages of a prompt prefix that an earlier request (same cache_salt and adapter)
    computed: full blocks only, kept until their pages are needed (engine/prefix_cache.py)."""
    kv_device_bytes: int | None = None
    """KV tiers (engine/tiers.py): bytes of the fast tier, the cache memory on the model's device (its
    per-sequence slots first, then pages). None: untiered, sized by kv_cache_memory."""
    kv_host_bytes: int | None = None
    """Bytes of KV pages in host memory (pinned on a GPU) behind the device tier; None: no host tier."""
    kv_disk_bytes: int | None = None
    """Bytes of KV pages in a file under kv_disk_path behind the host tier; None: no disk tier."""
    kv_disk_path: str | None = None
    """Folder for the disk tier's file (created if missing; the file is unlinked as soon as it is mapped, so it
    never outlives the engine, even a crashed one)."""
    expert_cache_experts: int | None = None
    """Expert tiers (engine/expert_store.py): routed experts per MoE layer kept on the model's device;
    the others wait in host memory or in the checkpoint on disk. None (and no expert_cache_bytes):
    every expert resident."""
    expert_cache_bytes: int | None = None
    """The same fast tier as a byte budget over all MoE layers (instead of expert_cache_experts): FP8
    experts are half the bytes of bf16, so the same budget holds twice as many."""
    expert_host_experts: int | None = None
    """Routed experts per MoE layer kept in host memory (pinned on a GPU) behind the fast tier; the
    rest are read from the memory-mapped checkpoint when needed. None: all of them (no disk reads)."""
    expert_prefetch: bool = True
    """Stage the next MoE layer's likely experts (its router run on the current layer's input)."""

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "max_loras"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(f"enable_prefix_caching must be true or false, got {self.enable_prefix_caching!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}: \"auto\" stores "
                "the KV cache in the model's dtype, \"fp8\" in float8_e4m3fn with per-token scales"
            )
        for name in ("kv_cache_memory", "max_model_len", "kv_device_bytes", "kv_host_bytes", "kv_disk_bytes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        self._check_tiers()
        self._check_expert_tiers()

    def _check_tiers(self) -> None:
        if self.kv_device_bytes is None:
            for name in ("kv_host_bytes", "kv_disk_bytes", "kv_disk_path"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} needs kv_device_bytes (the fast tier's budget): set both, or neither")
            return
        if self.kv_cache_memory is not None:
            raise ValueError(
                "kv_cache_memory and kv_device_bytes both size the device's cache: set kv_device_bytes "
                "(with kv_host_bytes / kv_disk_bytes) for a tiered cache, or kv_cache_memory alone"
            )
        if (self.kv_disk_bytes is None) != (self.kv_disk_path is None):
            raise ValueError("kv_disk_bytes and kv_disk_path go together: the disk tier needs a size and a folder")
        if self.kv_disk_path is not None and not isinstance(self.kv_disk_path, str):
            raise ValueError(f"kv_disk_path must be a folder path (a string), got {self.kv_disk_path!r}")

    def _check_expert_tiers(self) -> None:
        for name in ("expert_cache_experts", "expert_cache_bytes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        host = self.expert_host_experts
        if host is not None and (not isinstance(host, int) or isinstance(host, bool) or host < 0):
            raise ValueError(f"expert_host_experts must be an integer >= 0 or None (all), got {host!r}")
        if not isinstance(self.expert_prefetch, bool):
            raise ValueError(f"expert_prefetch must be true or false, got {self.expert_prefetch!r}")
        if self.expert_cache_experts is not None and self.expert_cache_bytes is not None:
            raise ValueError("expert_cache_experts and expert_cache_bytes both size the experts' fast tier: set one")
        if host is not None and self.expert_cache_experts is None and self.expert_cache_bytes is None:
            raise ValueError(
                "expert_host_experts needs a fast tier: set expert_cache_experts or expert_cache_bytes too"
            )
