"""Which model families Citadel serves, and how each is loaded.

A checkpoint's config.json names its family (`model_type`). Every family served has a native
model definition that runs on Citadel's runtime (inference/engine); anything else is refused
with the list of what is supported.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from ..engine.weights import CheckpointWeights

ENGINE_FAMILIES: dict[str, str] = {
    "deepseek_v4": "inference.models.deepseek_v4:CitadelDeepseekV4",
    "qwen3_moe": "inference.models.qwen3_moe:Qwen3MoeForCausalLM",
}
"""model_type -> "module:Class" of the native definition (the model interface of inference/engine)."""


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture is not one Citadel serves."""


def supported_families() -> list[str]:
    return sorted(ENGINE_FAMILIES)


def model_class(config) -> type[torch.nn.Module]:
    """The native definition of the checkpoint's family; UnsupportedModelError for any other family."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ENGINE_FAMILIES:
        architectures = ", ".join(getattr(config, "architectures", None) or []) or "no architectures listed"
        raise UnsupportedModelError(
            f"unsupported model architecture {model_type!r} ({architectures}): Citadel serves "
            f"{', '.join(supported_families())}"
        )
    module_name, _, class_name = ENGINE_FAMILIES[model_type].partition(":")
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
