"""Which model families Citadel serves, and how each is loaded.

A checkpoint's config.json names its family (`model_type`). Every family served has a native
model definition that runs on Citadel's runtime (inference/engine); anything else is refused
with the list of what is supported.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from ..engine.expert_store import ExpertStore, ExpertTierSettings
from ..engine.weights import CheckpointError, CheckpointWeights
from ..quant.fp8 import quantize_linears

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


def load_model(
    path: Path,
    config,
    device: torch.device,
    dtype: torch.dtype,
    quantization: str | None = None,
    expert_tiers: ExpertTierSettings | None = None,
) -> torch.nn.Module:
    """The native model for the checkpoint in `path`: built on the meta device, weights memory-mapped.

    Weights stored in FP8 (a float8_e4m3fn `weight` beside its `weight_scale_inv`, DeepSeek's format)
    stay FP8 (their layers become Fp8Linear); quantization="fp8" quantizes the other linear weights
    at load time (see inference/quant/fp8.py and each model's `fp8_excluded`).
    With expert_tiers, the routed experts are not loaded with the rest: the model hands them to an
    ExpertStore (engine/expert_store.py), which keeps a budget of them on the device.
    """
    cls = model_class(config)
    with torch.device("meta"):
        model = cls(config)
    weights = CheckpointWeights(path)
    native_fp8 = _native_fp8_modules(weights)
    if native_fp8:
        if not getattr(cls, "loads_native_fp8", False):
            raise UnsupportedModelError(
                f"the checkpoint in {path} stores FP8 weights (e.g. {native_fp8[0]}.weight_scale_inv), which "
                f"Citadel reads for {', '.join(_native_fp8_families())} checkpoints only: load the bf16 checkpoint "
                "with quantization='fp8' instead"
            )
        _make_fp8(model, native_fp8, dtype)
    sources = None
    if expert_tiers is not None:
        if not hasattr(model, "expert_sources"):
            raise UnsupportedModelError(f"{cls.__name__} has no routed experts to tier: leave expert_cache_experts unset")
        sources = model.expert_sources(weights, dtype, quantization)
    model.load_weights(weights, device, dtype)
    weights.check_all_used()
    unfilled = [name for name, p in model.named_parameters() if p.is_meta]
    assert not unfilled, f"{cls.__name__}.load_weights left parameters unfilled: {unfilled[:5]}"
    if quantization == "fp8":
        quantize_linears(model, excluded=getattr(model, "fp8_excluded", None))
    if sources is not None:
        model.expert_store = ExpertStore(sources, expert_tiers, device)
    return model.eval()


def _native_fp8_modules(weights: CheckpointWeights) -> list[str]:
    """Checkpoint module names whose weight is stored in FP8 with a block scale beside it."""
    modules = []
    for name in weights.names():
        if name.endswith(".weight_scale_inv"):
            module = name.removesuffix(".weight_scale_inv")
            if f"{module}.weight" in weights and weights.dtype_name(f"{module}.weight") == "F8_E4M3":
                modules.append(module)
    return modules


def _make_fp8(model: torch.nn.Module, checkpoint_modules: list[str], dtype: torch.dtype) -> None:
    """Turn the model's layers for these checkpoint modules into Fp8Linear (still on the meta device)."""
    from ..quant.fp8 import Fp8Linear

    for stored in checkpoint_modules:
        name = model.checkpoint_module_name(stored)
        try:
            layer = model.get_submodule(name)
        except AttributeError as error:
            raise CheckpointError(
                f"the checkpoint's FP8 weight {stored}.weight matches no layer of the model"
            ) from error
        if not isinstance(layer, torch.nn.Linear) or layer.bias is not None:
            raise CheckpointError(
                f"the checkpoint stores {stored}.weight in FP8, but that layer is not a bias-free linear"
            )
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Fp8Linear(layer.in_features, layer.out_features, dtype))


def _native_fp8_families() -> list[str]:
    families = []
    for model_type in supported_families():
        module_name, _, class_name = ENGINE_FAMILIES[model_type].partition(":")
        if getattr(getattr(importlib.import_module(module_name), class_name), "loads_native_fp8", False):
            families.append(model_type)
    return families
