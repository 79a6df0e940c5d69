"""The addressing one batched DeepSeek-V4 step needs, derived once per step from the ForwardContext.

The engine flattens a step into [T] tokens without padding: each sequence a prefill chunk or one
decode token, starting where its cache stands, single-token sequences first. For every ring (the
window, the compressor tails, kept in each sequence's slot) V4Batch says which ring entries to
read (positions before the step) and write (the step's last R-1 positions); for every paged group
(deepseek_v4_cache.py), which entries close in this step, where their source tokens are (ring or
fresh) and which page they go to, plus the block tables for reading. Layers only index with these
tensors: no host work per layer.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from functools import cached_property

import torch

from ..engine.context import ForwardContext
from .deepseek_v4_cache import WINDOW, V4CacheLayout
from .deepseek_v4_layers import RopeTable


@dataclass
class RingMeta:
    """Reading and writing one ring (window or compressor tail) of size R for a step."""

    read_slot: torch.Tensor  # [B, R-1] ring index of positions start-R+1 .. start-1
    read_valid: torch.Tensor  # [B, R-1] position >= 0
    write_seq_slot: torch.Tensor  # [Nw] the cache slot of each written token's sequence
    write_ring: torch.Tensor  # [Nw] position % R
    write_token: torch.Tensor  # [Nw] index into the step's T tokens (the last R-1 of each sequence)


@dataclass
class EmitMeta:
    """The compressed entries one group emits in this step, and where their sources are.

    Most decode steps close no window (one in `rate`): then count is 0 and the tensors are None.
    """

    count: int  # E
    src_index: torch.Tensor | None = None  # [E, n_src] rows of cat(ring reads [B*(R-1)], fresh [T])
    src_valid: torch.Tensor | None = None  # [E, n_src] False for positions < 0 (the missing "Ca" half of entry 0)
    positions: torch.Tensor | None = None  # [E] entry index * rate: where its RoPE rotates it
    page: torch.Tensor | None = None  # [E] page it is written to
    offset: torch.Tensor | None = None  # [E] entry within that page


@dataclass
class GroupMeta:
    """Reading one paged group: block tables and entry counts once this step is written."""

    rate: int
    entries_per_page: int
    tables: torch.Tensor  # [B, max_pages] (padded with the null page 0)
    counts: list[int]  # [B] entries each sequence holds after this step
    emit: EmitMeta

    def locate(self, seq_rows: torch.Tensor | None, entries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """seq_rows [..] batch rows (None: every row, in order), entries [.., n] entry ids -> (page, offset) [.., n]."""
        tables = self.tables if seq_rows is None else self.tables[seq_rows]  # [.., max_pages]
        page = tables.gather(-1, (entries // self.entries_per_page).clamp(max=tables.shape[-1] - 1))
        return page, entries % self.entries_per_page


@dataclass
class V4Batch:
    """Everything a forward needs to know about one flattened step besides the token ids.

    Tokens of sequence i are input_ids[offsets[i]:offsets[i+1]], at positions starts[i]...
    Sequences feeding one token ("decodes") are attended to together; the others (prefill
    chunks) one sequence at a time.
    """

    caches: dict[str, list[torch.Tensor]]
    """The engine's cache tensors: per group, per layer of the group (ForwardContext.caches)."""
    starts: list[int]
    lens: list[int]
    offsets: list[int]
    prompt_lens: list[int]
    """Each sequence's original prompt length (it decides how indexer score ties are broken)."""
    positions: torch.Tensor  # [T]
    slots: torch.Tensor  # [B] each sequence's cache slot
    decodes: list[int]  # batch rows with one token
    prefills: list[int]  # batch rows with more
    decode_rows: torch.Tensor  # [Bd]
    decode_tokens: torch.Tensor  # [Bd] their token index
    prompt_len_tensor: torch.Tensor  # [B]
    rings: dict[str, RingMeta]
    groups: dict[str, GroupMeta]
    tiers: object | None = None
    """The engine's KV tiers when some pages are read from slower tiers (ForwardContext.kv_tiers)."""
    first_tie: torch.Tensor | None = None
    """[B] int64 or None: lowered to the first position whose indexer top-k broke a tie (prefix caching)."""
    rope: dict[str, RopeTable] = field(default_factory=dict)
    """'main' / 'compress' -> the RopeTable at the tokens' positions (set by the model)."""

    @property
    def num_tokens(self) -> int:
        return self.offsets[-1]

    @cached_property
    def end(self) -> int:
        """One past the highest position of the step."""
        return max(start + n for start, n in zip(self.starts, self.lens, strict=True))

    @property
    def all_decodes(self) -> bool:
        """Every sequence feeds one token: batch rows and tokens coincide (no gathers needed)."""
        return not self.prefills

    def decode_row_values(self, t: torch.Tensor) -> torch.Tensor:
        """t [B, ...] -> the decodes' rows [Bd, ...]."""
        return t if self.all_decodes else t[self.decode_rows]

    def decode_token_values(self, t: torch.Tensor) -> torch.Tensor:
        """t [T, ...] -> the decodes' tokens [Bd, ...]."""
        return t if self.all_decodes else t[self.decode_tokens]

    @cached_property
    def decode_window_valid(self) -> torch.Tensor:
        """[Bd, W]: which window keys each decode sees (positions >= 0; its own token always)."""
        read = self.decode_row_values(self.rings[WINDOW].read_valid)  # [Bd, W-1]
        return torch.cat([read, read.new_ones(read.shape[0], 1)], dim=1)

    @classmethod
    def build(cls, layout: V4CacheLayout, positions: torch.Tensor, ctx: ForwardContext) -> V4Batch:
        """The step the engine's runner describes in `ctx`, `positions` [T] on the model's device."""
        dev = positions.device
        lens, offsets = list(ctx.query_lens), list(ctx.query_starts)
        starts = [c - n for c, n in zip(ctx.context_lens, lens, strict=True)]
        assert lens and all(n >= 1 for n in lens), "every sequence feeds at least one token"
        decodes = [i for i, n in enumerate(lens) if n == 1]
        every_token = torch.arange(offsets[-1], device=dev) if len(decodes) == len(lens) else None
        tokens = None  # the step's tokens on the host, built once for the rings that need them

        def ring(size: int) -> RingMeta:
            nonlocal tokens
            if every_token is not None and size >= 2:  # decodes only (most steps): each writes its one token
                read_slot, read_valid, write_ring = _decode_ring(size, starts, dev)
                return RingMeta(read_slot=read_slot, read_valid=read_valid, write_seq_slot=ctx.slots,
                                write_ring=write_ring, write_token=every_token)
            tokens = tokens or _HostTokens.of(starts, lens, offsets)
            return tokens.ring(size, ctx.slots)

        rings = {WINDOW: ring(layout.window)} | {name: ring(layout.tail_size(name)) for name in layout.paged}
        groups = {}
        for name in layout.paged:
            tables = ctx.groups[name]
            groups[name] = _group_meta(
                starts, lens, offsets, layout.rate(name), tables.block_tables, tables.page_entries,
                layout.tail_size(name), overlap=name == "csa",
            )
        return cls(
            caches=ctx.caches,
            starts=starts,
            lens=lens,
            offsets=offsets,
            prompt_lens=list(ctx.prompt_lens),
            positions=positions,
            slots=ctx.slots,
            decodes=decodes,
            prefills=[i for i, n in enumerate(lens) if n > 1],
            decode_rows=torch.tensor(decodes, dtype=torch.long, device=dev),
            decode_tokens=torch.tensor([offsets[i] for i in decodes], dtype=torch.long, device=dev),
            prompt_len_tensor=torch.tensor(ctx.prompt_lens, device=dev),
            rings=rings,
            groups=groups,
            tiers=ctx.kv_tiers,
            first_tie=ctx.shared.get("first_tie"),
        )


