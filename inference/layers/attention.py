"""Attention over a paged KV cache, in plain torch (CPU and CUDA).

Each layer's cache is [num_pages, page_entries, 2, kv_heads, D] (K and V of one token side by
side). A step first writes its new K/V at the slots the runner assigned, then:
- decodes (one query token each) are served together, a decode step costing O(context), not
  O(context^2): a few at a time their pages are gathered into padded [b, L] batches of similar
  lengths behind a length mask; many at once (PAGE_SPACE_MIN_DECODES) are attended where their
  pages lie, without copying them (_decode_in_page_space);
- each prefill chunk attends to its sequence's cached context plus itself, causally. A first
  chunk uses its fresh K/V directly (nothing to gather).
Scaled-dot-product attention does the arithmetic (grouped-query heads without copies).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..engine.context import ForwardContext


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: torch.Tensor,
    ctx: ForwardContext,
    group: str,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """q [T, Hq, D], k and v [T, Hkv, D] of this step's tokens -> attention output [T, Hq, D]."""
    tables = ctx.groups[group]
    cache[tables.slot_pages, tables.slot_offsets] = torch.stack((k, v), dim=1).to(cache.dtype)
    out = torch.empty_like(q)
    nd = ctx.num_decodes
    if nd:
        out[:nd] = _decode(q[:nd], cache, tables.block_tables[:nd], ctx, scale, sliding_window)
    for i in range(nd, ctx.num_seqs):
        s, e = ctx.query_starts[i], ctx.query_starts[i + 1]
        context_len = ctx.context_lens[i]
        start = context_len - (e - s)
        if start == 0:
            k_i, v_i = k[s:e], v[s:e]  # [n, Hkv, D]
        else:
            kv = _gather(cache, tables.block_tables[i : i + 1], context_len)[
                0, :context_len
            ]  # [L, 2, Hkv, D]
            k_i, v_i = kv[:, 0], kv[:, 1]
        mask = None
        if start or sliding_window is not None:
            key = ("prefill_mask", i, sliding_window)
            mask = ctx.shared.get(key)
            if mask is None:
                q_pos = torch.arange(start, context_len, device=q.device)[:, None]  # [n, 1]
                k_pos = torch.arange(context_len, device=q.device)[None, :]  # [1, L]
                mask = k_pos <= q_pos
                if sliding_window is not None:
                    mask &= k_pos > q_pos - sliding_window
                ctx.shared[key] = mask
        out[s:e] = _sdpa(
            q[s:e].transpose(0, 1)[None],
            k_i.transpose(0, 1)[None],
            v_i.transpose(0, 1)[None],
            mask,
            scale,
            causal=mask is None,
        )[0].transpose(0, 1)
    return out


def _gather(cache: torch.Tensor, block_tables: torch.Tensor, max_len: int) -> torch.Tensor:
    """[B, pages] page ids -> [B, pages * page_entries, 2, Hkv, D] entries (enough for max_len tokens)."""
    page_entries = cache.shape[1]
    pages = -(-max_len // page_entries)
    ids = block_tables[:, :pages].flatten()
    # index_select copies whole pages about three times faster than advanced indexing on a CPU.
    kv = cache.index_select(0, ids)  # [B * pages, page_entries, 2, Hkv, D]
    return kv.view(block_tables.shape[0], pages * page_entries, *cache.shape[2:])


DECODE_GROUP = 8
"""Decodes are attended in groups of this many sequences of similar length (see _decode_groups)."""


PAGE_SPACE_MIN_DECODES = 16
"""From this many float32 decodes on, attend in page space (no copy of the context; see below)."""


def _decode(q, cache, block_tables, ctx: ForwardContext, scale: float, sliding_window: int | None):
    """q [B, Hq, D], one token per sequence at position context_len - 1 -> [B, Hq, D]."""
    if q.shape[0] >= PAGE_SPACE_MIN_DECODES and q.dtype == torch.float32 and cache.dtype == torch.float32:
        return _decode_in_page_space(q, cache, block_tables, ctx, scale, sliding_window)
    groups = ctx.shared.get(("decode_groups", sliding_window))
    if groups is None:
        groups = ctx.shared[("decode_groups", sliding_window)] = _decode_groups(ctx, q.device, sliding_window)
    if len(groups) == 1:
        _, max_len, mask = groups[0]
        return _decode_group(q, cache, block_tables, max_len, mask, scale)
    out = torch.empty_like(q)
    for rows, max_len, mask in groups:
        out.index_copy_(0, rows, _decode_group(q[rows], cache, block_tables[rows], max_len, mask, scale))
    return out


def _decode_groups(ctx: ForwardContext, device, sliding_window: int | None):
    """[(rows, max_len, mask [b, 1, 1, L])]: the decodes sorted by context length, DECODE_GROUP at a time.

    Each group gathers its pages up to its own longest context, so a short sequence beside a
    long one no longer copies (and attends over) the long one's length in padding.
    """
    count = ctx.num_decodes
    lens = ctx.context_lens[:count]
    if count <= DECODE_GROUP:
        parts = [list(range(count))]
    else:
        order = sorted(range(count), key=lens.__getitem__)
        parts = [order[i : i + DECODE_GROUP] for i in range(0, count, DECODE_GROUP)]
    groups = []
    for part in parts:
        rows = torch.tensor(part, device=device)
        max_len = max(lens[i] for i in part)
        group_lens = ctx.decode_context_lens[rows]  # [b]
        k_pos = torch.arange(max_len, device=device)[None, :]  # [1, L]
        mask = k_pos < group_lens[:, None]
        if sliding_window is not None:
            mask &= k_pos >= group_lens[:, None] - sliding_window
        groups.append((rows, max_len, mask[:, None, None, :]))
    return groups


def _decode_in_page_space(q, cache, block_tables, ctx: ForwardContext, scale: float, sliding_window):
    """Decode attention computed page by page where the pages lie, without gathering them.

    Gathering a large batch's pages into one padded tensor copies every sequence's whole
    context per layer and step, which is most of a big decode step on a CPU. Instead the
    cache's pages from the lowest to the highest one the decodes hold are taken as one strided
    view; each page is scored against the query of the sequence that owns it (one batched
    matmul per KV head, batch = page), and a softmax per sequence across its pages (maximum and
    sum gathered by owner) combines them: exactly softmax(q K^T) V, summed in another order.
    Pages of other sequences or free pages in that range are masked out; last-freed-first page
    reuse (block_manager.py) keeps the range compact.
    """
    meta = ctx.shared.get(("page_space", sliding_window))
    if meta is None:
        meta = ctx.shared[("page_space", sliding_window)] = _page_space(
            block_tables, ctx, cache.shape[1], sliding_window
        )
    first, owner, mask = meta  # owner [P] in 0..B (B: not a decode's page), mask [P, E]
    num_seqs, num_heads, head_dim = q.shape
    kv_heads = cache.shape[3]
    group = num_heads // kv_heads
    pages = cache[first : first + owner.shape[0]]  # [P, E, 2, Hkv, D], a view
    queries = torch.cat([q, q.new_zeros(1, num_heads, head_dim)])[owner].view(-1, kv_heads, group, head_dim)
    scores = torch.stack(
        [torch.bmm(queries[:, h], pages[:, :, 0, h].transpose(1, 2)) for h in range(kv_heads)], dim=1
    )  # [P, Hkv, G, E]
    scores = (scores * scale).masked_fill_(~mask[:, None, None, :], float("-inf"))
    index = owner[:, None, None].expand(-1, kv_heads, group)
    seq_max = scores.new_full((num_seqs + 1, kv_heads, group), float("-inf"))
    seq_max.scatter_reduce_(0, index, scores.amax(dim=-1), reduce="amax")
    seq_max = seq_max.nan_to_num_(neginf=0.0)  # rows with no key at all (the padding row)
    weights = torch.exp(scores - seq_max[owner][..., None])  # [P, Hkv, G, E]
    seq_sum = scores.new_zeros(num_seqs + 1, kv_heads, group).index_add_(0, owner, weights.sum(dim=-1))
    values = torch.stack([torch.bmm(weights[:, h], pages[:, :, 1, h]) for h in range(kv_heads)], dim=1)
    out = scores.new_zeros(num_seqs + 1, kv_heads, group, head_dim).index_add_(0, owner, values)
    return (out[:num_seqs] / seq_sum[:num_seqs, ..., None]).view(num_seqs, num_heads, head_dim)


def _page_space(block_tables, ctx: ForwardContext, page_entries: int, sliding_window: int | None):
    """(first page, owner [P], valid entries [P, E]) of the decodes' pages, for every layer of a step."""
    count, device = ctx.num_decodes, block_tables.device
    lens = ctx.decode_context_lens  # [B]
    held = [-(-n // page_entries) for n in ctx.context_lens[:count]]  # pages each decode uses
    columns = torch.arange(block_tables.shape[1], device=device)
    used = columns[None, :] < torch.tensor(held, device=device)[:, None]  # [B, max_pages]
    page_ids = block_tables[:count][used]  # [N]
    rows = torch.arange(count, device=device)[:, None].expand_as(used)[used]
    base = (columns[None, :] * page_entries).expand_as(used)[used]  # first position held by each page
    first, last = int(page_ids.min()), int(page_ids.max())
    owner = torch.full((last - first + 1,), count, dtype=torch.long, device=device)
    owner[page_ids - first] = rows
    start = torch.zeros(last - first + 1, dtype=torch.long, device=device)
    start[page_ids - first] = base
    positions = start[:, None] + torch.arange(page_entries, device=device)  # [P, E]
    owner_len = torch.cat([lens, lens.new_zeros(1)])[owner][:, None]  # [P, 1]
    mask = (positions < owner_len) & (owner[:, None] < count)
    if sliding_window is not None:
        mask &= positions >= owner_len - sliding_window
    return first, owner, mask


def _decode_group(q, cache, block_tables, max_len: int, mask, scale: float):
    kv = _gather(cache, block_tables, max_len)  # [b, L', 2, Hkv, D] (L' >= max_len: whole pages)
    kv = kv[:, :max_len]
    k_all, v_all = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # [b, Hkv, L, D]
    return _sdpa(q[:, :, None], k_all, v_all, mask, scale, causal=False)[:, :, 0]


def _sdpa(q, k, v, mask, scale: float, causal: bool) -> torch.Tensor:
    """q [B, Hq, n, D], k and v [B, Hkv, L, D] (Hq a multiple of Hkv) -> [B, Hq, n, D]."""
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )
