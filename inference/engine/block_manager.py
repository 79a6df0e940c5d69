"""Hands out cache pages and slots to sequences: one block table per paged group, one slot each.

Pages are counted, never moved: a sequence that grows gets more pages appended to its tables,
a sequence that finishes or is preempted gives all of its pages (and its slot) back. Page 0 is
the null page (see PagedCache) and is never handed out.

Free pages and slots are reused last-freed first, lowest first at the start: the cache's memory
is reserved up front but only touched as it is used, so reusing the pages already touched keeps
the process's resident memory at what the busiest moment needed, not the whole reservation.
"""

from __future__ import annotations

from .cache import CacheSpec
from .sequence import Sequence


class BlockManager:
    def __init__(self, spec: CacheSpec, num_pages: int, num_slots: int, block_size: int):
        assert num_pages >= 2, "the cache needs the null page and at least one more"
        self.spec = spec
        self.block_size = block_size
        self.num_pages = num_pages
        self._needs_slot = bool(spec.slot_groups)
        self._free: list[int] = list(range(num_pages - 1, 0, -1))  # a stack: pop() takes the top
        self._free_slots: list[int] = list(range(num_slots - 1, -1, -1))
        self._new_pages: list[int] = []
        self._new_slots: list[int] = []

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

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

    def _missing(self, seq: Sequence, num_tokens: int) -> list[int]:
        tables = seq.block_tables or [[] for _ in self.spec.paged_groups]
        return [
            max(self.spec.pages_needed(g, num_tokens, self.block_size) - len(table), 0)
            for g, table in zip(self.spec.paged_groups, tables, strict=True)
        ]

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether `seq` can hold `num_tokens` tokens in total with the pages (and slots) free now."""
        if self._needs_slot and seq.slot is None and not self._free_slots:
            return False
        return sum(self._missing(seq, num_tokens)) <= len(self._free)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Give `seq` the pages it lacks to hold `num_tokens` tokens (check can_grow first)."""
        missing = self._missing(seq, num_tokens)
        assert sum(missing) <= len(self._free), "grow() without can_grow()"
        if self._needs_slot and seq.slot is None:
            seq.slot = self._free_slots.pop()
            self._new_slots.append(seq.slot)
        if not seq.block_tables:
            seq.block_tables = [[] for _ in self.spec.paged_groups]
        for table, count in zip(seq.block_tables, missing, strict=True):
            for _ in range(count):
                page = self._free.pop()
                table.append(page)
                self._new_pages.append(page)

    def free(self, seq: Sequence) -> None:
        """Take back every page and the slot of `seq`."""
        for table in seq.block_tables:
            self._free.extend(reversed(table))
        seq.block_tables = []
        if seq.slot is not None:
            self._free_slots.append(seq.slot)
            seq.slot = None

    def take_new(self) -> tuple[list[int], list[int]]:
        """Pages and slots handed out since the last call (the runner clears them before use)."""
        taken = self._new_pages, self._new_slots
        self._new_pages, self._new_slots = [], []
        return taken
