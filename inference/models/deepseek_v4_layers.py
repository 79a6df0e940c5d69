"""DeepSeek-V4's token-wise building blocks: norms, RoPE, MoE, hyper-connections.

Each computes what the matching transformers DeepseekV4 module computes (same operations in
the same dtypes, so float32 results agree to rounding) on [T, ...] tensors that mix the tokens
of several sequences. Parameter names are DeepSeek's own (ffn.experts.0.w1, ffn.gate.tid2eid,
...), which is how checkpoints store them, so weights load 1:1. Attention, the one block that
reads per-sequence state, is in deepseek_v4_attention.py.

Shapes: T tokens in the step, D hidden size, hc streams, E routed experts, k experts per token.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..engine.expert_store import ExpertSource
from ..engine.weights import CheckpointError
from ..layers.linear import Linear
from ..layers.moe import moe_dispatch_tiered
from ..quant.fp8 import FP8_DTYPE, Fp8Linear, quantize_blockwise


class RMSNorm(nn.Module):
    """Weighted RMSNorm computed in float32 (its weight is kept in float32, as transformers does)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # the fused kernel: the same arithmetic, fewer dispatches
            return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)
        h = x.float()
        return (self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps))).to(x.dtype)


def unweighted_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:
        return F.rms_norm(x, x.shape[-1:], None, eps)
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


class Rotary:
    """V4's interleaved partial RoPE: 'main' for sliding layers, 'compress' (YaRN) for CSA/HCA.

    cos and sin depend only on the position: they are computed once per position, kind and dtype
    into a table laid out for RopeTable (grown to the highest position asked for), and a step reads
    its rows from it. Computing them per step was some thirty small dispatches, ~4% of a batch-of-one
    decode step on a CPU. The values are the same elementwise arithmetic either way.
    """

    def __init__(self, config, device: torch.device):
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        self.inv_freq, self.scaling = {}, {}
        for kind in ("main", "compress"):
            params = config.rope_parameters[kind]
            if params.get("rope_type", "default") == "default":
                dim = int(config.head_dim * params.get("partial_rotary_factor", 1.0))
                base = params["rope_theta"]
                inv_freq, scaling = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
            else:
                inv_freq, scaling = ROPE_INIT_FUNCTIONS[params["rope_type"]](config, None, layer_type=kind)
            self.inv_freq[kind], self.scaling[kind] = inv_freq.to(device), scaling
        self._tables: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def cos_sin(
        self, positions: torch.Tensor, kind: str, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [N] -> cos, sin [N, rope_dim // 2] in `dtype` (transformers casts them too)."""
        freqs = positions[:, None].float() * self.inv_freq[kind]
        scaling = self.scaling[kind]
        return (freqs.cos() * scaling).to(dtype), (freqs.sin() * scaling).to(dtype)

    def table(self, positions: torch.Tensor, kind: str, dtype: torch.dtype, limit: int) -> RopeTable:
        """The RopeTable at positions [N], all below `limit`, read from the kind's per-position table."""
        key = (kind, dtype)
        rows = self._tables.get(key)
        if rows is None or rows.shape[0] < limit:
            size = max(limit, 2 * (0 if rows is None else rows.shape[0]), 1024)
            every = torch.arange(size, device=self.inv_freq[kind].device)
            rows = self._tables[key] = torch.stack(RopeTable.layout(*self.cos_sin(every, kind, dtype)), dim=1)
        picked = rows.index_select(0, positions)  # [N, 2, rope_dim]
        return RopeTable(picked[:, 0], picked[:, 1])


class RopeTable:
    """cos and sin at a step's positions, laid out for pair-wise rotation.

    V4 rotates interleaved pairs (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin) on the trailing
    rope channels of a vector. With cos repeated per pair and sin_alt = (-sin, +sin) per pair,
    that is x * cos + swap(x) * sin_alt: the same products and sums transformers computes. The
    tables are padded to the vector's width with cos 1 and sin 0 on the channels RoPE leaves
    alone, so a rotation is six whole-width operations (x * 1 + y * 0 is exactly x).
    """

    def __init__(self, cos: torch.Tensor, sin_alt: torch.Tensor):
        """cos, sin_alt [N, rope_dim] as `layout` makes them."""
        self.cos, self.sin_alt = cos, sin_alt
        self._tables: dict[tuple[int, bool, bool], tuple[torch.Tensor, torch.Tensor]] = {}

    @staticmethod
    def layout(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [N, rope_dim // 2] (Rotary.cos_sin) -> cos repeated per pair, sin_alt [N, rope_dim]."""
        sign = torch.tensor([-1.0, 1.0], dtype=sin.dtype, device=sin.device)
        return cos.repeat_interleave(2, dim=-1), (sin[..., None] * sign).flatten(-2)

    def tables(self, width: int, heads: bool = False, inverse: bool = False):
        """(cos, sin_alt) padded to `width` channels, [N, width] or [N, 1, width] with `heads`."""
        key = (width, heads, inverse)
        found = self._tables.get(key)
        if found is None:
            pad = width - self.cos.shape[-1]
            cos, sin_alt = F.pad(self.cos, (pad, 0), value=1.0), F.pad(self.sin_alt, (pad, 0), value=0.0)
            if inverse:  # rotating back: sin -> -sin
                sin_alt = -sin_alt
            if heads:
                cos, sin_alt = cos[:, None], sin_alt[:, None]
            found = self._tables[key] = (cos, sin_alt)
        return found

    def rotate(self, x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """x [N, d] or [N, heads, d] with its trailing rope channels rotated (inverse: rotated back)."""
        cos, sin_alt = self.tables(x.shape[-1], x.dim() == 3, inverse)
        return rotate(x, cos, sin_alt)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin_alt: torch.Tensor) -> torch.Tensor:
    """x [..., d] rotated in interleaved pairs by cos, sin_alt [..., d] (RopeTable.tables)."""
    swapped = x.unflatten(-1, (x.shape[-1] // 2, 2)).flip(-1).flatten(-2)  # (x1, x0) per pair
    if x.dtype == torch.float32:
        return torch.addcmul(x * cos, swapped, sin_alt)  # x * cos + swapped * sin_alt, one dispatch fewer
    # transformers rotates in float32 with cos/sin rounded to the model's dtype
    return (x.float() * cos + swapped.float() * sin_alt).to(x.dtype)


class Expert(nn.Module):
    """SwiGLU MLP with DeepSeek-V4's clamps (gate from above, up on both sides)."""

    def __init__(self, dim: int, inter: int, limit: float):
        super().__init__()
        self.limit = limit
        self.w1 = Linear(dim, inter, bias=False)
        self.w2 = Linear(inter, dim, bias=False)
        self.w3 = Linear(dim, inter, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.w1(x).clamp(max=self.limit)
        up = self.w3(x).clamp(min=-self.limit, max=self.limit)
        return self.w2(F.silu(gate) * up)


class Gate(nn.Module):
    """Router: top-k over score + bias, or a fixed token -> experts table (hash routing)."""

    def __init__(self, config, is_hash: bool):
        super().__init__()
        self.is_hash, self.top_k = is_hash, config.num_experts_per_tok
        self.route_scale = config.routed_scaling_factor
        if config.scoring_func not in ("sqrtsoftplus", "sigmoid", "softmax"):
            raise ValueError(
                f"scoring_func {config.scoring_func!r} is not supported (sqrtsoftplus, sigmoid, softmax)"
            )
        self.score_func = config.scoring_func
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        if is_hash:
            self.register_buffer("tid2eid", torch.empty(config.vocab_size, self.top_k, dtype=torch.long))
        else:
            self.bias = nn.Parameter(torch.empty(config.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> (weights [T, k], expert ids [T, k])."""
        logits = F.linear(x, self.weight)  # [T, E]
        if self.score_func == "sqrtsoftplus":
            scores = F.softplus(logits).sqrt()
        elif self.score_func == "sigmoid":
            scores = logits.sigmoid()
        else:
            scores = logits.softmax(dim=-1)
        if self.is_hash:
            ids = self.tid2eid[input_ids].long()
        else:
            ids = torch.topk(scores + self.bias, self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, ids)
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.route_scale, ids


class MoE(nn.Module):
    """Routed experts (tokens grouped by expert: one matmul per expert that has tokens) + a shared expert."""

    def __init__(self, config, layer_id: int):
        super().__init__()
        D, inter, limit = config.hidden_size, config.moe_intermediate_size, config.swiglu_limit
        self.n_experts = config.n_routed_experts
        self.gate = Gate(config, config.mlp_layer_types[layer_id] == "hash_moe")
        self.experts = nn.ModuleList(Expert(D, inter, limit) for _ in range(self.n_experts))
        self.shared_experts = Expert(D, inter, limit)
        self.tier = None  # the layer's TieredLayer when the routed experts are tiered (self.experts is then empty)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x, input_ids)  # [T, k]
        if self.tier is not None:  # experts in tiers (engine/expert_store.py): same order, same operations
            return moe_dispatch_tiered(x, weights, ids, self.tier, input_ids) + self.shared_experts(x)
        k = ids.shape[1]
        if len(x) == 1:  # a batch of one decoding: no grouping to do
            return _routed_one_token(self.experts, x, weights, ids) + self.shared_experts(x)
        flat = ids.flatten()  # [T*k]
        order = flat.argsort(stable=True)  # assignments grouped by expert
        counts = torch.bincount(flat, minlength=self.n_experts).tolist()
        token = order // k
        xs = x[token]  # [T*k, D]
        ys = torch.empty_like(xs)
        begin = 0
        for e, count in enumerate(counts):
            if count:
                ys[begin : begin + count] = self.experts[e](xs[begin : begin + count])
                begin += count
        ys = ys * weights.flatten()[order, None]
        routed = torch.zeros_like(x).index_add_(0, token, ys)
        return routed + self.shared_experts(x)


def _routed_one_token(experts: nn.ModuleList, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """MoE.forward's routed sum for one token [1, D], without its grouping (argsort, bincount, gathers,
    index_add_: a dozen dispatches per layer, ~5% of a batch-of-one decode step). The same arithmetic in
    the same order: each expert's output times its weight, summed in expert order from zero."""
    routed, scales = None, weights[0].tolist()  # float32 values: multiplying by them as scalars is exact
    for e, j in sorted(zip(ids[0].tolist(), range(ids.shape[1]), strict=True)):
        y = experts[e](x) * scales[j]
        routed = y if routed is None else routed + y
    return routed


def expert_sources(
    model: nn.Module, stored: dict[str, str], weights, dtype: torch.dtype, quantization: str | None
) -> list[ExpertSource]:
    """Hand every layer's routed experts to an expert store: detach them (unloaded) and say how to read each.

    `stored`: this model's tensor names -> the checkpoint's. Called on the meta-device model before
    the weights load (after native FP8 layers became Fp8Linear). FP8 experts stay FP8 in every tier:
    native ones as stored, others quantized when read if quantization is "fp8", exactly as
    quantize_linears quantizes the all-resident experts.
    """
    sources = []
    for index, block in enumerate(model.layers):
        moe = block.ffn
        template = moe.experts[0]
        native_fp8 = isinstance(template.w1, Fp8Linear)
        keys = [key for key, _ in template.named_parameters()]  # w1.weight (and w1.weight_scale_inv), ...
        names = {}
        for e in range(moe.n_experts):
            wanted = {key: f"layers.{index}.ffn.experts.{e}.{key}" for key in keys}
            missing = [name for name in wanted.values() if name not in stored]
            if missing:
                raise CheckpointError(f"the checkpoint lacks the routed expert tensor {missing[0]!r}")
            names[e] = {key: stored[name] for key, name in wanted.items()}
        weights.set_aside([name for tensors in names.values() for name in tensors.values()])
        moe.experts = nn.ModuleList()
        fp8 = native_fp8 or quantization == "fp8"
        dims = (template.w1.in_features, template.w1.out_features, template.limit)
        sources.append(
            ExpertSource(
                layer=index,
                num_experts=moe.n_experts,
                read=functools.partial(_read_expert, weights, names, dtype, quantization == "fp8"),
                new_slot=functools.partial(_expert_slot, *dims, fp8, dtype),
                predict=lambda x, input_ids, gate=moe.gate: gate(x, input_ids)[1],
                moe=moe,
            )
        )
    return sources


def _read_expert(weights, names: dict, dtype: torch.dtype, quantize: bool, expert: int) -> dict:
    """One expert's tensors in serving form (what fill_weights and quantize_linears make of them)."""
    out = {}
    for key, name in names[expert].items():
        tensor = weights.read(name)
        if tensor.dtype == FP8_DTYPE:  # native FP8: as stored
            out[key] = tensor
        elif key.endswith("weight_scale_inv"):
            out[key] = tensor.float()
        elif quantize:
            out[key], out[f"{key}_scale_inv"] = quantize_blockwise(tensor.to(dtype))
        else:
            out[key] = tensor.to(dtype)
    return out


def _expert_slot(dim: int, inter: int, limit: float, fp8: bool, dtype: torch.dtype) -> Expert:
    with torch.device("meta"):
        expert = Expert(dim, inter, limit)
        if fp8:
            for name in ("w1", "w2", "w3"):
                linear = getattr(expert, name)
                setattr(expert, name, Fp8Linear(linear.in_features, linear.out_features, dtype))
    return expert


class HyperConnection(nn.Module):
    """Mixing weights of manifold-constrained hyper-connections (Sinkhorn-projected), in float32.

    Holds no parameters itself: the block owns hc_{attn,ffn}_{fn,base,scale} under DeepSeek's names.
    """

    def __init__(self, config):
        super().__init__()
        self.hc, self.iters, self.eps, self.norm_eps = (
            config.hc_mult,
            config.hc_sinkhorn_iters,
            config.hc_eps,
            config.rms_norm_eps,
        )
        self._scales: dict[int, torch.Tensor] = {}

    def _expanded(self, scale: torch.Tensor) -> torch.Tensor:
        """scale [3] -> [(2 + hc) * hc]: the pre, post and comb parts' scales, element by element."""
        expanded = self._scales.get(scale.data_ptr())
        if expanded is None:
            hc = self.hc
            counts = torch.tensor([hc, hc, hc * hc], device=scale.device)
            expanded = self._scales[scale.data_ptr()] = scale.repeat_interleave(counts)
        return expanded

    def forward(self, h: torch.Tensor, fn, base, scale):
        """h [T, hc, D] -> post [T, hc], comb [T, hc, hc] (float32), collapsed [T, D]."""
        if on_numpy(h):
            return self._forward_numpy(h, fn, base, scale)
        hc, eps = self.hc, self.eps
        # fn, base and scale are float32 (keeps_float32). One affine over all three parts: each
        # element is scaled by its part's scale and offset by its base, as transformers does.
        flat = h.flatten(1)
        mix = F.linear(unweighted_rms_norm(flat if flat.dtype == torch.float32 else flat.float(), self.norm_eps), fn)  # [T, (2+hc)*hc]
        mix = torch.addcmul(base, mix, self._expanded(scale))
        gates = torch.sigmoid(mix[:, : 2 * hc])
        pre, post = gates[:, :hc] + eps, 2 * gates[:, hc:]
        comb = sinkhorn_(torch.softmax(mix[:, 2 * hc :].view(-1, hc, hc), dim=-1) + eps, self.iters, eps)
        collapsed = (pre.unsqueeze(-1) * h).sum(dim=1)
        return post, comb, collapsed if h.dtype == torch.float32 else collapsed.to(h.dtype)

    def _forward_numpy(self, h: torch.Tensor, fn, base, scale):
        """forward for float32 on a CPU without autograd: the same arithmetic on NumPy views of the tensors.

        A hyper-connection is some twenty operations on [T, hc] and [T, hc, hc] arrays, run twice per
        layer: at a batch-of-one decode step each PyTorch dispatch (3-5 us) costs more than the
        arithmetic, a NumPy call on such small arrays about a microsecond. The one matmul stays in
        PyTorch (MKL, its threads). Float32 throughout, as transformers computes it; results agree to
        rounding (tests/inference/test_deepseek_v4_model.py compares with transformers).
        """
        hc, eps = self.hc, self.eps
        hn = h.numpy()  # [T, hc, D]
        flat = hn.reshape(hn.shape[0], -1)
        # Reductions as the ufuncs' own reduce: what np.mean / .sum / .max call, without their Python wrappers
        # (np.mean alone took ~2 us of a ~45 us hyper-connection). The mean is that sum divided by the count.
        mean_square = _sum(np.square(flat), axis=-1, keepdims=True) / flat.shape[-1]
        normed = flat / np.sqrt(mean_square + np.float32(self.norm_eps))
        mix = F.linear(torch.from_numpy(normed), fn).numpy()  # [T, (2 + hc) * hc]
        mix = base.numpy() + mix * self._expanded(scale).numpy()
        gates = 1 / (1 + np.exp(-mix[:, : 2 * hc]))  # sigmoid
        pre, post = gates[:, :hc] + np.float32(eps), 2 * gates[:, hc:]
        logits = mix[:, 2 * hc :].reshape(-1, hc, hc)
        comb = np.exp(logits - _max(logits, axis=-1, keepdims=True))
        comb /= _sum(comb, axis=-1, keepdims=True)  # softmax over the last axis
        comb += np.float32(eps)
        if len(comb) > 1:
            comb = _sinkhorn_numpy_(comb, self.iters, eps)
        else:
            comb = (_sinkhorn_4x4 if hc == 4 else _sinkhorn_python)(comb, self.iters, eps)
        collapsed = _sum(pre[:, :, None] * hn, axis=1)
        return torch.from_numpy(post), torch.from_numpy(comb), torch.from_numpy(collapsed)


_sum, _max = np.add.reduce, np.maximum.reduce


def on_numpy(x: torch.Tensor) -> bool:
    """Whether the hyper-connection arithmetic on `x` runs on NumPy views (HyperConnection._forward_numpy)."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()


def _sinkhorn_python(comb: np.ndarray, iters: int, eps: float) -> np.ndarray:
    """sinkhorn_ on one matrix (a batch-of-one decode), float32 [1, hc, hc], in Python floats.

    The loop is 2 * iters - 1 normalisations of three NumPy calls each: for a single 4x4 matrix,
    plain Python arithmetic on its sixteen numbers takes half as long (in float64, rounded to
    float32 once at the end: closer to exact than float32 steps, and within rounding of them).
    """
    rows = comb[0].tolist()
    columns = range(len(rows))
    for step in range(2 * iters - 1):
        if step % 2 == 0:  # columns
            for k in columns:
                total = sum(row[k] for row in rows) + eps
                for row in rows:
                    row[k] /= total
        else:  # rows
            for row in rows:
                total = sum(row) + eps
                row[:] = [value / total for value in row]
    return np.array([rows], dtype=np.float32)


def _sinkhorn_4x4(comb: np.ndarray, iters: int, eps: float) -> np.ndarray:
    """_sinkhorn_python for DeepSeek-V4's four streams (hc_mult 4, every released configuration), its
    sixteen numbers in local variables (rows a, b, c, d; columns 0-3): ~6 us instead of ~22, eight times
    per decode step. The same sums in the same order (sum() starts from 0, and 0 + x is x): the same bits."""
    (a0, a1, a2, a3), (b0, b1, b2, b3), (c0, c1, c2, c3), (d0, d1, d2, d3) = comb[0].tolist()
    for step in range(2 * iters - 1):
        if step % 2 == 0:  # columns
            s0, s1 = a0 + b0 + c0 + d0 + eps, a1 + b1 + c1 + d1 + eps
            s2, s3 = a2 + b2 + c2 + d2 + eps, a3 + b3 + c3 + d3 + eps
            a0, b0, c0, d0 = a0 / s0, b0 / s0, c0 / s0, d0 / s0
            a1, b1, c1, d1 = a1 / s1, b1 / s1, c1 / s1, d1 / s1
            a2, b2, c2, d2 = a2 / s2, b2 / s2, c2 / s2, d2 / s2
            a3, b3, c3, d3 = a3 / s3, b3 / s3, c3 / s3, d3 / s3
        else:  # rows
            t = a0 + a1 + a2 + a3 + eps
            a0, a1, a2, a3 = a0 / t, a1 / t, a2 / t, a3 / t
            t = b0 + b1 + b2 + b3 + eps
            b0, b1, b2, b3 = b0 / t, b1 / t, b2 / t, b3 / t
            t = c0 + c1 + c2 + c3 + eps
            c0, c1, c2, c3 = c0 / t, c1 / t, c2 / t, c3 / t
            t = d0 + d1 + d2 + d3 + eps
            d0, d1, d2, d3 = d0 / t, d1 / t, d2 / t, d3 / t
    return np.array([[[a0, a1, a2, a3], [b0, b1, b2, b3], [c0, c1, c2, c3], [d0, d1, d2, d3]]], dtype=np.float32)


def sinkhorn_(comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Make comb [T, hc, hc] (positive, float32) near doubly stochastic, in place, as transformers does.

    Columns are normalised, then rows and columns `iters - 1` more times, each divided by its
    sum + eps. On a CPU the matrices are tiny (hc is 4) and the loop is some 40 operations per
    hyper-connection, so it runs on a NumPy view of the same memory: one NumPy call costs a
    fraction of a PyTorch dispatch, and the arithmetic (float32 sums and divisions) is the same.
    """
    if comb.device.type == "cpu" and not comb.requires_grad:
        _sinkhorn_numpy_(comb.numpy(), iters, eps)
        return comb
    comb.div_(comb.sum(dim=-2, keepdim=True).add_(eps))
    for _ in range(iters - 1):
        comb.div_(comb.sum(dim=-1, keepdim=True).add_(eps))
        comb.div_(comb.sum(dim=-2, keepdim=True).add_(eps))
    return comb


def _sinkhorn_numpy_(c: np.ndarray, iters: int, eps: float) -> np.ndarray:
    """sinkhorn_'s loop on a float32 array [T, hc, hc], in place."""
    for axis in [-2] + [-1, -2] * (iters - 1):
        total = c.sum(axis=axis, keepdims=True)
        total += np.float32(eps)
        c /= total
    return c
