"""Reading a PEFT LoRA adapter folder and checking it against the model it is meant for.

Runs in the caller's thread, before the request reaches the engine: any problem (not a LoRA
adapter, a module the engine cannot adapt, a shape that does not fit the base model, values that
are not finite) is an AdapterError naming the folder and the problem, and the engine never sees
the request. Only safetensors are read; PEFT's legacy adapter_model.bin (pickle) is refused.

PEFT computes a LoRA linear as  base(x) + scaling * B(A(dropout(x)))  with scaling
lora_alpha / r (lora_alpha / sqrt(r) with use_rslora), per module when alpha_pattern or
rank_pattern say so. Dropout is off at inference. An adapter may also carry trained rows of the
input embedding and of the output head (PEFT's trainable_token_indices): those rows replace the
base model's for the adapter's requests. Variants that change the formula (DoRA, LoRA biases,
trained copies of whole modules) are refused rather than served differently.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .request import LoRARequest

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
"""What PeftModel.save_pretrained puts in front of the base model's module names."""


class AdapterError(ValueError):
    """The adapter folder cannot be served on this model; the message names the problem."""


@dataclass
class LoRAAdapter:
    """An adapter's tensors on the CPU, keyed by the engine's own module names."""

    name: str
    path: Path
    key: str
    """Identifies these exact weights (folder and file version): equal keys share one loaded copy."""
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = field(repr=False)
    """native module name -> (A [r, in], B [out, r], scaling)."""
    rank: int = 0
    token_rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)
    """"input" / "output" -> (token ids [n], their rows [n, dim]) replacing the embedding's / head's rows."""

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b, _ in self.modules.values()) + sum(
            v.nbytes for _, v in self.token_rows.values()
        )


