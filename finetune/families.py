"""The model families LoRA training supports, and which modules each target preset adapts.

The module names are those of transformers' own classes (modeling_deepseek_v4.py,
modeling_qwen3_moe.py), so the adapters PEFT writes load on the same classes anywhere.
In transformers 5 the routed experts of both families are fused 3-D parameters
(`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I]) rather than
nn.Linear modules: PEFT reaches them through `target_parameters` (a low-rank update per
expert), which allows no LoRA dropout.

DeepSeek-V4's `self_attn.o_a_proj` is a grouped (block-diagonal) projection that subclasses
nn.Linear but reshapes its input by groups; PEFT's Linear LoRA would add an ungrouped update
of the wrong shape, so it is never targeted (o_b_proj, the mixing projection after it, is).
Its compressor and indexer also have modules called kv_proj and q_b_proj, which is why the
presets are anchored on `self_attn.<name>` rather than bare names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError, TrainConfig

ROUTED_EXPERT_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
"""The fused routed-expert parameters, for PEFT's target_parameters (matched as suffixes)."""


@dataclass(frozen=True)
class Family:
    """What LoRA needs to know about one supported architecture."""

    model_type: str
    """config.json's model_type."""
    architecture: str
    """transformers class the checkpoint loads as."""
    attention: tuple[str, ...]
    """Attention projection names under each layer's self_attn."""
    shared_experts: tuple[str, ...]
    """Projection names under each layer's mlp.shared_experts (empty: the family has none)."""
    never: tuple[str, ...] = ()
    """Module names that PEFT's Linear LoRA cannot wrap correctly in this family."""


FAMILIES = {
    "deepseek_v4": Family("deepseek_v4", "DeepseekV4ForCausalLM", ("q_a_proj", "q_b_proj", "kv_proj", "o_b_proj"),
                          ("gate_proj", "up_proj", "down_proj"), never=("o_a_proj",)),
    "qwen3_moe": Family("qwen3_moe", "Qwen3MoeForCausalLM", ("q_proj", "k_proj", "v_proj", "o_proj"), ()),
}


def family_of(base_model: str | Path) -> Family:
    """The supported family of a checkpoint folder, or ConfigError(field="base_model")."""
    path = Path(base_model)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ConfigError("base_model", f"{path} is not a Hugging Face checkpoint folder (no config.json)")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (OSError, ValueError) as error:
        raise ConfigError("base_model", f"{config_file} is not readable JSON: {error}") from error
    if model_type not in FAMILIES:
        raise ConfigError("base_model", f"model_type {model_type!r} is not supported for fine-tuning; "
                                        f"supported: {', '.join(sorted(FAMILIES))}")
    if not any(path.glob("*.safetensors")):
        raise ConfigError("base_model", f"{path} has no *.safetensors weights")
    return FAMILIES[model_type]


def lora_targets(family: Family, config: TrainConfig) -> tuple[list[str] | str, list[str]]:
    """(PEFT target_modules, PEFT target_parameters) for the config's target_modules on this family."""
    targets = config.target_modules
    attention = rf".*\.self_attn\.({'|'.join(family.attention)})"
    shared = rf".*\.mlp\.shared_experts\.({'|'.join(family.shared_experts)})"
    if targets == "attention":
        return attention, []
    if targets == "attention+shared_experts":
        if not family.shared_experts:
            raise ConfigError("target_modules", f"{family.architecture} has no shared experts: choose attention "
                                                "or attention+experts")
        return rf"{attention}|{shared}", []
    if targets == "attention+experts":
        modules = rf"{attention}|{shared}" if family.shared_experts else attention
        return modules, list(ROUTED_EXPERT_PARAMETERS)
    names = list(targets)
    blocked = [n for n in names if n.rsplit(".", 1)[-1] in family.never]
    if blocked:
        raise ConfigError("target_modules", f"{', '.join(blocked)} cannot be adapted in {family.architecture} "
                                            "(a grouped projection PEFT's Linear LoRA would break); leave it out")
    parameters = [n for n in names if n.split(".")[-2:] in (["experts", "gate_up_proj"], ["experts", "down_proj"])]
    if parameters and config.dropout:
        raise ConfigError("dropout", "routed experts (fused parameters) support no LoRA dropout: set dropout to 0")
    return [n for n in names if n not in parameters], parameters


def check_targets_match(model, modules: list[str] | str, parameters: list[str]) -> None:
    """ConfigError for an explicit module or parameter name that matches nothing in the loaded model."""
    if isinstance(modules, str):
        return
    module_names = [name for name, _ in model.named_modules()]
    parameter_names = [name for name, _ in model.named_parameters()]
    for name in modules:
        if not any(m == name or m.endswith("." + name) for m in module_names):
            examples = sorted({m.rsplit(".", 1)[-1] for m in module_names if m.endswith("_proj")})
            raise ConfigError("target_modules", f"{name!r} matches no module of this model; module names "
                                                f"include {', '.join(examples)}")
    for name in parameters:
        if not any(p.endswith("." + name) for p in parameter_names):
            raise ConfigError("target_modules", f"{name!r} matches no parameter of this model")
