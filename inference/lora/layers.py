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
    active_logits: list[tuple[str, torch.Tensor | None]] = field(default_factory=list)
    """The same for the rows of the hidden states that reach the LM head (compute_logits)."""


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


class TokenRowsEmbedding(nn.Module):
    """Wraps the input embedding: an adapter's trained rows replace the base rows of its tokens."""

    def __init__(self, base: nn.Embedding, batch: LoRABatch):
        super().__init__()
        self.base, self.batch = base, batch
        self.adapters: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        """adapter key -> (row of each vocabulary id in `values`, -1 for none [vocab], values [n, dim])."""

    def add(self, key: str, ids: torch.Tensor, values: torch.Tensor) -> None:
        weight = self.base.weight
        slot_of = torch.full((weight.shape[0],), -1, dtype=torch.long, device=weight.device)
        slot_of[ids.to(weight.device)] = torch.arange(len(ids), device=weight.device)
        self.adapters[key] = (slot_of, values.to(device=weight.device, dtype=weight.dtype))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base(ids)
        for key, rows in self.batch.active:
            entry = self.adapters.get(key)
            if entry is None:
                continue
            slot_of, values = entry
            slots = slot_of[ids if rows is None else ids.index_select(0, rows)]
            hit = (slots >= 0).nonzero().flatten()
            if hit.numel():
                target = hit if rows is None else rows.index_select(0, hit)
                out = out.index_copy(0, target, values.index_select(0, slots.index_select(0, hit)))
        return out


class TokenRowsHead(nn.Module):
    """Wraps the LM head: an adapter's trained rows give the logits of its tokens for its requests."""

    def __init__(self, base: nn.Module, batch: LoRABatch):
        super().__init__()
        self.base, self.batch = base, batch
        self.adapters: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        """adapter key -> (token ids [n], rows [n, dim])."""

    def add(self, key: str, ids: torch.Tensor, values: torch.Tensor) -> None:
        weight = self.base.weight
        self.adapters[key] = (ids.to(weight.device), values.to(device=weight.device, dtype=weight.dtype))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.base(hidden)
        for key, rows in self.batch.active_logits:
            entry = self.adapters.get(key)
            if entry is None:
                continue
            ids, values = entry
            if rows is None:
                out[:, ids] = F.linear(hidden, values)
            else:
                out[rows[:, None], ids[None, :]] = F.linear(hidden.index_select(0, rows), values)
        return out


def wrap_module(model: nn.Module, name: str, wrapper):
    """Replace module `name` of `model` by wrapper(module), unless it is wrapped already; return the wrapper."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    layer = getattr(parent, child)
    if not isinstance(layer, TokenRowsEmbedding | TokenRowsHead):
        layer = wrapper(layer)
        setattr(parent, child, layer)
    return layer


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


def token_modules(model: nn.Module) -> dict[str, tuple[str, int, int]]:
    """ "input"/"output" (and "tied") -> (module name, vocabulary size, hidden size) of the embedding and
    the LM head named by the model's `lora_token_modules`, for adapters that train token rows."""
    found = {}
    weights = {}
    for role, name in getattr(model, "lora_token_modules", {}).items():
        module = model.get_submodule(name)
        module = getattr(module, "base", module)  # already wrapped
        vocab, dim = module.weight.shape
        found[role], weights[role] = (name, vocab, dim), module.weight
    if "input" in weights and "output" in weights and weights["input"] is weights["output"]:
        found["tied"] = found["output"]
    return found