def _decode_ring(size: int, starts: list[int], dev: torch.device) -> tuple[torch.Tensor, ...]:
    """(read_slot [B, R-1], read_valid [B, R-1], write_ring [B]) of a decode-only step's ring of `size`."""
    return _decode_ring_of(size, tuple((start % size, min(start, size - 1)) for start in starts), dev)


@functools.lru_cache(maxsize=1024)
def _decode_ring_of(size: int, key: tuple[tuple[int, int], ...], dev: torch.device) -> tuple[torch.Tensor, ...]:
    """_decode_ring from each start's (position % size, min(position, size - 1)), all it depends on.

    A batch of one decoding cycles through `size` keys, so its tables are built once each instead
    of a dozen small dispatches per ring and step. They are only read (indexing), never written.
    """
    mods, lows = torch.tensor(key).unbind(-1)  # [B] each
    back = torch.arange(size - 1) - (size - 1)  # offsets of the positions before the start
    return ((mods[:, None] + back) % size).to(dev), (lows[:, None] + back >= 0).to(dev), mods.to(dev)


@dataclass
class _HostTokens:
    """A step's sequences and tokens as host tensors: what a ring written by prefill chunks is derived from."""

    starts: torch.Tensor  # [B]
    lens: torch.Tensor  # [B]
    seq_of_token: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]

    @classmethod
    def of(cls, starts: list[int], lens: list[int], offsets: list[int]) -> _HostTokens:
        starts_t, lens_t = torch.tensor(starts), torch.tensor(lens)
        seq_of_token = torch.repeat_interleave(torch.arange(len(lens)), lens_t)
        positions = starts_t[seq_of_token] + torch.arange(offsets[-1]) - torch.tensor(offsets[:-1])[seq_of_token]
        return cls(starts_t, lens_t, seq_of_token, positions)

    def ring(self, size: int, slots: torch.Tensor) -> RingMeta:
        """A ring of size R: each sequence writes its last R-1 tokens of the step into it."""
        dev = slots.device
        read_pos = self.starts[:, None] + (torch.arange(size - 1) - (size - 1))  # [B, R-1]
        ends = (self.starts + self.lens)[self.seq_of_token]  # [T]
        written = torch.nonzero(self.positions >= ends - (size - 1)).flatten()  # [Nw]
        return RingMeta(
            read_slot=(read_pos % size).to(dev),
            read_valid=(read_pos >= 0).to(dev),
            write_seq_slot=slots[self.seq_of_token[written].to(dev)],
            write_ring=(self.positions[written] % size).to(dev),
            write_token=written.to(dev),
        )


def _group_meta(starts, lens, offsets, rate, tables, per_page, ring_size, overlap) -> GroupMeta:
    """Entries emitted by this step (their source rows, RoPE positions, pages) and block tables."""
    dev = tables.device
    counts = [(s + n) // rate for s, n in zip(starts, lens, strict=True)]
    if all(c == s // rate for c, s in zip(counts, starts, strict=True)):  # no window closes
        return GroupMeta(rate=rate, entries_per_page=per_page, tables=tables, counts=counts, emit=EmitMeta(0))
    starts_t, lens_t = torch.tensor(starts), torch.tensor(lens)
    batch, n_src = len(starts), 2 * rate if overlap else rate
    first, last = starts_t // rate, (starts_t + lens_t) // rate  # entries [first, last) close in this step
    per_seq = last - first  # [B]
    seq = torch.repeat_interleave(torch.arange(batch), per_seq)  # [E]
    begin = torch.cumsum(per_seq, 0) - per_seq  # [B] first emitted entry of each sequence in [E]
    e = first[seq] + torch.arange(len(seq)) - begin[seq]  # [E] entry index within its sequence
    src_pos = (e[:, None] - (1 if overlap else 0)) * rate + torch.arange(n_src)  # [E, n_src]
    s = starts_t[seq][:, None]
    from_ring = seq[:, None] * (ring_size - 1) + src_pos - (s - (ring_size - 1))
    fresh = batch * (ring_size - 1) + torch.tensor(offsets[:-1])[seq][:, None] + src_pos - s
    emit = EmitMeta(
        count=len(seq),
        src_index=torch.where(src_pos < s, from_ring, fresh).clamp(min=0).to(dev),
        src_valid=(src_pos >= 0).to(dev),
        positions=(e * rate).to(dev),
        page=tables[seq.to(dev), (e // per_page).to(dev)],
        offset=(e % per_page).to(dev),
    )
    return GroupMeta(rate=rate, entries_per_page=per_page, tables=tables, counts=counts, emit=emit)
