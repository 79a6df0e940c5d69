"""The addressing one batched DeepSeek-V4 step needs, computed once per step on the host.

A step feeds several sequences at once, flattened into [T] tokens without padding: each
sequence a prefill chunk or one decode token, starting where its cache stands. For every ring
(the window, the compressor tails) V4Batch says which slots to read (positions before the
step) and write (the step's last R-1 positions); for every page group, which entries close in
this step, where their source tokens are (ring or fresh) and which page they go to, plus the
page tables for reading. Layers only index with these tensors: no host work per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .deepseek_v4_cache import CacheFullError, V4CachePool, V4SequenceCache


@dataclass
class RingMeta:
    """Reading and writing one ring (window or compressor tail) of size R for a step."""

    read_slot: torch.Tensor  # [B, R-1] ring index of positions start-R+1 .. start-1
    read_valid: torch.Tensor  # [B, R-1] position >= 0
    write_seq_slot: torch.Tensor  # [Nw] the pool slot of each written token's sequence
    write_ring: torch.Tensor  # [Nw] position % R
    write_token: torch.Tensor  # [Nw] index into the step's T tokens (the last R-1 of each sequence)


@dataclass
class EmitMeta:
    """The compressed entries one group emits in this step, and where their sources are."""

    count: int  # E
    src_index: torch.Tensor  # [E, n_src] rows of cat(ring reads [B*(R-1)], fresh [T])
    src_valid: torch.Tensor  # [E, n_src] False for positions < 0 (the missing "Ca" half of entry 0)
    positions: torch.Tensor  # [E] entry index * rate: where its RoPE rotates it
    page: torch.Tensor  # [E] page it is written to
    offset: torch.Tensor  # [E] entry within that page


@dataclass
class GroupMeta:
    """Reading one page group: page tables and entry counts once this step is written."""

    rate: int
    entries_per_page: int
    tables: torch.Tensor  # [B, max_pages] (padded with the null page 0)
    counts: list[int]  # [B] entries each sequence holds after this step
    emit: EmitMeta

    def locate(self, seq_rows: torch.Tensor, entries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """seq_rows [..] batch rows, entries [.., n] entry ids -> (page, offset) [.., n]."""
        tables = self.tables[seq_rows]  # [.., max_pages]
        page = tables.gather(-1, (entries // self.entries_per_page).clamp(max=tables.shape[-1] - 1))
        return page, entries % self.entries_per_page


@dataclass
class V4Batch:
    """Everything a forward needs to know about one flattened step besides the token ids.

    Tokens of sequence i are input_ids[offsets[i]:offsets[i+1]], at positions starts[i]...
    Sequences feeding one token ("decodes") are attended to together; the others (prefill
    chunks) one sequence at a time.
    """

    pool: V4CachePool
    caches: list[V4SequenceCache]
    starts: list[int]
    lens: list[int]
    offsets: list[int]
    positions: torch.Tensor  # [T]
    slots: torch.Tensor  # [B]
    decodes: list[int]  # batch rows with one token
    prefills: list[int]  # batch rows with more
    decode_rows: torch.Tensor  # [Bd]
    decode_tokens: torch.Tensor  # [Bd] their token index
    prompt_lens: torch.Tensor  # [B]
    rings: dict[str, RingMeta]
    groups: dict[str, GroupMeta]
    rope: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """'main' / 'compress' -> cos, sin [T, rope_dim // 2] at the tokens' positions (set by the model)."""

    @property
    def num_tokens(self) -> int:
        return self.offsets[-1]

    @classmethod
    def build(cls, pool: V4CachePool, steps: list[tuple[V4SequenceCache, int]]) -> V4Batch:
        """`steps`: (cache, number of new tokens) per sequence, in the order of the flattened tokens."""
        assert steps and all(n >= 1 for _, n in steps), "every sequence must feed at least one token"
        assert len({id(c) for c, _ in steps}) == len(steps), "a sequence may appear once per step"
        layout, dev = pool.layout, pool.device
        needed = sum(pool.pages_needed(cache, cache.num_tokens + n) for cache, n in steps)
        if needed > pool.num_free_pages:  # checked first, so a refused step takes no page
            raise CacheFullError(f"this step needs {needed} more pages but {pool.num_free_pages} are free")
        for cache, n in steps:
            pool.grow(cache, cache.num_tokens + n)
        caches = [c for c, _ in steps]
        starts = [c.num_tokens for c in caches]
        lens = [n for _, n in steps]
        offsets = [0]
        for n in lens:
            offsets.append(offsets[-1] + n)
        starts_t, lens_t = torch.tensor(starts), torch.tensor(lens)
        offsets_t = torch.tensor(offsets[:-1])
        seq_of_token = torch.repeat_interleave(torch.arange(len(steps)), lens_t)  # [T]
        positions = starts_t[seq_of_token] + torch.arange(offsets[-1]) - offsets_t[seq_of_token]  # [T]
        decodes = [i for i, n in enumerate(lens) if n == 1]

        def ring(size: int) -> RingMeta:
            back = torch.arange(size - 1) - (size - 1)
            read_pos = starts_t[:, None] + back  # [B, R-1]
            ends = (starts_t + lens_t)[seq_of_token]  # [T]
            written = torch.nonzero(positions >= ends - (size - 1)).flatten()  # [Nw]
            return RingMeta(
                read_slot=(read_pos % size).to(dev),
                read_valid=(read_pos >= 0).to(dev),
                write_seq_slot=torch.tensor([c.slot for c in caches])[seq_of_token[written]].to(dev),
                write_ring=(positions[written] % size).to(dev),
                write_token=written.to(dev),
            )

        rings = {"window": ring(layout.window)}
        groups = {}
        for name, size, overlap in (("csa", 2 * layout.csa_rate, True), ("hca", layout.hca_rate, False)):
            if name not in pool.page_views:
                continue
            rate, per_page = pool.tokens_per_entry[name], pool.entries_per_page[name]
            rings[name] = ring(size)
            groups[name] = _group_meta(
                name, caches, starts, lens, offsets, rate, per_page, size, overlap, dev
            )
        return cls(
            pool=pool,
            caches=caches,
            starts=starts,
            lens=lens,
            offsets=offsets,
            positions=positions.to(dev),
            slots=torch.tensor([c.slot for c in caches], device=dev),
            decodes=decodes,
            prefills=[i for i, n in enumerate(lens) if n > 1],
            decode_rows=torch.tensor(decodes, dtype=torch.long, device=dev),
            decode_tokens=torch.tensor([offsets[i] for i in decodes], dtype=torch.long, device=dev),
            prompt_lens=torch.tensor([c.prompt_len for c in caches], device=dev),
            rings=rings,
            groups=groups,
        )

    def commit(self) -> None:
        """Every layer has written this step: advance each sequence's token count."""
        for cache, n in zip(self.caches, self.lens, strict=True):
            cache.num_tokens += n


def _group_meta(name, caches, starts, lens, offsets, rate, per_page, ring_size, overlap, dev) -> GroupMeta:
    """Entries emitted by this step (their source rows, RoPE positions, pages) and page tables."""
    batch, n_src = len(caches), 2 * rate if overlap else rate
    starts_t, lens_t = torch.tensor(starts), torch.tensor(lens)
    first, last = starts_t // rate, (starts_t + lens_t) // rate  # entries [first, last) close in this step
    per_seq = last - first  # [B]
    seq = torch.repeat_interleave(torch.arange(batch), per_seq)  # [E]
    begin = torch.cumsum(per_seq, 0) - per_seq  # [B] first emitted entry of each sequence in [E]
    e = first[seq] + torch.arange(len(seq)) - begin[seq]  # [E] entry index within its sequence
    src_pos = (e[:, None] - (1 if overlap else 0)) * rate + torch.arange(n_src)  # [E, n_src]
    s = starts_t[seq][:, None]
    from_ring = seq[:, None] * (ring_size - 1) + src_pos - (s - (ring_size - 1))
    fresh = batch * (ring_size - 1) + torch.tensor(offsets[:-1])[seq][:, None] + src_pos - s
    max_pages = max(1, max(len(c.pages[name]) for c in caches))
    tables = torch.tensor([c.pages[name] + [0] * (max_pages - len(c.pages[name])) for c in caches])
    emit = EmitMeta(
        count=len(seq),
        src_index=torch.where(src_pos < s, from_ring, fresh).clamp(min=0).to(dev),
        src_valid=(src_pos >= 0).to(dev),
        positions=(e * rate).to(dev),
        page=tables[seq, e // per_page].to(dev),
        offset=(e % per_page).to(dev),
    )
    return GroupMeta(
        rate=rate, entries_per_page=per_page, tables=tables.to(dev), counts=last.tolist(), emit=emit
    )
