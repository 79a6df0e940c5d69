"""Hands out cache pages and slots to sequences: one block table per paged group, one slot each.

Pages are counted, never moved: a sequence that grows gets more pages appended to its tables,
a sequence that finishes or is preempted gives its pages (and its slot) back. Page 0 is the null
page (see PagedCache) and is never handed out.

With prefix caching (prefix_cache.py), a sequence's full blocks become cached blocks once their
tokens are computed: they stay in its tables, shared by every later sequence with the same
prefix (salt and adapter), and when the last of them lets go they stay cached, unused, until a
sequence needs their pages. So the pages a sequence may take are the free ones plus the unused
cached ones, evicted least recently used first.

Free pages and slots are reused last-freed first, lowest first at the start: the cache's memory
is reserved up front but only touched as it is used, so reusing the pages already touched keeps
the process's resident memory at what the busiest moment needed, not the whole reservation.
"""

from __future__ import annotations

from .cache import CacheSpec
from .prefix_cache import CachedBlock, PrefixCache, block_hash, tied_block_hash
from .sequence import Sequence


class BlockManager:
    tie_length_unit: int = 1
    """Prompts whose lengths agree in `length // tie_length_unit` break the model's ties alike (set by
    the runner from the model: DeepSeek-V4's CSA rate); names the blocks past a tie (prefix_cache.py)."""

    def __init__(
        self, spec: CacheSpec, num_pages: int, num_slots: int, block_size: int, prefix_caching: bool = False
    ):
        assert num_pages >= 2, "the cache needs the null page and at least one more"
        self.spec = spec
        self.block_size = block_size
        self.num_pages = num_pages
        self._needs_slot = bool(spec.slot_groups)
        self._free: list[int] = list(range(num_pages - 1, 0, -1))  # a stack: pop() takes the top
        self._free_slots: list[int] = list(range(num_slots - 1, -1, -1))
        self._new_pages: list[int] = []
        self._new_slots: list[int] = []
        self.prefix: PrefixCache | None = PrefixCache(spec, block_size) if prefix_caching else None
        self._saves: list[tuple[int, CachedBlock]] = []
        self._loads: list[tuple[list[int], int]] = []

    @property
    def num_free_pages(self) -> int:
        """Pages a sequence may take now: free ones and unused cached ones."""
        return len(self._free) + (self.prefix.reclaimable if self.prefix else 0)

    def pages_for(self, num_tokens: int) -> int:
        """Pages (all paged groups together) that one sequence of `num_tokens` tokens holds."""
        return sum(self.spec.pages_needed(g, num_tokens, self.block_size) for g in self.spec.paged_groups)

    def max_tokens_per_sequence(self) -> int:
        """The longest sequence the whole cache can hold on its own."""
        low, high = 0, 1
        while self.pages_for(high) <= self.num_pages - 1:
            low, high = high, high * 2
        while high - low > 1:  # pages_for is monotonic in the token count
            mid = (low + high) // 2
            low, high = (mid, high) if self.pages_for(mid) <= self.num_pages - 1 else (low, mid)
        return low

    # -- prefix caching ------------------------------------------------------------------------

    def cached_prefix(self, seq: Sequence) -> list[CachedBlock]:
        """Cached blocks a waiting `seq` can start from (its last token is always fed again).

        Requests that ask for prompt_logprobs bypass the lookup: every prompt position is computed.
        """
        if self.prefix is None or seq.block_tables or seq.params.prompt_logprobs is not None:
            return []
        n = self.prefix.block_tokens
        limit = (seq.num_tokens - 1) // n
        tied = tied_block_hash  # a tied block only within the prompt (past it no tie is broken by its length)
        return self.prefix.match(
            [
                (h, tied(h, self.tie_class(seq))) if (k + 1) * n <= seq.num_prompt_tokens else (h,)
                for k, h in enumerate(self._hashes(seq, limit))
            ]
        )

    def tie_class(self, seq: Sequence) -> int:
        """What of `seq`'s prompt length its tie-breaks depend on (see tie_length_unit)."""
        return seq.num_prompt_tokens // self.tie_length_unit

    def block_hashes(self, seq: Sequence, count: int) -> list[bytes]:
        """The hashes of `seq`'s first `count` full blocks (what equal tokens from position 0 share)."""
        return self._hashes(seq, count)

    def chunk(self, seq: Sequence, start: int, count: int) -> int:
        """`count` tokens from `start`, cut to end at the last block boundary they reach when the
        model's per-sequence state must be snapshotted there (so a later hit can resume from it);
        a chunk that reaches no boundary is left whole."""
        if self.prefix is None or not self.prefix.needs_snapshot:
            return count
        boundary = (start + count) // self.prefix.block_tokens * self.prefix.block_tokens
        return boundary - start if boundary > start else count

    def cache_blocks(self, seq: Sequence) -> None:
        """After a step: make the full blocks `seq` has just computed cached blocks."""
        prefix = self.prefix
        if prefix is None:
            return
        full = seq.num_computed_tokens // prefix.block_tokens
        hashes = self._hashes(seq, full)
        for k in range(len(seq.cached_blocks), full):
            name, tied = hashes[k], (k + 1) * prefix.block_tokens > seq.first_tie
            if tied:  # its entries depend on this prompt's length (Sequence.first_tie)
                if (k + 1) * prefix.block_tokens > seq.num_prompt_tokens:
                    break  # generated tokens broke no tie by the prompt's length: another prompt would
                name = tied_block_hash(name, self.tie_class(seq))
            if name in prefix.blocks:  # computed alongside another sequence: ours stays private
                seq.cached_blocks.append(None)
                continue
            pages = [
                table[k * n : (k + 1) * n]
                for table, n in zip(seq.block_tables, prefix.pages_per_block, strict=True)
            ]
            block = CachedBlock(name, pages, ref=1, tied=tied)
            ends_here = seq.num_computed_tokens == (k + 1) * prefix.block_tokens
            if prefix.needs_snapshot and ends_here and seq.slot is not None:
                snapshot = self._take_pages(prefix.snapshot_pages)
                if snapshot is not None:
                    block.snapshot = snapshot
                    self._saves.append((seq.slot, block))
            prefix.add(block)
            seq.cached_blocks.append(block)

    def _hashes(self, seq: Sequence, count: int) -> list[bytes]:
        """The hashes of `seq`'s first `count` full blocks (computed once, kept on the sequence)."""
        n = self.prefix.block_tokens
        hashes = seq.block_hashes
        salt, adapter = seq.cache_salt, (f"{seq.lora.name}:{seq.lora.key}" if seq.lora else None)
        while len(hashes) < count:
            k = len(hashes)
            hashes.append(
                block_hash(hashes[-1] if hashes else None, salt, adapter, seq.tokens(k * n, (k + 1) * n))
            )
        return hashes

    def _take_pages(self, count: int) -> list[int] | None:
        """`count` pages for a snapshot, from the free ones or by evicting unused blocks (None: too few)."""
        if len(self._free) + self.prefix.unused_pages < count:
            return None
        return [self._pop_page() for _ in range(count)]

    def _pop_page(self) -> int:
        while not self._free:
            self._free.extend(reversed(self.prefix.reclaim()))
        return self._free.pop()

    # -- growing and freeing -------------------------------------------------------------------

    def _missing(self, seq: Sequence, num_tokens: int, have: list[int] | None = None) -> list[int]:
        tables = seq.block_tables or [[] for _ in self.spec.paged_groups]
        have = have or [len(t) for t in tables]
        return [
            max(self.spec.pages_needed(g, num_tokens, self.block_size) - held, 0)
            for g, held in zip(self.spec.paged_groups, have, strict=True)
        ]

    def _hit_pages(self, hit: list[CachedBlock]) -> list[int] | None:
        if not hit:
            return None
        return [len(hit) * n for n in self.prefix.pages_per_block]

    def can_grow(self, seq: Sequence, num_tokens: int, hit: list[CachedBlock] | None = None) -> bool:
        """Whether `seq` can hold `num_tokens` tokens in total with the pages (and slots) free now,
        starting from the cached blocks `hit` (a waiting sequence's cached_prefix)."""
        if self._needs_slot and seq.slot is None and not self._free_slots:
            return False
        available = len(self._free) + (
            self.prefix.reclaimable_after(hit) if hit else self.num_free_pages - len(self._free)
        )
        return sum(self._missing(seq, num_tokens, self._hit_pages(hit))) <= available

    def grow(self, seq: Sequence, num_tokens: int, hit: list[CachedBlock] | None = None) -> None:
        """Give `seq` the pages it lacks to hold `num_tokens` tokens (check can_grow first); a waiting
        sequence starts from the cached blocks `hit`, which count as computed."""
        if self._needs_slot and seq.slot is None:
            seq.slot = self._free_slots.pop()
            self._new_slots.append(seq.slot)
        if not seq.block_tables:
            seq.block_tables = [[] for _ in self.spec.paged_groups]
        if hit:
            assert not seq.cached_blocks and seq.num_computed_tokens == 0
            for block in hit:
                self.prefix.acquire(block)
                for table, pages in zip(seq.block_tables, block.pages, strict=True):
                    table.extend(pages)
            seq.cached_blocks = list(hit)
            seq.num_computed_tokens = len(hit) * self.prefix.block_tokens
            tied = next((k for k, block in enumerate(hit) if block.tied), None)
            if tied is not None:  # the tie is within that block: what follows depends on the prompt's length
                seq.first_tie = min(seq.first_tie, tied * self.prefix.block_tokens)
            if self.prefix.needs_snapshot:
                self._loads.append((list(hit[-1].snapshot), seq.slot))
                self.prefix.loading.add(hit[-1].hash)
        if self.prefix is not None and not seq.counted_prefix and seq.params.prompt_logprobs is None:
            seq.counted_prefix = True  # a preempted sequence is counted again when it comes back
            self.prefix.hit_tokens += seq.num_computed_tokens
            self.prefix.miss_tokens += seq.num_tokens - seq.num_computed_tokens
        missing = self._missing(seq, num_tokens)
        assert sum(missing) <= self.num_free_pages, "grow() without can_grow()"
        for table, count in zip(seq.block_tables, missing, strict=True):
            for _ in range(count):
                page = self._pop_page() if self.prefix else self._free.pop()
                table.append(page)
                self._new_pages.append(page)

    def free(self, seq: Sequence) -> None:
        """Take back every page and the slot of `seq` (its cached blocks stay cached)."""
        held = seq.cached_blocks if self.prefix is not None else []
        for g, table in enumerate(seq.block_tables):
            if held:  # pages of the blocks it caches are the cache's; the rest go back, last first
                n = self.prefix.pages_per_block[g]
                table = [page for i, page in enumerate(table) if i // n >= len(held) or held[i // n] is None]
            self._free.extend(reversed(table))
        for block in reversed(held):  # the deepest block first: eviction takes it before its parents
            if block is not None:
                self.prefix.release(block)
        seq.block_tables = []
        if self.prefix is not None:
            seq.cached_blocks = []
            seq.counted_prefix = False
        if seq.slot is not None:
            self._free_slots.append(seq.slot)
            seq.slot = None

    def take_new(self) -> tuple[list[int], list[int]]:
        """Pages and slots handed out since the last call (the runner clears them before use)."""
        taken = self._new_pages, self._new_slots
        self._new_pages, self._new_slots = [], []
        return taken

    def take_snapshots(self) -> tuple[list[tuple[int, CachedBlock]], list[tuple[list[int], int]]]:
        """Slot copies due since the last call: (slot, block) to save (before the new slots are
        cleared) and (snapshot pages, slot) to load (after)."""
        taken = self._saves, self._loads
        self._saves, self._loads = [], []
        if self.prefix is not None:
            self.prefix.loading.clear()
        return taken
