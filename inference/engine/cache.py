"""What a model caches (its CacheSpec) and the memory that holds it (pages and slots).

A model declares cache groups of two kinds:
- paged groups grow with the sequence (one entry per token, or per `tokens_per_entry` tokens
  for a compressed cache). They share one pool of pages of one byte size, so a page freed by one
  group serves any other. Within a page a group lays out [layers, page_entries, *entry_shape]:
  every layer of the group keeps the same entries of the same tokens in the same page, so one
  block table per group and sequence serves all of the group's layers.
- per-sequence groups hold a fixed-size state whatever the length (a sliding-window ring, a
  compressor's partial window). Each running sequence holds one slot, which has room for one
  entry of every per-sequence group.
The engine's byte budget pays for `max_num_seqs` slots first and for pages with the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def _align(nbytes: int) -> int:
    return -(-nbytes // 64) * 64  # 64-byte multiples keep every dtype view aligned


@dataclass(frozen=True)
class CacheGroup:
    """Layers that cache the same kind of entry at the same rate."""

    name: str
    """Key of this group in ForwardContext.groups and ForwardContext.caches."""
    layers: tuple[int, ...]
    """Indices of the model's layers that keep entries in this group (caches[name][i] is layers[i]'s)."""
    entry_shape: tuple[int, ...]
    """One layer's cached tensor for one entry, e.g. (2, kv_heads, head_dim) for K and V of a token."""
    dtype: torch.dtype
    tokens_per_entry: int = 1
    """Compression ratio: one entry per this many tokens (1 for plain K/V)."""
    sliding_window: int | None = None
    """Only the entries of the last `sliding_window` tokens are ever read (None: all of them)."""
    per_sequence: bool = False
    """One entry per sequence whatever its length (kept in the sequence's slot, not in pages)."""
    segments: tuple[int, ...] = ()
    """Parts of the last entry dimension that are read apart (DeepSeek-V4's compressed K/V | indexer key):
    with kv_cache_dtype="fp8" each part gets its own scale (engine/kv_quant.py). Empty: one part."""

    def __post_init__(self) -> None:
        assert self.layers and all(d > 0 for d in self.entry_shape) and self.tokens_per_entry >= 1

    @property
    def entry_bytes(self) -> int:
        """Bytes of one entry across all of the group's layers."""
        return len(self.layers) * math.prod(self.entry_shape) * self.dtype.itemsize


@dataclass(frozen=True)
class CacheSpec:
    """Everything a model caches, as groups (at least one paged)."""

    groups: tuple[CacheGroup, ...]

    def __post_init__(self) -> None:
        names = [g.name for g in self.groups]
        assert len(set(names)) == len(names), f"cache group names must be unique: {names}"
        assert self.paged_groups, "a model caches at least one group that grows with the sequence"

    @property
    def paged_groups(self) -> tuple[CacheGroup, ...]:
        return tuple(g for g in self.groups if not g.per_sequence)

    @property
    def slot_groups(self) -> tuple[CacheGroup, ...]:
        return tuple(g for g in self.groups if g.per_sequence)

    def page_bytes(self, block_size: int) -> int:
        """Bytes of one page: `block_size` entries of the widest paged group."""
        return _align(max(g.entry_bytes for g in self.paged_groups) * block_size)

    @property
    def slot_bytes(self) -> int:
        """Bytes of one sequence's slot (0 when no group is per-sequence)."""
        return sum(_align(g.entry_bytes) for g in self.slot_groups)

    def page_entries(self, group: CacheGroup, block_size: int) -> int:
        """Entries of paged `group` that one page holds."""
        return self.page_bytes(block_size) // group.entry_bytes

    def pages_needed(self, group: CacheGroup, num_tokens: int, block_size: int) -> int:
        """Pages paged `group` needs for a sequence holding `num_tokens` tokens."""
        entries = -(-max(num_tokens, 0) // group.tokens_per_entry)
        return -(-entries // self.page_entries(group, block_size))


def page_views(spec: CacheSpec, pool: torch.Tensor, block_size: int) -> dict[str, list[torch.Tensor]]:
    """Per paged group, per layer of the group: [pages, page_entries, *entry_shape] views of `pool`
    [pages, page_bytes] uint8 (the device's pool, or a slower KV tier's, laid out the same)."""
    views = {}
    for group in spec.paged_groups:
        entries = spec.page_entries(group, block_size)
        view = pool[:, : entries * group.entry_bytes].view(group.dtype)
        view = view.view(pool.shape[0], len(group.layers), entries, *group.entry_shape)
        views[group.name] = [view[:, i] for i in range(len(group.layers))]
    return views


class PagedCache:
    """The cache memory: `num_pages` pages, `num_slots` slots, and for each group a view per layer.

    caches[name][i] is layer group.layers[i]'s tensor: [num_pages, page_entries, *entry_shape] for
    a paged group (strided: one layer's pages are `page_bytes` apart), [num_slots, *entry_shape]
    for a per-sequence group. Page 0 is the null page: never handed out, all zeros, it pads block
    tables so gathers need no bounds checks. Pages and slots are zeroed when handed out.
    """

    def __init__(
        self, spec: CacheSpec, num_pages: int, num_slots: int, block_size: int, device: torch.device
    ):
        self.spec = spec
        self.num_pages, self.num_slots = num_pages, num_slots
        self.page_bytes = spec.page_bytes(block_size)
        self.pool = torch.empty(num_pages, self.page_bytes, dtype=torch.uint8, device=device)
        self.pool[0].zero_()
        self.slots = torch.empty(num_slots, spec.slot_bytes, dtype=torch.uint8, device=device)
        self.caches: dict[str, list[torch.Tensor]] = page_views(spec, self.pool, block_size)
        offset = 0
        for group in spec.slot_groups:
            view = self.slots[:, offset : offset + group.entry_bytes].view(group.dtype)
            view = view.view(num_slots, len(group.layers), *group.entry_shape)
            self.caches[group.name] = [view[:, i] for i in range(len(group.layers))]
            offset += _align(group.entry_bytes)

    def zero(self, pages: list[int], slots: list[int]) -> None:
        """Clear pages and slots handed out anew, so no NaN from uninitialised memory meets a masked read."""
        if pages:
            self.pool[torch.tensor(pages, device=self.pool.device)] = 0
        if slots:
            self.slots[torch.tensor(slots, device=self.slots.device)] = 0
