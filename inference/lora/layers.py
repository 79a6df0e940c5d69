"""The LoRA-aware linear layer: the base projection plus each active adapter's update on its rows.

A step's tokens are flattened into one [T, ...] batch (inference/engine/context.py) in which
every sequence's tokens are contiguous. Before the model runs, the manager tells the shared
LoRABatch which rows belong to which loaded adapter; each wrapped layer then computes

    out = base(x);  out[rows_a] += scaling_a * (x[rows_a] @ A_a^T) @ B_a^T   for each adapter a

which is PEFT's formula applied per request. Rows of base-model requests get nothing added, and
a step without adapters costs one attribute check per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.fp8 import Fp8Linear

LINEAR_TYPES = (nn.Linear, Fp8Linear)


@dataclass
class LoRABatch:
    """The current step's adapter rows, shared by every wrapped layer of one model."""

    active: list[tuple[str, torch.Tensor | None]] = field(default_factory=list)
    """(adapter key, row indices [n] on the device, or None when the adapter has every row)."""


class LoRALinear(nn.Module):
    """Wraps a linear layer (nn.Linear or Fp8Linear, kept as `base`, untouched) with the updates of loaded adapters."""

    def __init__(self, base: nn.Module, batch: LoRABatch):
        super().__init__()
        self.base = base
        self.batch = batch
        self.in_features, self.out_features = base.in_features, base.out_features
        self.adapters: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        """adapter key -> (A [r, in], B [out, r], scaling) on the layer's device and dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.batch.active:
            return out
        for key, rows in self.batch.active:
            weights = self.adapters.get(key)
            if weights is None:  # this adapter leaves this layer alone
                continue
            a, b, scaling = weights
            if rows is None:
                out = out + F.linear(F.linear(x, a), b) * scaling
            else:
                delta = F.linear(F.linear(x.index_select(0, rows), a), b) * scaling
                out = out.index_add(0, rows, delta)
        return out


def wrap_linears(model: nn.Module, names: list[str], batch: LoRABatch) -> dict[str, LoRALinear]:
    """Replace each named nn.Linear of `model` by a LoRALinear around it; return them by name."""
    wrapped: dict[str, LoRALinear] = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = getattr(parent, child)
        if isinstance(layer, LoRALinear):
            wrapped[name] = layer
            continue
        if not isinstance(layer, LINEAR_TYPES):
            raise TypeError(f"{name} is a {type(layer).__name__}, not a linear layer LoRA can wrap")
        wrapped[name] = LoRALinear(layer, batch)
        setattr(parent, child, wrapped[name])
    return wrapped


def lora_targets(model: nn.Module) -> dict[str, tuple[int, int]]:
    """The linear layers of `model` that serve LoRA: name -> (in_features, out_features).

    Every nn.Linear (or already wrapped one) except those the model lists in `lora_excluded`
    (a regular expression over module names: e.g. the LM head, or weights a model reads directly
    instead of calling the layer).
    """
    import re

    excluded = getattr(model, "lora_excluded", None)
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            found[name] = (module.in_features, module.out_features)
        elif isinstance(module, LINEAR_TYPES) and not name.endswith(".base"):
            if excluded and re.search(excluded, name):
                continue
            found[name] = (module.in_features, module.out_features)
    return found
