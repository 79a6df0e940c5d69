"""A training-time estimate from a checkpoint's size and this machine's measured matmul speed.

The estimate must come before any weight is loaded (validation runs where datasets are
uploaded), so it is arithmetic, not a trial run:

    seconds = epochs * tokens * 4 * active_parameters / (matmul_flops * EFFICIENCY)
              + steps * layers * STEP_OVERHEAD_PER_LAYER

LoRA training costs about 4 FLOPs per active parameter and token (forward 2, backward 2 for
the activations' gradients; frozen weights get no weight gradient). active_parameters counts
the dense weights a token meets (routed experts scaled by top-k / experts; the embedding
lookup is free), from the model built on the meta device (no memory, no weights read).
matmul_flops is measured here, once per process, as the best of five 20 ms windows of float32 512x512 matmuls on
torch's current threads (the GPU's when there is one). EFFICIENCY and the per-layer overhead
were calibrated on demo-v4 with the default config (attention LoRA, batch 8) on the 2-core
development VM when quiet: about 4,000 tokens/s with one thread, i.e. 3 epochs of its 300-line
fine-tuning file in about 10 s (small models spend much of a step outside large matmuls).
Expect the estimate within a factor of two there (a busy machine is slower), and rougher for
other models, devices and target sets (routed experts and token rows cost more).
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path

from .config import TrainConfig

EFFICIENCY = 0.25
"""Fraction of the measured matmul speed that training reaches (calibrated on demo-v4, CPU)."""
STEP_OVERHEAD_PER_LAYER = 0.004
"""Seconds per optimizer step and decoder layer that do not scale with tokens (CPU, calibrated)."""


@functools.lru_cache(maxsize=8)
def model_size(base_model: str) -> tuple[int, int]:
    """(active parameters per token, decoder layers) of a checkpoint, from its config alone."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_model, trust_remote_code=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    experts = getattr(config, "num_local_experts", None) or getattr(config, "n_routed_experts", None) or 1
    top_k = getattr(config, "num_experts_per_tok", None) or 1
    active = 0.0
    for name, parameter in model.named_parameters():
        if "embed_tokens" in name:
            continue
        share = top_k / experts if ".mlp.experts." in name else 1.0
        active += parameter.numel() * share
    return int(active), int(config.num_hidden_layers)


@functools.lru_cache(maxsize=1)
def matmul_flops() -> tuple[float, str]:
    """(FLOP/s of a float32 512x512 matmul here, the device measured)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(512, 512, device=device)
    b = torch.randn(512, 512, device=device)
    a @ b  # the first call pays for the kernels' set-up
    best = 0.0
    for _ in range(5):  # the best of five 20 ms windows: a busy machine slows some of them
        runs, started = 0, time.perf_counter()
        while time.perf_counter() - started < 0.02:
            a @ b
            runs += 1
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * 512**3 * runs / (time.perf_counter() - started))
    return best, device


def estimate_seconds(base_model: Path, lengths: list[int], config: TrainConfig) -> tuple[float | None, str]:
    """(estimated seconds to train these example lengths under config, how it was estimated)."""
    if not lengths:
        return None, "no usable examples"
    active, layers = model_size(str(base_model))
    flops, device = matmul_flops()
    tokens = sum(lengths) * config.epochs
    steps = math.ceil(len(lengths) / config.batch_size) * config.epochs
    seconds = tokens * 4 * active / (flops * EFFICIENCY) + steps * layers * STEP_OVERHEAD_PER_LAYER
    basis = (f"heuristic: {config.epochs} epochs x {sum(lengths)} tokens x 4 x {active:,} active parameters at "
             f"{EFFICIENCY:.0%} of {flops / 1e9:.1f} GFLOP/s measured on this {device}, plus "
             f"{STEP_OVERHEAD_PER_LAYER * 1000:.0f} ms per step and layer")
    return round(seconds, 1), basis
