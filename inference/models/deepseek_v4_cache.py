"""What DeepSeek-V4 caches per sequence, declared as the engine's cache groups (engine/cache.py).

Every V4 layer has a sliding-window branch; CSA and HCA layers add a compressor that turns each
closed window of `m` tokens into one entry, and CSA adds an indexer with its own compressed keys.
So a sequence holds two kinds of state, and the engine's BlockManager and PagedCache keep both
(this module only says what they are; it allocates nothing):

- fixed-size state, in the sequence's slot (per-sequence groups), whatever its length:
    window   [layers, W, head_dim]             the last W keys (=values) of every layer, a ring
                                               indexed by position % W;
    csa_tail [csa_layers, 2m, 4*hd + 4*ihd]    projected kv|gate of the last 2m tokens for the CSA
                                               compressor (2*hd each) and its indexer's (2*ihd each):
                                               the not-yet-compressed tail plus the previous window,
                                               whose first half ("Ca") overlaps into the next entry;
    hca_tail [hca_layers, m', 2*hd]            kv|gate of the last m' tokens for the HCA compressor.
- growing state, in pages (paged groups, one block table per group and sequence):
    csa      [csa_layers, page_entries, hd + ihd]   compressed kv | indexer key, one per m tokens;
    hca      [hca_layers, page_entries', hd]        compressed kv, one per m' tokens.

With kv_cache_dtype="fp8" (engine/kv_quant.py) the paged groups, the state that grows with the
sequence and that the KV tiers move, are stored as float8_e4m3fn with one power-of-two scale per
entry and part: the compressed kv and the indexer key of a CSA entry (its `segments`) are scaled
apart, since they come from different projections and are read apart (the indexer reads every key,
attention only the selected entries), and an HCA entry has one scale. That is the per-token-head
granularity of a plain K/V cache (a V4 entry is one head: K = V, a single KV head). Slots stay in
the model's dtype: a fixed size per sequence, and the tails hold gate logits that FP8 would distort.

The engine's `block_size` is the number of entries of the widest paged group in one page; the
other group fits as many of its own entries as the same page bytes hold. Slots and pages are
zeroed when handed out, so masked reads of not-yet-written positions never meet NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.cache import CacheGroup, CacheSpec

CSA_KIND, HCA_KIND = "compressed_sparse_attention", "heavily_compressed_attention"
WINDOW = "window"
GROUPS = {CSA_KIND: "csa", HCA_KIND: "hca"}
"""Layer type -> name of its paged group (its tail group is the name + '_tail')."""


@dataclass(frozen=True)
class V4CacheLayout:
    """Which layers cache what, derived from a DeepseekV4Config."""

    num_layers: int
    window: int
    head_dim: int
    index_head_dim: int
    csa_layers: tuple[int, ...]
    hca_layers: tuple[int, ...]
    csa_rate: int
    hca_rate: int

    @classmethod
    def from_config(cls, config) -> V4CacheLayout:
        types = list(config.layer_types)
        unknown = sorted(set(types) - {"sliding_attention", CSA_KIND, HCA_KIND})
        if unknown:
            raise ValueError(f"unknown DeepSeek-V4 layer types {unknown} in config.json's layer_types")
        if not set(types) & {CSA_KIND, HCA_KIND}:
            raise ValueError(
                "this DeepSeek-V4 config has only sliding-window layers; Citadel's engine serves V4 models "
                "with at least one compressed (CSA or HCA) layer"
            )
        return cls(
            num_layers=config.num_hidden_layers,
            window=config.sliding_window,
            head_dim=config.head_dim,
            index_head_dim=config.index_head_dim,
            csa_layers=tuple(i for i, t in enumerate(types) if t == CSA_KIND),
            hca_layers=tuple(i for i, t in enumerate(types) if t == HCA_KIND),
            csa_rate=config.compress_rates[CSA_KIND],
            hca_rate=config.compress_rates[HCA_KIND],
        )

    def layers(self, group: str) -> tuple[int, ...]:
        """The layers of paged group 'csa' or 'hca' (and of its tail)."""
        return self.csa_layers if group == "csa" else self.hca_layers

    def rate(self, group: str) -> int:
        return self.csa_rate if group == "csa" else self.hca_rate

    def tail_size(self, group: str) -> int:
        """Tokens the group's compressor tail ring holds: two windows for CSA (they overlap), one for HCA."""
        return 2 * self.csa_rate if group == "csa" else self.hca_rate

    @property
    def paged(self) -> tuple[str, ...]:
        """The paged groups this model has, 'csa' and/or 'hca'."""
        return tuple(g for g, layers in (("csa", self.csa_layers), ("hca", self.hca_layers)) if layers)

    def cache_spec(self, dtype: torch.dtype) -> CacheSpec:
        hd, ihd = self.head_dim, self.index_head_dim
        every = tuple(range(self.num_layers))
        groups = [CacheGroup(WINDOW, every, (self.window, hd), dtype, per_sequence=True)]
        if self.csa_layers:
            csa, rate = self.csa_layers, self.csa_rate
            groups.append(CacheGroup("csa_tail", csa, (2 * rate, 4 * hd + 4 * ihd), dtype, per_sequence=True))
            groups.append(CacheGroup("csa", csa, (hd + ihd,), dtype, tokens_per_entry=rate, segments=(hd, ihd)))
        if self.hca_layers:
            hca, rate = self.hca_layers, self.hca_rate
            groups.append(CacheGroup("hca_tail", hca, (rate, 2 * hd), dtype, per_sequence=True))
            groups.append(CacheGroup("hca", hca, (hd,), dtype, tokens_per_entry=rate))
        return CacheSpec(tuple(groups))
