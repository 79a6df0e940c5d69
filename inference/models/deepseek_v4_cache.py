"""The memory DeepSeek-V4 keeps per sequence: fixed-size slots and pages from one byte budget.

Every V4 layer has a sliding-window branch; CSA and HCA layers add a compressor that turns each
closed window of `m` tokens into one entry, and CSA adds an indexer with its own compressed keys.
So a sequence holds two kinds of state:

- fixed-size state (a "slot"), the same size whatever the sequence's length:
    window   [layers, W, head_dim]             the last W keys (=values) of every layer, a ring
                                               indexed by position % W;
    csa_tail [csa_layers, 2m, 4*hd + 4*ihd]    projected kv|gate of the last 2m tokens for the CSA
                                               compressor (2*hd each) and its indexer's (2*ihd each):
                                               the not-yet-compressed tail plus the previous window,
                                               whose first half ("Ca") overlaps into the next entry;
    hca_tail [hca_layers, m', 2*hd]            kv|gate of the last m' tokens for the HCA compressor.
- growing state, in fixed-size pages (one page table per group and sequence):
    csa      [csa_layers, page_entries, hd + ihd]   compressed kv | indexer key, one per m tokens;
    hca      [hca_layers, page_entries', hd]        compressed kv, one per m' tokens.

`V4CachePool` carves both out of one byte budget: `max_seqs` slots, and the rest as pages of one
byte size shared by both groups (so a page freed by one group serves the other). A page holds,
for every layer of its group, the same `page_entries` consecutive entries of one sequence, so one
page table per group serves all of the group's layers. Page 0 is a null page (all zeros) that
pads page tables; slots and pages are zeroed when handed out, so masked reads never meet NaN.

The engine's interface (its block manager will later take over the page half):

    pool = V4CachePool(config, byte_budget=..., max_seqs=..., dtype=..., device=...)
    cache = pool.allocate(prompt_len)        # a slot, no pages yet; CacheFullError if none is free
    pool.can_grow(cache, num_tokens)         # would the free pages hold this many tokens?
    pool.pages_needed(cache, num_tokens)     # how many more pages that takes
    batch = V4Batch.build(pool, [(cache, n_new), ...])   # deepseek_v4_batch.py; grows the caches,
                                             # all or none (CacheFullError)
    hidden = model(input_ids, batch)         # writes every layer's state, advances cache.num_tokens
    cache.nbytes, pool.bytes_in_use, pool.num_free_pages, pool.num_free_slots
    pool.free(cache)                         # finished or preempted (recompute on readmission)

`prompt_len` is the request's original prompt length. It only decides how exact ties among the
indexer's scores are broken (see deepseek_v4_attention.select_top_k), so that results equal
transformers' generate() whatever the chunking, batching or recomputation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


class CacheFullError(RuntimeError):
    """No free slot or not enough free pages: the engine should preempt or wait."""


def _align(nbytes: int) -> int:
    return -(-nbytes // 64) * 64  # 64-byte multiples keep every dtype view aligned


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
        return cls(
            num_layers=config.num_hidden_layers,
            window=config.sliding_window,
            head_dim=config.head_dim,
            index_head_dim=config.index_head_dim,
            csa_layers=tuple(i for i, t in enumerate(types) if t == "compressed_sparse_attention"),
            hca_layers=tuple(i for i, t in enumerate(types) if t == "heavily_compressed_attention"),
            csa_rate=config.compress_rates["compressed_sparse_attention"],
            hca_rate=config.compress_rates["heavily_compressed_attention"],
        )

    def slot_shapes(self) -> dict[str, tuple[int, ...]]:
        """Fixed per-sequence state: name -> shape (leading dim: layers of that kind)."""
        hd, ihd = self.head_dim, self.index_head_dim
        shapes = {"window": (self.num_layers, self.window, hd)}
        if self.csa_layers:
            shapes["csa_tail"] = (len(self.csa_layers), 2 * self.csa_rate, 4 * hd + 4 * ihd)
        if self.hca_layers:
            shapes["hca_tail"] = (len(self.hca_layers), self.hca_rate, 2 * hd)
        return shapes

    def page_groups(self) -> dict[str, tuple[int, int, int]]:
        """Growing state: group -> (layers, entry width, tokens per entry)."""
        groups = {}
        if self.csa_layers:
            groups["csa"] = (len(self.csa_layers), self.head_dim + self.index_head_dim, self.csa_rate)
        if self.hca_layers:
            groups["hca"] = (len(self.hca_layers), self.head_dim, self.hca_rate)
        return groups


@dataclass(eq=False)
class V4SequenceCache:
    """One sequence's share of the pool: a slot, page tables, and how many tokens are written."""

    pool: V4CachePool
    slot: int
    prompt_len: int
    num_tokens: int = 0
    """Tokens whose state every layer has written (the position of the next token to feed)."""
    pages: dict[str, list[int]] = field(default_factory=dict)
    freed: bool = False

    @property
    def nbytes(self) -> int:
        """Bytes this sequence holds: its slot plus its pages."""
        return self.pool.slot_bytes + self.pool.page_bytes * sum(len(p) for p in self.pages.values())


