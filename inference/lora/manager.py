"""Which adapters are on the model's device, and which rows of a step each one applies to.

Lives in the engine thread. Up to `max_loras` adapters are loaded at once; a request's adapter
is loaded when the scheduler admits the request (acquire) and stays while any running request
uses it. When a new adapter needs room, the least recently used adapter that no running request
holds is evicted; when every loaded adapter is in use, the request waits in the queue (the
scheduler tries again next step) - it is never dropped. Layers are wrapped on the first
adapter, so a model that never serves one runs exactly as before.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .adapter import LoRAAdapter
from .layers import LoRABatch, LoRALinear, TokenRowsEmbedding, TokenRowsHead, wrap_linears, wrap_module


class LoRAManager:
    def __init__(self, model: nn.Module, max_loras: int):
        self.model = model
        self.token_layers: dict[str, TokenRowsEmbedding | TokenRowsHead] = {}
        self.max_loras = max_loras
        self.batch = LoRABatch()
        self.layers: dict[str, LoRALinear] = {}
        self.loaded: OrderedDict[str, LoRAAdapter] = OrderedDict()
        """adapter key -> adapter, least recently used first."""
        self.users: dict[str, int] = {}
        """adapter key -> running requests holding it."""
        self.loads = 0
        self.evictions = 0

    def acquire(self, adapter: LoRAAdapter) -> bool:
        """Hold `adapter` for one running request, loading it if needed; False if no room now."""
        key = adapter.key
        if key not in self.loaded:
            if len(self.loaded) >= self.max_loras and not self._evict_one():
                return False
            self._load(adapter)
        self.loaded.move_to_end(key)
        self.users[key] = self.users.get(key, 0) + 1
        return True

    def release(self, adapter: LoRAAdapter) -> None:
        """One running request no longer needs `adapter` (it stays loaded until room is needed)."""
        left = self.users.get(adapter.key, 0) - 1
        if left > 0:
            self.users[adapter.key] = left
        else:
            self.users.pop(adapter.key, None)

    def set_batch(self, adapters: list[LoRAAdapter | None], query_starts: list[int], device) -> None:
        """Point the wrapped layers at this step's rows: adapters[i] serves rows query_starts[i]:[i+1]."""
        rows: dict[str, list[int]] = {}
        for i, adapter in enumerate(adapters):
            if adapter is not None:
                rows.setdefault(adapter.key, []).extend(range(query_starts[i], query_starts[i + 1]))
        total = query_starts[-1]
        self.batch.active = [
            (key, None if len(r) == total else torch.tensor(r, dtype=torch.long, device=device))
            for key, r in rows.items()
        ]

    def set_logits_batch(self, adapters: list[LoRAAdapter | None], device) -> None:
        """Point the LM head at the adapter of each row of the hidden states that reach it."""
        rows: dict[str, list[int]] = {}
        for i, adapter in enumerate(adapters):
            if adapter is not None and adapter.token_rows:
                rows.setdefault(adapter.key, []).append(i)
        self.batch.active_logits = [
            (key, None if len(r) == len(adapters) else torch.tensor(r, dtype=torch.long, device=device))
            for key, r in rows.items()
        ]

    def clear_batch(self) -> None:
        self.batch.active = []
        self.batch.active_logits = []

    def stats(self) -> dict:
        return {
            "loras_loaded": len(self.loaded),
            "lora_loads": self.loads,
            "lora_evictions": self.evictions,
            "lora_adapters": [adapter.name for adapter in self.loaded.values()],
        }

    def _load(self, adapter: LoRAAdapter) -> None:
        missing = [name for name in adapter.modules if name not in self.layers]
        if missing:
            self.layers.update(wrap_linears(self.model, missing, self.batch))
        for name, (a, b, scaling) in adapter.modules.items():
            base = self.layers[name].base
            device = base.weight.device
            dtype = getattr(
                base, "compute_dtype", base.weight.dtype
            )  # an Fp8Linear computes in the model's dtype
            self.layers[name].adapters[adapter.key] = (
                a.to(device=device, dtype=dtype),
                b.to(device=device, dtype=dtype),
                scaling,
            )
        for role, (ids, values) in adapter.token_rows.items():
            name = self.model.lora_token_modules[role]
            if name not in self.token_layers:
                wrapper = TokenRowsEmbedding if role == "input" else TokenRowsHead
                self.token_layers[name] = wrap_module(self.model, name, lambda m, w=wrapper: w(m, self.batch))
            self.token_layers[name].add(adapter.key, ids, values)
        self.loaded[adapter.key] = adapter
        self.loads += 1

    def _evict_one(self) -> bool:
        for key in self.loaded:  # least recently used first
            if key not in self.users:
                adapter = self.loaded.pop(key)
                for name in adapter.modules:
                    self.layers[name].adapters.pop(key, None)
                for layer in self.token_layers.values():
                    layer.adapters.pop(key, None)
                self.evictions += 1
                return True
        return False
