"""Attention over a paged KV cache, in plain torch (CPU and CUDA).

Each layer's cache is [num_pages, page_entries, 2, kv_heads, D] (K and V of one token side by
side). A step first writes its new K/V at the slots the runner assigned, then:
- decodes (one query token each) cost O(context), not O(context^2): on a CPU each sequence
  gathers its pages and attends alone (_decode_each); on a GPU they are served together, sorted
  by length, DECODE_GROUP at a time, their pages gathered into padded [b, L] batches of similar
  lengths behind a length mask;
- each prefill chunk attends to its sequence's cached context plus itself, causally. A first
  chunk uses its fresh K/V directly (nothing to gather).
Scaled-dot-product attention does the arithmetic (grouped-query heads without copies).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..engine import kv_quant
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
    kv = torch.stack((k, v), dim=1)  # [T, 2, Hkv, D]
    cache[tables.slot_pages, tables.slot_offsets] = kv_quant.store(kv, cache.dtype)  # fp8 KV: quantized
    nd = ctx.num_decodes
    decode = _decode_each if q.device.type == "cpu" else _decode
    if nd == q.shape[0]:  # decodes only (nothing to copy the result into)
        return decode(q, cache, tables.block_tables, ctx, scale, sliding_window)
    out = torch.empty_like(q)
    if nd:
        out[:nd] = decode(q[:nd], cache, tables.block_tables[:nd], ctx, scale, sliding_window)
    for i in range(nd, ctx.num_seqs):
        s, e = ctx.query_starts[i], ctx.query_starts[i + 1]
        context_len = ctx.context_lens[i]
        start = context_len - (e - s)
        if start == 0 and not kv_quant.is_packed(cache):
            k_i, v_i = k[s:e], v[s:e]  # [n, Hkv, D] (fp8 KV reads its cache: the same bits chunked or not)
        else:
            kv = _gather(cache, tables.block_tables[i : i + 1], context_len)[
                0, :context_len
            ]  # [L, 2, Hkv, D]
            kv = kv_quant.load(kv, q.dtype)  # fp8 KV: dequantized
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


def _decode_each(q, cache, block_tables, ctx: ForwardContext, scale: float, sliding_window: int | None):
    """_decode on a CPU: each sequence gathers its own pages and attends alone, without padding or mask.

    Its gathered entries (~2 KiB per token) are still in the core's cache when SDPA reads them,
    where a group's would not be: at 60 decodes of ~600 tokens a step ran ~40% faster this way
    than in groups of 8 (and a sequence gets the same bits alone as in any batch).
    """
    page_entries = cache.shape[1]
    key = ("decode_pages", block_tables.data_ptr(), page_entries)
    pages = ctx.shared.get(key)
    if pages is None:  # each sequence's page ids, shared by every layer of the step
        pages = ctx.shared[key] = [
            block_tables[i, : -(-length // page_entries)]
            for i, length in enumerate(ctx.context_lens[: q.shape[0]])
        ]
    if kv_quant.is_packed(cache):
        outs = []
        for i, ids in enumerate(pages):
            length = ctx.context_lens[i]
            kv = cache.index_select(0, ids).view(1, -1, *cache.shape[2:])  # [1, pages * page_entries, 2, Hkv, D]
            kv = kv[:, max(0, length - sliding_window) if sliding_window is not None else 0 : length]
            kv = kv_quant.load(kv, q.dtype)  # fp8 KV: dequantized
            k_all, v_all = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # [1, Hkv, L, D]
            outs.append(_sdpa(q[i : i + 1, :, None], k_all, v_all, None, scale, causal=False)[:, :, 0])
        return outs[0] if len(outs) == 1 else torch.cat(outs)
    # Four operations per sequence (this loop runs sequences x layers times a step, ~460 at 58 decodes):
    # K and V are strided views of the gathered pages, the same shape and strides the slices and
    # transposes above give. The query heads that share a K/V head are that head's queries (a query
    # "length" of Hq / Hkv): SDPA reads each K/V head once, not once per query head (3-5% of a decode
    # step at 48 decodes of ~800 tokens; the same values within float rounding, and the same bits for a
    # sequence alone as in any batch).
    _, _, kv_heads, head_dim = cache.shape[1:]
    token_stride = 2 * kv_heads * head_dim
    strides = (0, head_dim, token_stride, 1)  # [1, Hkv, L, D] over [pages * page_entries, 2, Hkv, D]
    queries = q.reshape(q.shape[0], 1, kv_heads, -1, head_dim).unbind(0)  # [1, Hkv, Hq / Hkv, D] each
    outs = []
    for i, ids in enumerate(pages):
        length = ctx.context_lens[i]
        first = max(0, length - sliding_window) if sliding_window is not None else 0
        kv = cache.index_select(0, ids)  # [pages, page_entries, 2, Hkv, D], contiguous
        size = (1, kv_heads, length - first, head_dim)
        k_all = kv.as_strided(size, strides, first * token_stride)
        v_all = kv.as_strided(size, strides, first * token_stride + kv_heads * head_dim)
        outs.append(_sdpa(queries[i], k_all, v_all, None, scale, causal=False))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)  # [B, Hkv, Hq / Hkv, D]
    return out.view(q.shape)


def _decode(q, cache, block_tables, ctx: ForwardContext, scale: float, sliding_window: int | None):
    """q [B, Hq, D], one token per sequence at position context_len - 1 -> [B, Hq, D]."""
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
    """[(rows, max_len, mask [b, 1, 1, L] or None)]: the decodes sorted by context length, DECODE_GROUP at a time.

    Each group gathers its pages up to its own longest context, so a short sequence beside a
    long one no longer copies (and attends over) the long one's length in padding. A group of one
    sequence needs no mask (it attends to all its entries; SDPA gives the same bits without an
    all-true mask) unless a sliding window hides some.
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
        mask = None
        if len(part) > 1 or sliding_window is not None:
            group_lens = ctx.decode_context_lens[rows]  # [b]
            k_pos = torch.arange(max_len, device=device)[None, :]  # [1, L]
            mask = k_pos < group_lens[:, None]
            if sliding_window is not None:
                mask &= k_pos >= group_lens[:, None] - sliding_window
            mask = mask[:, None, None, :]
        groups.append((rows, max_len, mask))
    return groups


def _decode_group(q, cache, block_tables, max_len: int, mask, scale: float):
    kv = _gather(cache, block_tables, max_len)  # [b, L', 2, Hkv, D] (L' >= max_len: whole pages)
    kv = kv_quant.load(kv[:, :max_len], q.dtype)  # fp8 KV: dequantized
    k_all, v_all = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # [b, Hkv, L, D]
    return _sdpa(q[:, :, None], k_all, v_all, mask, scale, causal=False)[:, :, 0]


def _sdpa(q, k, v, mask, scale: float, causal: bool) -> torch.Tensor:
    """q [B, Hq, n, D], k and v [B, Hkv, L, D] (Hq a multiple of Hkv) -> [B, Hq, n, D]."""
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )
