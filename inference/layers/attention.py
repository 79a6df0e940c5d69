"""Attention over a paged KV cache, in plain torch (CPU and CUDA).

Each layer's cache is [num_pages, page_entries, 2, kv_heads, D] (K and V of one token side by
side). A step first writes its new K/V at the slots the runner assigned, then:
- decodes (one query token each) are served together: their pages are gathered into one padded
  [B, L] batch and a length mask hides the padding, so a decode step costs O(context), not
  O(context^2);
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
            q_pos = torch.arange(start, context_len, device=q.device)[:, None]  # [n, 1]
            k_pos = torch.arange(context_len, device=q.device)[None, :]  # [1, L]
            mask = k_pos <= q_pos
            if sliding_window is not None:
                mask &= k_pos > q_pos - sliding_window
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
    kv = cache[block_tables[:, :pages]]  # [B, pages, page_entries, 2, Hkv, D]
    return kv.flatten(1, 2)


def _decode(q, cache, block_tables, ctx: ForwardContext, scale: float, sliding_window: int | None):
    """q [B, Hq, D], one token per sequence at position context_len - 1 -> [B, Hq, D]."""
    lens = ctx.decode_context_lens  # [B]
    kv = _gather(cache, block_tables, max(ctx.context_lens[: q.shape[0]]))  # [B, L, 2, Hkv, D]
    k_pos = torch.arange(kv.shape[1], device=q.device)[None, :]  # [1, L]
    mask = k_pos < lens[:, None]
    if sliding_window is not None:
        mask &= k_pos >= lens[:, None] - sliding_window
    k_all, v_all = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # [B, Hkv, L, D]
    return _sdpa(q[:, :, None], k_all, v_all, mask[:, None, None, :], scale, causal=False)[:, :, 0]


def _sdpa(q, k, v, mask, scale: float, causal: bool) -> torch.Tensor:
    """q [B, Hq, n, D], k and v [B, Hkv, L, D] (Hq a multiple of Hkv) -> [B, Hq, n, D]."""
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )
