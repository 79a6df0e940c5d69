"""Automatic prefix caching: requests that share a prompt prefix reuse the cache pages that hold it.

Like vLLM's automatic prefix caching (and nano-vllm's block manager), the cache is addressed by
content: the tokens of a sequence are cut into blocks of `block_tokens` tokens, and block k is
named by a hash chained from block k-1's,

    hash_k = sha256(hash_{k-1}, cache_salt, LoRA adapter, token ids of block k)

so equal hashes mean equal tokens from position 0 on, under the same tenant's salt and the same
adapter (whose weights change every cached entry). Only full blocks are cached, and at least the
last token of a prompt is always fed again (its logits are sampled).

A block spans whole pages of every paged cache group at once, so `block_tokens` is the least
common multiple of the groups' tokens per page (a DeepSeek-V4 compressed group holds
page_entries * tokens_per_entry tokens per page). Models that also keep per-sequence state (V4's
sliding-window ring and compressor tails, in the sequence's slot) cannot resume at a block
boundary from pages alone: when a sequence's computed tokens reach a block's end exactly (the
scheduler ends prefill chunks there), the whole slot is copied into pages of the block's own
(its snapshot), and a hit that ends at that block copies them back into the new sequence's slot.

DeepSeek-V4 breaks exact ties of its indexer's top-k as transformers does, by the prompt's length
(Sequence.first_tie): what a prompt computes from its first tie on depends on its length too. Blocks
from there on (within the prompt) are cached under tied_block_hash, which adds the prompt's length
class (length // the CSA rate: transformers' indexer rows are that long), so they are reused exactly by
prompts of the same class and never by others.

Everything here is bookkeeping over page ids (the BlockManager holds the pages; the copies run
on the cache memory in the model runner's step), so a cached page may live wherever the cache
keeps its pages. A block is reference-counted by the sequences that use it; one nobody uses stays
cached, evictable in least-recently-used order, until its pages are needed.
"""

from __future__ import annotations

import hashlib
import json
import math
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from .cache import CacheSpec, PagedCache


def block_hash(parent: bytes | None, salt: str | None, adapter: str | None, tokens: list[int]) -> bytes:
    """The name of a block of `tokens` following the block named `parent` (None: the first block)."""
    h = hashlib.sha256(parent or b"\0" * 32)
    h.update(json.dumps([salt, adapter]).encode())  # unambiguous whatever the strings hold
    h.update(array("q", tokens).tobytes())
    return h.digest()


def tied_block_hash(block: bytes, tie_class: int) -> bytes:
    """The name of a block computed after an indexer tie (Sequence.first_tie): its hash and what of the
    prompt's length broke the tie (BlockManager.tie_class), so only a prompt that breaks it alike reuses it."""
    return hashlib.sha256(block + b"tie_class" + tie_class.to_bytes(8, "little")).digest()


def tokens_per_page(spec: CacheSpec, block_size: int) -> list[int]:
    """Tokens one page of each paged group covers, in CacheSpec.paged_groups order."""
    return [spec.page_entries(g, block_size) * g.tokens_per_entry for g in spec.paged_groups]


@dataclass(eq=False)
class CachedBlock:
    """One cached block: its pages in every paged group and (models with slots) the slot's snapshot."""

    hash: bytes
    pages: list[list[int]]
    """Per paged group, the block's pages (in block-table order)."""
    snapshot: list[int] = field(default_factory=list)
    """Pages holding the sequence's slot as it was at the block's end ([]: none taken)."""
    ref: int = 0
    """Sequences whose block tables hold this block."""
    tied: bool = False
    """Whether it was computed after an indexer tie (named by tied_block_hash: its prompt's length)."""

    @property
    def num_pages(self) -> int:
        return sum(len(p) for p in self.pages) + len(self.snapshot)


class PrefixCache:
    """The index of cached blocks: hash -> block, and the unused ones in least-recently-used order.

    Pages it can give back when a sequence needs them (`reclaimable`): all pages of unused blocks
    (evicted whole, least recently used first), then the snapshots of blocks in use (a snapshot is
    only read when a hit starts, so dropping one only shortens later hits) - so caching never
    makes a running sequence wait or be preempted.
    """

    def __init__(self, spec: CacheSpec, block_size: int):
        per_page = tokens_per_page(spec, block_size)
        self.block_tokens = math.lcm(*per_page)
        self.pages_per_block = [self.block_tokens // n for n in per_page]
        self.snapshot_pages = -(-spec.slot_bytes // spec.page_bytes(block_size)) if spec.slot_groups else 0
        self.blocks: dict[bytes, CachedBlock] = {}
        self.unused: OrderedDict[bytes, CachedBlock] = OrderedDict()
        """Blocks no sequence holds (ref 0), least recently used first: the ones eviction takes."""
        self.unused_pages = 0
        self.held_snapshots: OrderedDict[bytes, CachedBlock] = OrderedDict()
        """Blocks in use that have a snapshot (droppable when pages run out), oldest first."""
        self.held_snapshot_pages = 0
        self.loading: set[bytes] = set()
        """Blocks whose snapshot a hit of this step still has to load (not droppable until then)."""
        self.hit_tokens = 0
        self.miss_tokens = 0
        self.evictions = 0
        self.dropped_snapshots = 0

    @property
    def needs_snapshot(self) -> bool:
        return self.snapshot_pages > 0

    @property
    def cached_pages(self) -> int:
        return sum(b.num_pages for b in self.blocks.values())

    @property
    def reclaimable(self) -> int:
        """Pages the cache can give back now."""
        loading = sum(len(self.blocks[h].snapshot) for h in self.loading if h in self.held_snapshots)
        return self.unused_pages + self.held_snapshot_pages - loading

    def reclaimable_after(self, hit: list[CachedBlock]) -> int:
        """`reclaimable` once a sequence has taken up the blocks `hit` (and will load the last one's snapshot)."""
        pages = self.reclaimable
        for block in hit:
            if block.ref == 0:  # leaves the unused blocks; its snapshot becomes a held one
                pages -= block.num_pages - len(block.snapshot)
        if hit and hit[-1].hash not in self.loading:
            pages -= len(hit[-1].snapshot)
        return pages

    def match(self, names: list[tuple[bytes, ...]]) -> list[CachedBlock]:
        """The longest run of cached blocks from the first block on (ending where a hit can resume);
        `names` gives each block's names, tried in order (its hash, then its tied_block_hash)."""
        found: list[CachedBlock] = []
        for candidates in names:
            block = next((self.blocks[h] for h in candidates if h in self.blocks), None)
            if block is None:
                break
            found.append(block)
        if self.needs_snapshot:  # a hit resumes only where the slot's state was saved
            while found and not found[-1].snapshot:
                found.pop()
        return found

    def acquire(self, block: CachedBlock) -> None:
        if block.ref == 0:
            del self.unused[block.hash]
            self.unused_pages -= block.num_pages
            self._hold_snapshot(block)
        block.ref += 1

    def release(self, block: CachedBlock) -> None:
        assert block.ref > 0
        block.ref -= 1
        if block.ref == 0:
            if self.held_snapshots.pop(block.hash, None) is not None:
                self.held_snapshot_pages -= len(block.snapshot)
            self.unused[block.hash] = block
            self.unused_pages += block.num_pages

    def add(self, block: CachedBlock) -> None:
        assert block.hash not in self.blocks and block.ref > 0
        self.blocks[block.hash] = block
        self._hold_snapshot(block)

    def _hold_snapshot(self, block: CachedBlock) -> None:
        if block.snapshot:
            self.held_snapshots[block.hash] = block
            self.held_snapshot_pages += len(block.snapshot)

    def reclaim(self) -> list[int]:
        """Pages given back: the least recently used unused block's, else a held block's snapshot."""
        if self.unused:
            _, block = self.unused.popitem(last=False)
            del self.blocks[block.hash]
            self.unused_pages -= block.num_pages
            self.evictions += 1
            pages = [p for table in block.pages for p in table]
        else:
            block = next(b for h, b in self.held_snapshots.items() if h not in self.loading)
            del self.held_snapshots[block.hash]
            self.held_snapshot_pages -= len(block.snapshot)
            self.dropped_snapshots += 1
            pages = []
        pages += block.snapshot
        block.snapshot = []  # a snapshot copy still due into these pages is dropped with them
        return pages

    def stats(self) -> dict:
        """prefix_hits / prefix_misses count prompt tokens (taken from the cache / computed) at admission."""
        return {
            "prefix_hits": self.hit_tokens,
            "prefix_misses": self.miss_tokens,
            "prefix_cached_pages": self.cached_pages,
            "prefix_cached_blocks": len(self.blocks),
            "prefix_evictions": self.evictions,
            "prefix_dropped_snapshots": self.dropped_snapshots,
            "prefix_block_tokens": self.block_tokens,
        }


def save_slots(cache: PagedCache, copies: list[tuple[int, CachedBlock]], place=None) -> None:
    """Copy each (slot, block)'s slot bytes into the block's snapshot pages (skipped once evicted);
    `place` maps page ids to pool pages (KVTiers.on_device: snapshots are logical pages under KV tiers)."""
    for slot, block in copies:
        if not block.snapshot:
            continue
        pages = torch.tensor(place(block.snapshot) if place else block.snapshot, device=cache.pool.device)
        data = cache.pool.new_zeros(len(block.snapshot) * cache.page_bytes)
        data[: cache.slots.shape[1]] = cache.slots[slot]
        cache.pool[pages] = data.view(len(block.snapshot), cache.page_bytes)


def load_slots(cache: PagedCache, copies: list[tuple[list[int], int]], place=None) -> None:
    """Copy each (snapshot pages, slot) back into the slot (`place`: as in save_slots)."""
    for snapshot, slot in copies:
        pages = torch.tensor(place(snapshot) if place else snapshot, device=cache.pool.device)
        cache.slots[slot] = cache.pool[pages].flatten()[: cache.slots.shape[1]]