class V4CachePool:
    """Slots and pages for DeepSeek-V4 sequences within a byte budget (see the module docstring).

    Args:
        config: the model's DeepseekV4Config.
        byte_budget: bytes for slots and pages together.
        max_seqs: sequences that can hold a slot at once (the engine's max_num_seqs).
        page_entries: entries per page of the widest page group (like a block size); the other
            group fits as many of its own entries as the same page bytes hold.
    """

    def __init__(
        self,
        config,
        *,
        byte_budget: int,
        max_seqs: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        page_entries: int = 64,
    ):
        if max_seqs < 1 or page_entries < 1:
            raise ValueError(
                f"max_seqs and page_entries must be at least 1, got {max_seqs} and {page_entries}"
            )
        self.layout = layout = V4CacheLayout.from_config(config)
        self.dtype, self.device = dtype, torch.device(device)
        itemsize = torch.empty((), dtype=dtype).element_size()
        shapes = layout.slot_shapes()
        self.slot_bytes = sum(_align(math.prod(s) * itemsize) for s in shapes.values())
        groups = layout.page_groups()
        widest = max((n * w * itemsize for n, w, _ in groups.values()), default=0)
        self.page_bytes = _align(widest * page_entries) if groups else 0
        pages_budget = byte_budget - max_seqs * self.slot_bytes
        num_pages = pages_budget // self.page_bytes if groups else 0
        if pages_budget < 0 or (groups and num_pages < 2):
            raise ValueError(
                f"a cache of {byte_budget} bytes cannot hold {max_seqs} sequence slots of "
                f"{self.slot_bytes} bytes "
                f"plus pages of {self.page_bytes} bytes: raise the budget or lower max_seqs / page_entries"
            )
        self.max_seqs, self.num_pages = max_seqs, int(num_pages)  # num_pages counts the null page 0

        self._slots = torch.zeros(max_seqs, self.slot_bytes, dtype=torch.uint8, device=self.device)
        self.slot_views: dict[str, torch.Tensor] = {}
        """name -> [max_seqs, *shape] views of the slots (see V4CacheLayout.slot_shapes)."""
        offset = 0
        for name, shape in shapes.items():
            nbytes = math.prod(shape) * itemsize
            self.slot_views[name] = (
                self._slots[:, offset : offset + nbytes].view(dtype).view(max_seqs, *shape)
            )
            offset += _align(nbytes)

        self._pages = torch.zeros(self.num_pages, self.page_bytes, dtype=torch.uint8, device=self.device)
        self.page_views: dict[str, torch.Tensor] = {}
        """group -> [num_pages, layers, entries_per_page, width] views of the pages."""
        self.entries_per_page: dict[str, int] = {}
        self.tokens_per_entry: dict[str, int] = {}
        for name, (n_layers, width, rate) in groups.items():
            entries = self.page_bytes // (n_layers * width * itemsize)
            used = n_layers * entries * width * itemsize
            view = self._pages[:, :used].view(dtype).view(self.num_pages, n_layers, entries, width)
            self.page_views[name], self.entries_per_page[name], self.tokens_per_entry[name] = (
                view,
                entries,
                rate,
            )

        self._free_slots = list(range(max_seqs - 1, -1, -1))
        self._free_pages = list(range(self.num_pages - 1, 0, -1))

    # -- accounting --------------------------------------------------------------------------

    @property
    def num_free_pages(self) -> int:
        return len(self._free_pages)

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    @property
    def bytes_in_use(self) -> int:
        slots = self.max_seqs - len(self._free_slots)
        pages = max(self.num_pages - 1, 0) - len(self._free_pages)
        return slots * self.slot_bytes + pages * self.page_bytes

    def pages_for(self, num_tokens: int) -> dict[str, int]:
        """Pages per group that a sequence of `num_tokens` tokens holds."""
        return {
            g: -(-(num_tokens // self.tokens_per_entry[g]) // e) for g, e in self.entries_per_page.items()
        }

    def pages_needed(self, cache: V4SequenceCache, num_tokens: int) -> int:
        """More pages `cache` needs to hold `num_tokens` tokens in total."""
        return sum(max(n - len(cache.pages[g]), 0) for g, n in self.pages_for(num_tokens).items())

    def can_grow(self, cache: V4SequenceCache, num_tokens: int) -> bool:
        return self.pages_needed(cache, num_tokens) <= len(self._free_pages)

    # -- allocation --------------------------------------------------------------------------

    def allocate(self, prompt_len: int) -> V4SequenceCache:
        """A new, empty sequence state (a zeroed slot, no pages)."""
        if not self._free_slots:
            raise CacheFullError(f"all {self.max_seqs} sequence slots are in use")
        slot = self._free_slots.pop()
        self._slots[slot].zero_()
        return V4SequenceCache(self, slot, prompt_len, pages={g: [] for g in self.page_views})

    def grow(self, cache: V4SequenceCache, num_tokens: int) -> None:
        """Give `cache` the (zeroed) pages it lacks to hold `num_tokens` tokens; all or nothing."""
        assert not cache.freed and cache.pool is self
        if not self.can_grow(cache, num_tokens):
            raise CacheFullError(
                f"{self.pages_needed(cache, num_tokens)} more pages are needed for {num_tokens} tokens "
                f"but {len(self._free_pages)} are free"
            )
        new = []
        for group, n in self.pages_for(num_tokens).items():
            while len(cache.pages[group]) < n:
                new.append(self._free_pages.pop())
                cache.pages[group].append(new[-1])
        if new:
            self._pages[torch.tensor(new, device=self.device)] = 0

    def free(self, cache: V4SequenceCache) -> None:
        """Give back the slot and every page of `cache`."""
        if cache.freed:
            return
        for table in cache.pages.values():
            self._free_pages.extend(reversed(table))
            table.clear()
        self._free_slots.append(cache.slot)
        cache.freed = True
