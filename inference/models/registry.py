"""Which model families Citadel serves, and how each is loaded.

A checkpoint's config.json names its family (`model_type`). Families with a native model
definition run on Citadel's runtime (inference/engine); a family listed as served through
transformers runs on transformers' own forward until its native definition lands; anything
else is refused with the list of what is supported.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from ..engine.weights import CheckpointWeights

ENGINE_FAMILIES: dict[str, str] = {
    "qwen3_moe": "inference.models.qwen3_moe:Qwen3MoeForCausalLM",
}
"""model_type -> "module:Class" of the native definition (the model interface of inference/engine)."""

TRANSFORMERS_FAMILIES: tuple[str, ...] = ("deepseek_v4",)
"""Families served by transformers' forward, one sequence at a time, until a native definition lands."""


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture is not one Citadel serves."""


def supported_families() -> list[str]:
    return sorted({*ENGINE_FAMILIES, *TRANSFORMERS_FAMILIES})


def uses_engine(config) -> bool:
    """True for a native family, False for one served through transformers; raises for anything else."""
    model_type = getattr(config, "model_type", None)
    if model_type in ENGINE_FAMILIES:
        return True
    if model_type in TRANSFORMERS_FAMILIES:
        return False
    architectures = ", ".join(getattr(config, "architectures", None) or []) or "no architectures listed"
    raise UnsupportedModelError(
        f"unsupported model architecture {model_type!r} ({architectures}): Citadel serves "
        f"{', '.join(supported_families())}"
    )


def model_class(config) -> type[torch.nn.Module]:
    if not uses_engine(config):
        raise UnsupportedModelError(f"{config.model_type!r} has no native definition yet")
    module_name, _, class_name = ENGINE_FAMILIES[config.model_type].partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def load_model(path: Path, config, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The native model for the checkpoint in `path`: built on the meta device, weights memory-mapped."""
    cls = model_class(config)
    with torch.device("meta"):
        model = cls(config)
    weights = CheckpointWeights(path)
    model.load_weights(weights, device, dtype)
    weights.check_all_used()
    unfilled = [name for name, p in model.named_parameters() if p.is_meta]
    assert not unfilled, f"{cls.__name__}.load_weights left parameters unfilled: {unfilled[:5]}"
    return model.eval()
