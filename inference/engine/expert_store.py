"""Routed experts in tiers: a fast tier on the model's device up to a budget, host memory, the checkpoint on disk.

Why: the routed experts are most of a large MoE model's bytes, and a decode step uses a few of
them per layer. Keeping only a budget of experts per layer on the device, and the rest in host
memory or in the memory-mapped checkpoint, lets a model whose experts outweigh the device's
memory serve on one machine, at the price of the copies its misses cause. mixtral-offloading's
expert cache is the model (per-layer slots, pinned host buffers, non-blocking copies on a side
stream, hit and miss counters); this adds a disk tier, frequency-aware replacement and prefetch.

Tiers, for each MoE layer:
- fast: `fast_experts` slots on the model's device, each a ready expert module whose tensors are
  overwritten in place when another expert moves in. Replacement is LFU with aging: every use
  adds 1 to an expert's score and every use of the layer multiplies all scores by AGING, so the
  experts used often *lately* stay; ties go to the least recently used.
- host: experts' tensors in host memory (pinned when the device is a GPU, so copies are
  asynchronous): all of them (host_experts None), or up to host_experts per layer, least
  recently used out first.
- disk: every expert, in the checkpoint's safetensors shards, memory-mapped: a miss in both
  tiers above reads just that expert's tensors (safetensors' slices of the mapped file).

Every tier holds the expert in its serving form: the dtype the model computes in, or FP8 values
with their block scales (inference/quant) when the experts are FP8, so a byte budget holds twice
the experts of bf16. Because the tensors equal those all-resident serving uses, and
layers/moe.py runs the experts in the same order with the same operations, tiered serving
gives the same tokens and log-probabilities as all-resident serving.

Prefetch: after routing layer l, the store runs the *next* MoE layer's router on layer l's MoE
input (residual streams change little from one layer to the next, so it predicts well) and
stages its most-chosen experts, up to the fast budget; hash-routed layers (DeepSeek-V4's first
layers) are predicted exactly from the token ids, and the first MoE layer from the embeddings
at the start of each step. On a GPU the copies run on a side stream from pinned memory while
the current layer computes (events order slot reuse); on the CPU they are done at once.

Counters (stats(), exported by the worker's /metrics): expert_hits / expert_misses in total and
per layer (expert_l{i}_hits / _misses), expert_prefetch_hits / _misses (staged experts used or
not), expert_host_hits / _misses (fast-tier misses served from host memory or from disk),
expert_bytes_transferred (into the fast tier), expert_disk_bytes_read, expert_resident_bytes
(fast tier) and expert_host_bytes.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

AGING = 0.9
"""Each use of a layer multiplies its experts' frequency scores by this (LFU with aging)."""


@dataclass(frozen=True)
class ExpertTierSettings:
    """The expert-tier part of EngineConfig (expert_cache_experts or expert_cache_bytes set)."""

    fast_experts: int | None
    fast_bytes: int | None
    host_experts: int | None
    prefetch: bool

    @classmethod
    def from_config(cls, config) -> ExpertTierSettings | None:
        """None when every expert stays resident (neither fast-tier budget set)."""
        if config.expert_cache_experts is None and config.expert_cache_bytes is None:
            return None
        return cls(
            config.expert_cache_experts, config.expert_cache_bytes, config.expert_host_experts, config.expert_prefetch
        )


@dataclass
class ExpertSource:
    """One MoE layer's routed experts, as the model family describes them to the store."""

    layer: int
    """The model's layer index (names the per-layer counters)."""
    num_experts: int
    read: Callable[[int], dict[str, torch.Tensor]]
    """expert -> its tensors in serving form on the CPU, read from the checkpoint (state_dict keys of new_slot())."""
    new_slot: Callable[[], nn.Module]
    """A new expert module on the meta device; the store gives it real tensors on the device."""
    predict: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
    """(hidden [T, H], input_ids [T]) -> expert ids [T, k]: this layer's router (for prefetch)."""
    moe: nn.Module
    """The layer's MoE block: its `tier` attribute is set to this layer's TieredLayer."""


