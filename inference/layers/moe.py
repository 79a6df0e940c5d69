"""Mixture-of-experts dispatch that groups tokens by expert (no Python loop over tokens).

The (token, expert) assignments of a step are sorted by expert, so each expert's tokens form
one contiguous slice: one matmul per expert that has tokens (experts with none are skipped), or
a single grouped matmul on GPUs that have one. Results are weighted and summed back per token in
expert order, as transformers does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .linear import linear


def topk_softmax_router(router_logits: torch.Tensor, top_k: int, renormalize: bool):
    """router_logits [T, E] -> (weights [T, k] in the logits' dtype, expert ids [T, k]).

    Softmax in float32 over all experts, keep the top k, optionally renormalise them to sum to 1
    (Qwen3-MoE's norm_topk_prob; Mixtral always does).
    """
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(router_logits.dtype), ids


def moe_dispatch(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    act: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """sum_k weights[t, k] * expert_{ids[t, k]}(x[t]) for every token.

    x [T, H]; w_gate_up [E, 2I, H] (gate rows, then up rows); w_down [E, H, I];
    weights and ids [T, k]. Each expert computes down(act(gate(x)) * up(x)).
    """
    num_experts, top_k = w_gate_up.shape[0], ids.shape[1]
    if x.shape[0] == 1 and not _grouped_mm_available(x, w_gate_up):
        return _moe_one_token(x, w_gate_up, w_down, weights, ids, act)
    flat_ids = ids.flatten()  # [T * k]
    order = flat_ids.argsort(stable=True)  # assignments grouped by expert, tokens ascending within
    token_of = order // top_k  # [T * k]
    xs = x[token_of]  # [T * k, H]
    counts = torch.bincount(flat_ids, minlength=num_experts)  # [E]
    if _grouped_mm_available(xs, w_gate_up):
        offsets = torch.cumsum(counts, dim=0).to(torch.int32)
        gate, up = torch._grouped_mm(xs, w_gate_up.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
        out = torch._grouped_mm(act(gate) * up, w_down.transpose(1, 2), offs=offsets)
    else:
        out = torch.empty_like(xs)
        start = 0
        for expert, count in enumerate(counts.tolist()):
            if count:
                rows = slice(start, start + count)
                gate, up = F.linear(xs[rows], w_gate_up[expert]).chunk(2, dim=-1)
                out[rows] = F.linear(act(gate) * up, w_down[expert])
                start += count
    out = out * weights.flatten()[order][:, None]
    return torch.zeros_like(x).index_add_(0, token_of, out)


def _moe_one_token(x, w_gate_up, w_down, weights, ids, act) -> torch.Tensor:
    """moe_dispatch for a single token (a batch-of-one decode step), without the grouping machinery.

    The same operations in the same order as the general path, so the same bits: each chosen expert
    on the [1, H] row in ascending expert order, scaled by its weight, summed from the first.
    """
    chosen = ids[0].tolist()
    scales = weights[0].unbind()
    out = None
    for j in sorted(range(len(chosen)), key=chosen.__getitem__):
        expert = chosen[j]
        gate, up = linear(x, w_gate_up[expert]).chunk(2, dim=-1)
        y = linear(act(gate) * up, w_down[expert]) * scales[j]
        out = y if out is None else out.add_(y)
    return out


def _grouped_mm_available(xs: torch.Tensor, w: torch.Tensor) -> bool:
    """torch._grouped_mm: bfloat16 on Hopper-class GPUs or newer."""
    return (
        xs.is_cuda
        and xs.dtype == torch.bfloat16
        and w.dtype == torch.bfloat16
        and hasattr(torch, "_grouped_mm")
        and torch.cuda.get_device_capability(xs.device) >= (9, 0)
    )


def moe_dispatch_tiered(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, tier, input_ids=None) -> torch.Tensor:
    """moe_dispatch over experts kept in tiers (inference/engine/expert_store.py TieredLayer `tier`).

    The same assignments, order and per-expert operations as the loop of moe_dispatch (and of
    DeepSeek-V4's MoE), so the result is the same: each expert with tokens is made resident by
    the store and called as a module on its contiguous slice. Also starts the prefetch of the
    next MoE layer's likely experts (its router run on this layer's input x).
    """
    top_k = ids.shape[1]
    flat_ids = ids.flatten()  # [T * k]
    order = flat_ids.argsort(stable=True)
    token_of = order // top_k  # [T * k]
    xs = x[token_of]  # [T * k, H]
    hint = tier.predict_next(x, input_ids)  # queued before the sync below, read after it
    counts = torch.bincount(flat_ids, minlength=tier.source.num_experts).tolist()
    starts = [0]
    for count in counts:
        starts.append(starts[-1] + count)
    out = torch.empty_like(xs)
    for expert, module in tier.experts([e for e, c in enumerate(counts) if c], hint):
        rows = slice(starts[expert], starts[expert + 1])
        out[rows] = module(xs[rows])
    out = out * weights.flatten()[order][:, None]
    return torch.zeros_like(x).index_add_(0, token_of, out)
