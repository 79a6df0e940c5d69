"""What a model's forward needs to know about one flattened step besides the tokens themselves.

The runner concatenates the tokens of every scheduled sequence into one [T] batch (no padding).
Sequences with a single query token (decodes) come first, so attention can serve them all with
one batched gather; the prefill chunks after them are served one sequence at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class GroupTables:
    """One cache group's addressing for this step."""

    block_tables: torch.Tensor
    """[B, max_pages] int64: the pages of each sequence, padded with the null page 0."""
    page_entries: int
    """Entries per page for this group."""
    slot_pages: torch.Tensor | None = None
    """[T] int64: the page each new token's entry goes to (one-entry-per-token groups only)."""
    slot_offsets: torch.Tensor | None = None
    """[T] int64: the entry within that page."""

    def slot(self, seq_index: int, entry_index: int) -> tuple[int, int]:
        """(page, offset) of entry `entry_index` of sequence `seq_index`: for groups that write sparsely."""
        page = int(self.block_tables[seq_index, entry_index // self.page_entries])
        return page, entry_index % self.page_entries


@dataclass
class ForwardContext:
    """Per-step metadata (host lists are for Python loops, tensors live on the model's device)."""

    query_lens: list[int]
    """[B] tokens each sequence feeds this step."""
    context_lens: list[int]
    """[B] tokens each sequence has in the cache once this step has written its own."""
    query_starts: list[int]
    """[B + 1] offsets of each sequence's tokens in the flattened batch."""
    num_decodes: int
    """The first num_decodes sequences feed exactly one token."""
    decode_context_lens: torch.Tensor
    """[num_decodes] int64, context_lens of the decodes, on the device (for masks)."""
    prompt_lens: list[int]
    """[B] each sequence's prompt length (a model may need it, e.g. to break ties as its reference does)."""
    groups: dict[str, GroupTables]
    """Per paged cache group."""
    slots: torch.Tensor | None
    """[B] int64, each sequence's slot for per-sequence cache groups (None if the model has none)."""
    caches: dict[str, list[torch.Tensor]]
    """Per group, per layer of the group: [num_pages, page_entries, *entry_shape] for paged groups,
    [num_slots, *entry_shape] for per-sequence ones."""

    kv_tiers: object | None = None
    """The KV tiers (engine/tiers.py) when the model reads pages left in slower tiers itself (block
    tables then name such a page -1 - its logical id); None: every page in the tables is on the device."""
    shared: dict = field(default_factory=dict)
    """Tensors derived from this step's metadata that every layer would otherwise rebuild (masks,
    page lists): the first layer computes them, the others reuse them (see layers/attention.py)."""

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)