class ExpertBudgetError(ValueError):
    """An expert-tier budget that this model cannot use."""


class AgingLFU:
    """Frequency scores that decay with every use of the layer; the lowest score is evicted first."""

    def __init__(self, num_experts: int):
        self.score = [0.0] * num_experts
        self.stamp = [0] * num_experts
        self.clock = 0

    def value(self, expert: int) -> float:
        return self.score[expert] * AGING ** (self.clock - self.stamp[expert])

    def touch(self, experts: list[int]) -> None:
        self.clock += 1
        for e in experts:
            self.score[e] = self.value(e) + 1.0
            self.stamp[e] = self.clock

    def victim(self, candidates: list[int]) -> int:
        return min(candidates, key=lambda e: (self.value(e), self.stamp[e]))


class Slot:
    """One fast-tier place: an expert module on the device, and (on a GPU) the events that order its reuse."""

    def __init__(self, module: nn.Module, device: torch.device):
        self.module = module
        self.tensors = dict(module.state_dict(keep_vars=True))
        self.expert = -1
        cuda = device.type == "cuda"
        self.ready = torch.cuda.Event() if cuda else None  # its copy finished (copy stream)
        self.free = torch.cuda.Event() if cuda else None  # its last use finished (compute stream)


class TieredLayer:
    """The fast and host tiers of one MoE layer, with its counters."""

    def __init__(self, store: ExpertStore, source: ExpertSource, fast_experts: int, host_experts: int | None):
        self.store, self.source = store, source
        self.next: TieredLayer | None = None
        self.fast_experts = fast_experts
        self.host_limit = host_experts
        self.slots: list[Slot] = []
        self.slot_of: dict[int, int] = {}
        self.policy = AgingLFU(source.num_experts)
        self.host: collections.OrderedDict[int, dict[str, torch.Tensor]] = collections.OrderedDict()
        self.prefetched: set[int] = set()
        self.hits = self.misses = self.prefetch_hits = self.prefetch_misses = 0

    # -- serving --------------------------------------------------------------------------

    def experts(self, needed: list[int], hint: torch.Tensor | None = None) -> Iterator[tuple[int, nn.Module]]:
        """(expert, module on the device) for each expert in `needed` (ascending), each resident when yielded.

        hint: the next layer's predicted expert ids [T, k] (predict_next), staged once this layer's
        own misses are queued. The caller must finish using a module before asking for the next.
        """
        resident = [e for e in needed if e in self.slot_of]
        self.hits += len(resident)
        self.misses += len(needed) - len(resident)
        used = self.prefetched.intersection(needed)
        self.prefetch_hits += len(used)
        self.prefetch_misses += len(self.prefetched) - len(used)
        self.prefetched.clear()
        self.policy.touch(needed)
        fits = len(needed) <= self.fast_experts
        if fits:  # queue every miss first, then the next layer's prefetch, then compute
            keep = set(needed)
            for e in needed:
                self._acquire(e, keep)
            self._prefetch_next(hint)
        compute = torch.cuda.current_stream(self.store.device) if self.store.copy_stream else None
        for i, e in enumerate(needed):
            slot = self.slots[self._acquire(e, set(needed[i:]))]
            if compute is not None:
                compute.wait_event(slot.ready)
            yield e, slot.module
            if compute is not None:
                slot.free.record(compute)
        if not fits:
            self._prefetch_next(hint)

    def predict_next(self, x: torch.Tensor, input_ids: torch.Tensor | None) -> torch.Tensor | None:
        """The next MoE layer's router on this layer's input: its likely experts [T, k] (None: no prefetch)."""
        if self.next is None or not self.store.settings.prefetch:
            return None
        return self.next.source.predict(x, input_ids)

    def _prefetch_next(self, hint: torch.Tensor | None) -> None:
        if hint is not None and self.next is not None:
            self.next.stage(hint)

    def stage(self, predicted: torch.Tensor) -> None:
        """Bring the most-chosen experts of `predicted` [T, k] into the fast tier, up to its budget."""
        counts = torch.bincount(predicted.flatten(), minlength=self.source.num_experts).tolist()
        ranked = sorted((e for e, c in enumerate(counts) if c), key=lambda e: (-counts[e], e))
        ranked = ranked[: self.fast_experts]
        keep = set(ranked)
        for e in ranked:
            if e not in self.slot_of:
                self._acquire(e, keep)
                self.prefetched.add(e)

    # -- tiers ----------------------------------------------------------------------------

    def _acquire(self, expert: int, keep: set[int]) -> int:
        """The slot holding `expert`, copying it in (evicting another) if it is not resident."""
        found = self.slot_of.get(expert)
        if found is not None:
            return found
        if len(self.slots) < self.fast_experts:
            index = len(self.slots)
            self.slots.append(Slot(self.store.new_module(self.source), self.store.device))
        else:
            resident = list(self.slot_of)
            candidates = [e for e in resident if e not in keep]
            # every resident expert is still needed this step: give up the one computed last
            victim = self.policy.victim(candidates) if candidates else max(resident)
            index = self.slot_of.pop(victim)
            self.prefetched.discard(victim)
        slot = self.slots[index]
        self.store.copy_into(slot, self._host_tensors(expert))
        slot.expert = expert
        self.slot_of[expert] = index
        return index

    def _host_tensors(self, expert: int) -> dict[str, torch.Tensor]:
        """The expert from host memory, or read from the checkpoint (and kept in host memory if it has room)."""
        store = self.store
        found = self.host.get(expert)
        if found is not None:
            self.host.move_to_end(expert)
            store.host_hits += 1
            return found
        store.host_misses += 1
        tensors = self.source.read(expert)
        store.disk_bytes_read += _nbytes(tensors)
        if self.host_limit is None or self.host_limit > 0:
            tensors = store.to_host(tensors)
            self.host[expert] = tensors
            if self.host_limit is not None and len(self.host) > self.host_limit:
                self.host.popitem(last=False)
        return tensors

    def fill(self) -> None:
        """At load: the host tier (all experts, or the first host_experts) and the first fast_experts slots."""
        count = self.source.num_experts if self.host_limit is None else min(self.host_limit, self.source.num_experts)
        for e in range(count):
            self._host_tensors(e)
        first = list(range(self.fast_experts))
        for e in first:
            self._acquire(e, set(first))


class ExpertStore:
    """Every tiered MoE layer of a model; the model calls begin_step at the start of each forward."""

    def __init__(self, sources: list[ExpertSource], settings: ExpertTierSettings, device: torch.device):
        if not sources:
            raise ExpertBudgetError("this model has no routed-expert layers: leave expert_cache_experts unset")
        self.settings, self.device = settings, torch.device(device)
        self.copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        num_experts = sources[0].num_experts
        sample = sources[0].read(0)
        self.expert_bytes = _nbytes(sample)
        self._slot_spec = {key: (t.shape, t.dtype) for key, t in sample.items()}
        fast = self._fast_experts(settings, num_experts, len(sources))
        host = settings.host_experts
        if host is not None and host > num_experts:
            raise ExpertBudgetError(
                f"expert_host_experts={host} is more than the model's {num_experts} routed experts per layer: "
                "use at most that, or None to keep every expert in host memory"
            )
        self.host_hits = self.host_misses = self.disk_bytes_read = self.bytes_transferred = 0
        self.layers = [TieredLayer(self, s, fast, host) for s in sources]
        for layer, after in zip(self.layers, self.layers[1:], strict=False):
            layer.next = after
        for layer in self.layers:
            layer.fill()
            layer.source.moe.tier = layer
        self.reset_counters()

    def _fast_experts(self, settings: ExpertTierSettings, num_experts: int, num_layers: int) -> int:
        if settings.fast_bytes is not None:
            fast = settings.fast_bytes // (self.expert_bytes * num_layers)
            if fast < 1:
                raise ExpertBudgetError(
                    f"expert_cache_bytes={settings.fast_bytes} holds no expert: one expert is "
                    f"{self.expert_bytes} bytes and each of the {num_layers} MoE layers needs at least one "
                    f"({self.expert_bytes * num_layers} bytes); give it more, or use expert_cache_experts"
                )
            return min(fast, num_experts)
        if settings.fast_experts > num_experts:
            raise ExpertBudgetError(
                f"expert_cache_experts={settings.fast_experts} is more than the model's {num_experts} routed "
                "experts per layer: use at most that, or leave it unset to keep every expert resident"
            )
        return settings.fast_experts

    @property
    def fast_experts(self) -> int:
        return self.layers[0].fast_experts

    def begin_step(self, x: torch.Tensor, input_ids: torch.Tensor | None) -> None:
        """At the start of a forward: prefetch the first MoE layer's likely experts from the embeddings."""
        if self.settings.prefetch:
            first = self.layers[0]
            first.stage(first.source.predict(x, input_ids))

    def new_module(self, source: ExpertSource) -> nn.Module:
        """An expert module on the device with uninitialised tensors shaped as source.read gives them (every layer alike)."""
        module = source.new_slot()
        for key, (shape, dtype) in self._slot_spec.items():
            owner_name, _, leaf = key.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            empty = torch.empty(shape, dtype=dtype, device=self.device)
            owner._parameters[leaf] = nn.Parameter(empty, requires_grad=False)
        unfilled = [n for n, p in module.named_parameters() if p.is_meta]
        assert not unfilled, f"the expert's reader gives no {unfilled}"
        return module.eval()

    def to_host(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Own copies in host memory (pinned for a GPU), not views of the mapped file."""
        if self.copy_stream is not None:
            return {k: t.pin_memory() for k, t in tensors.items()}
        return {k: t.clone() for k, t in tensors.items()}

    def copy_into(self, slot: Slot, tensors: dict[str, torch.Tensor]) -> None:
        if self.copy_stream is None:
            for key, target in slot.tensors.items():
                target.copy_(tensors[key])
        else:
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(slot.free)  # the slot's last use has finished
                for key, target in slot.tensors.items():
                    target.copy_(tensors[key], non_blocking=True)
                slot.ready.record(self.copy_stream)
        self.bytes_transferred += self.expert_bytes

    def reset_counters(self) -> None:
        self.host_hits = self.host_misses = self.disk_bytes_read = self.bytes_transferred = 0
        for layer in self.layers:
            layer.hits = layer.misses = layer.prefetch_hits = layer.prefetch_misses = 0

    def stats(self) -> dict:
        stats = {
            "expert_hits": sum(layer.hits for layer in self.layers),
            "expert_misses": sum(layer.misses for layer in self.layers),
            "expert_prefetch_hits": sum(layer.prefetch_hits for layer in self.layers),
            "expert_prefetch_misses": sum(layer.prefetch_misses for layer in self.layers),
            "expert_host_hits": self.host_hits,
            "expert_host_misses": self.host_misses,
            "expert_bytes_transferred": self.bytes_transferred,
            "expert_disk_bytes_read": self.disk_bytes_read,
            "expert_resident_bytes": sum(len(layer.slots) for layer in self.layers) * self.expert_bytes,
            "expert_host_bytes": sum(len(layer.host) for layer in self.layers) * self.expert_bytes,
            "expert_fast_experts_per_layer": self.fast_experts,
        }
        for layer in self.layers:
            stats[f"expert_l{layer.source.layer}_hits"] = layer.hits
            stats[f"expert_l{layer.source.layer}_misses"] = layer.misses
        return stats


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())