def load_adapter(
    request: LoRARequest,
    targets: dict[str, tuple[int, int]],
    name_map: Callable[[str], str | None],
    token_modules: dict[str, tuple[str, int, int]] | None = None,
) -> LoRAAdapter:
    """Read `request`'s folder and return its weights for the modules in `targets`.

    targets: native module name -> (in_features, out_features) of each linear the engine can adapt.
    name_map: the base model's module name as PEFT saved it (transformers' names) -> the engine's
    name, or None when that module has no counterpart the engine can adapt.
    token_modules: "input" / "output" -> (native module name, vocabulary size, hidden size) of the
    embedding and the LM head, for adapters that train some of their rows; "tied" -> the same when
    the head shares the embedding's weight.
    """
    folder = Path(request.path)
    if not folder.is_dir():
        raise AdapterError(
            f"adapter {request.name!r}: {folder} is not a folder (a PEFT adapter folder is needed)"
        )
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_path.is_file():
        raise AdapterError(f"adapter {request.name!r}: {folder} has no {CONFIG_FILE}")
    if not weights_path.is_file():
        legacy = (
            " (adapter_model.bin is pickle and is never loaded: re-save with safetensors)"
            if (folder / "adapter_model.bin").exists()
            else ""
        )
        raise AdapterError(f"adapter {request.name!r}: {folder} has no {WEIGHTS_FILE}{legacy}")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        raise AdapterError(f"adapter {request.name!r}: {config_path} is not valid JSON: {error}") from error
    _check_config(request.name, config)

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError) as error:
        raise AdapterError(
            f"adapter {request.name!r}: {weights_path} is not a readable safetensors file: {error}"
        ) from error

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    token_deltas: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        token_match = re.fullmatch(r"(.+)\.token_adapter\.trainable_tokens_delta", key)
        if token_match is not None:
            token_deltas[token_match.group(1).removeprefix(PEFT_PREFIX)] = tensor
            continue
        match = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight", key)
        if match is None:
            raise AdapterError(
                f"adapter {request.name!r}: tensor {key!r} is not a LoRA A/B weight (DoRA magnitudes, LoRA "
                "biases, embedding LoRA and saved whole modules are not served): train a plain LoRA adapter"
            )
        module = match.group(1).removeprefix(PEFT_PREFIX)
        pairs.setdefault(module, {})[match.group(2)] = tensor
    if not pairs and not token_deltas:
        raise AdapterError(f"adapter {request.name!r}: {weights_path} holds no LoRA weights")

    supported = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in targets})) or "none"
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for hf_name, pair in sorted(pairs.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            raise AdapterError(
                f"adapter {request.name!r}: module {hf_name} has {sorted(pair)} but needs both "
                "lora_A and lora_B"
            )
        native = name_map(hf_name)
        if native is None or native not in targets:
            raise AdapterError(
                f"adapter {request.name!r} adapts {hf_name}, which Citadel cannot serve with LoRA on this "
                f"model (it serves LoRA on the linear layers {supported}): train with those target modules"
            )
        a, b = pair["lora_A"], pair["lora_B"]
        in_features, out_features = targets[native]
        rank = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_features or b.shape != (out_features, rank):
            raise AdapterError(
                f"adapter {request.name!r}: {hf_name} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                f"but the base model's layer maps {in_features} -> {out_features} features: the adapter "
                "was trained for a different base model"
            )
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterError(f"adapter {request.name!r}: {hf_name} holds non-finite values (NaN or inf)")
        modules[native] = (a.contiguous(), b.contiguous(), _scaling(config, hf_name, rank))
    token_rows = _token_rows(request.name, config, token_deltas, name_map, token_modules or {})
    key = adapter_cache_key(request)
    rank = max((a.shape[0] for a, _, _ in modules.values()), default=0)
    return LoRAAdapter(
        name=request.name, path=folder, key=key, modules=modules, rank=rank, token_rows=token_rows
    )


def _token_rows(name: str, config: dict, deltas: dict[str, torch.Tensor], name_map, token_modules: dict):
    """{"input"/"output": (ids, rows)} from PEFT's trainable-token tensors and trainable_token_indices."""
    if not deltas:
        return {}
    indices = config.get("trainable_token_indices")
    roles = {module: role for role, (module, _, _) in token_modules.items() if role != "tied"}
    rows = {}
    for hf_name, values in sorted(deltas.items()):
        role = roles.get(name_map(hf_name) or "")
        if role is None:
            raise AdapterError(
                f"adapter {name!r} trains token rows of {hf_name}, which is neither the input "
                "embedding nor the output head of this model"
            )
        leaf = hf_name.rsplit(".", 1)[-1]
        ids = indices.get(leaf) if isinstance(indices, dict) else (indices if role == "input" else None)
        _, vocab, dim = token_modules[role]
        if not isinstance(ids, list) or not all(isinstance(i, int) and 0 <= i < vocab for i in ids):
            raise AdapterError(
                f"adapter {name!r}: trainable_token_indices for {leaf} must be a list of token ids "
                f"below {vocab}, got {ids!r}"
            )
        if tuple(values.shape) != (len(ids), dim):
            raise AdapterError(
                f"adapter {name!r}: {hf_name} has trained rows of shape {tuple(values.shape)}, but "
                f"{len(ids)} token ids of a {dim}-wide model need ({len(ids)}, {dim})"
            )
        if not torch.isfinite(values).all():
            raise AdapterError(f"adapter {name!r}: {hf_name} holds non-finite values (NaN or inf)")
        rows[role] = (torch.tensor(ids, dtype=torch.long), values.contiguous())
    if "input" in rows and "output" not in rows and "tied" in token_modules:
        rows["output"] = rows["input"]  # a tied head reads the same rows (PEFT ties the two adapters)
    return rows


def _check_config(name: str, config: dict) -> None:
    def refuse(what: str) -> None:
        raise AdapterError(f"adapter {name!r}: {what}")

    if config.get("peft_type") != "LORA":
        refuse(f"peft_type is {config.get('peft_type')!r}; only LoRA adapters (peft_type 'LORA') are served")
    if config.get("use_dora"):
        refuse("DoRA adapters (use_dora) are not served: train a plain LoRA adapter")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        refuse(f"bias={config.get('bias')!r}: adapters that train biases are not served; use bias='none'")
    if config.get("modules_to_save"):
        refuse(
            f"modules_to_save={config['modules_to_save']!r}: adapters that save whole modules are not served"
        )
    if config.get("fan_in_fan_out"):
        refuse("fan_in_fan_out=True (GPT-2 style Conv1D layers) does not apply to these models")
    if config.get("target_parameters"):
        refuse(
            "LoRA on raw parameters (target_parameters, e.g. routed experts) is not served: target linear "
            "modules"
        )
    for field_name in ("r", "lora_alpha"):
        value = config.get(field_name)
        if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
            refuse(f"adapter_config.json field {field_name!r} must be a positive number, got {value!r}")


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's per-module override: the first pattern that matches the module name's end."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?{pattern}$", module):
            return value
    return default


def _scaling(config: dict, module: str, rank: int) -> float:
    alpha = _pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"])
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def adapter_cache_key(request: LoRARequest) -> str:
    """The key load_adapter gives these weights, without reading them (for caches)."""
    weights_path = Path(request.path) / WEIGHTS_FILE
    try:
        stat = os.stat(weights_path)
    except OSError:
        return f"missing:{weights_path}"
    return f"{weights_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
