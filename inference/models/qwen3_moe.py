"""Qwen3-MoE, computed exactly as transformers' `Qwen3MoeForCausalLM`, over Citadel's paged runtime.

Parameter names are transformers' (model.layers.N.self_attn.q_proj.weight, ...). The experts of
a layer are kept stacked, as transformers 5 keeps them in memory ([E, 2I, H] gate-and-up and
[E, H, I] down), and are filled from either checkpoint layout: one tensor per expert
(mlp.experts.N.gate_proj.weight, as on the Hub) or already stacked (mlp.experts.gate_up_proj).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.cache import CacheGroup, CacheSpec
from ..engine.context import ForwardContext
from ..engine.expert_store import ExpertSource
from ..engine.weights import CheckpointWeights, assign_parameter
from ..layers import RMSNorm, RotaryEmbedding, act_fn, moe_dispatch, paged_attention, topk_softmax_router
from ..layers.linear import Linear, linear
from ..layers.moe import moe_dispatch_tiered

KV = "kv"


class Qwen3MoeAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or hidden // self.num_heads
        bias = config.attention_bias
        self.q_proj = Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, hidden, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)  # per head, before RoPE
        self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.scale = self.head_dim**-0.5
        self.sliding_window = config.sliding_window  # None unless use_sliding_window
        self.qkv: tuple[torch.Tensor, torch.Tensor | None] | None = None
        """(weight [q+k+v, H], bias or None) whose row blocks the q/k/v projections' weights are views of
        (fuse_qkv): one matmul instead of three while they are plain linears."""
        self.qk_norm_weight: torch.Tensor | None = None
        """[Hq + Hkv, D]: q_norm's weight for the query heads, k_norm's for the key heads, so the fused
        path normalises q and k (side by side in its output) in one call (float32 only, see forward)."""

    def fuse_qkv(self) -> None:
        """Put the loaded q, k and v weights (and biases) in one tensor, each projection keeping a view of its rows.

        No extra memory; LoRA still wraps the three projections by name and FP8 still quantizes each
        (forward then calls them one by one, and the fused tensor is let go).
        """
        projections = (self.q_proj, self.k_proj, self.v_proj)
        weight = torch.cat([p.weight for p in projections])
        bias = torch.cat([p.bias for p in projections]) if self.q_proj.bias is not None else None
        start = 0
        for p in projections:
            rows = slice(start, start + p.out_features)
            p.weight = nn.Parameter(weight[rows], requires_grad=False)
            if bias is not None:
                p.bias = nn.Parameter(bias[rows], requires_grad=False)
            start = rows.stop
        self.qkv = (weight, bias)
        norms = (self.q_norm.weight, self.k_norm.weight)
        if (
            weight.dtype == torch.float32
            and all(w.dtype == torch.float32 for w in norms)
            and self.q_norm.eps == self.k_norm.eps
        ):
            self.qk_norm_weight = torch.cat(
                (norms[0].expand(self.num_heads, -1), norms[1].expand(self.num_kv_heads, -1))
            )

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, H] -> q [T, Hq * D], k and v [T, Hkv * D]."""
        if self.qkv is not None:
            if (
                isinstance(self.q_proj, nn.Linear)
                and isinstance(self.k_proj, nn.Linear)
                and isinstance(self.v_proj, nn.Linear)
            ):
                q_size = self.q_proj.out_features
                kv_size = self.k_proj.out_features
                return linear(x, *self.qkv).split((q_size, kv_size, kv_size), dim=-1)
            self.qkv = None  # wrapped (LoRA) or replaced (FP8): the projections own their weights now
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x, cos, sin, ctx: ForwardContext, cache: torch.Tensor) -> torch.Tensor:
        tokens = x.shape[0]  # x [T, H]
        q, k, v = self._project(x)
        if self.qk_norm_weight is not None and self.qkv is not None:
            # q and k are side by side in the fused output: one RMSNorm and one rotation for both. RMSNorm's
            # float32 kernel scales by its weight last, so scaling afterwards gives the same bits.
            heads = self.num_heads + self.num_kv_heads
            qk = q.as_strided((tokens, heads, self.head_dim), (q.stride(0), self.head_dim, 1))
            qk = F.rms_norm(qk, (self.head_dim,), None, self.q_norm.eps) * self.qk_norm_weight
            qk = RotaryEmbedding.rotate(qk, cos, sin)  # [T, Hq + Hkv, D]
            q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
            v = v.view(tokens, self.num_kv_heads, self.head_dim)
            out = paged_attention(q, k, v, cache, ctx, KV, self.scale, self.sliding_window)  # [T, Hq, D]
            return self.o_proj(out.reshape(tokens, -1))
        q = self.q_norm(q.view(tokens, self.num_heads, self.head_dim))  # [T, Hq, D]
        k = self.k_norm(k.view(tokens, self.num_kv_heads, self.head_dim))  # [T, Hkv, D]
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        q, k = RotaryEmbedding.rotate(q, cos, sin), RotaryEmbedding.rotate(k, cos, sin)
        out = paged_attention(q, k, v, cache, ctx, KV, self.scale, self.sliding_window)  # [T, Hq, D]
        return self.o_proj(out.reshape(tokens, -1))


class Qwen3MoeMLP(nn.Module):
    """The dense MLP of layers listed in mlp_only_layers (or off the decoder_sparse_step)."""

    def __init__(self, config, intermediate_size: int):
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, config.hidden_size, bias=False)
        self.act = act_fn(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Qwen3MoeExperts(nn.Module):
    def __init__(self, config):
        super().__init__()
        experts, hidden, inner = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(experts, 2 * inner, hidden))  # [E, 2I, H]
        self.down_proj = nn.Parameter(torch.empty(experts, hidden, inner))  # [E, H, I]


class Qwen3MoeExpert(nn.Module):
    """One routed expert on its own: a fast-tier slot of the expert store (engine/expert_store.py)."""

    def __init__(self, config):
        super().__init__()
        hidden, inner = config.hidden_size, config.moe_intermediate_size
        self.gate_up = nn.Parameter(torch.empty(2 * inner, hidden))  # [2I, H]
        self.down = nn.Parameter(torch.empty(hidden, inner))  # [H, I]
        self.act = act_fn(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """What moe_dispatch's per-expert loop computes, with this expert's weights."""
        gate, up = linear(x, self.gate_up).chunk(2, dim=-1)
        return linear(self.act(gate) * up, self.down)


class Qwen3MoeSparseMoeBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate = Linear(config.hidden_size, config.num_experts, bias=False)  # the router
        self.experts = Qwen3MoeExperts(config)
        self.top_k, self.norm_topk_prob = config.num_experts_per_tok, config.norm_topk_prob
        self.act = act_fn(config.hidden_act)
        self.tier = None  # the layer's TieredLayer when the experts are tiered (self.experts is then None)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return topk_softmax_router(self.gate(x), self.top_k, self.norm_topk_prob)  # [T, k] each

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, H]
        weights, ids = self.route(x)
        if self.tier is not None:
            return moe_dispatch_tiered(x, weights, ids, self.tier)
        return moe_dispatch(x, self.experts.gate_up_proj, self.experts.down_proj, weights, ids, self.act)


class Qwen3MoeDecoderLayer(nn.Module):
    def __init__(self, config, index: int):
        super().__init__()
        self.self_attn = Qwen3MoeAttention(config)
        sparse = config.num_experts > 0 and (index + 1) % config.decoder_sparse_step == 0
        if sparse and index not in config.mlp_only_layers:
            self.mlp = Qwen3MoeSparseMoeBlock(config)
        else:
            self.mlp = Qwen3MoeMLP(config, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x, cos, sin, ctx: ForwardContext, cache: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3MoeModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Qwen3MoeDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class Qwen3MoeForCausalLM(nn.Module):
    """The model interface of inference/engine (see its docstring): cache_spec, forward, compute_logits."""

    lora_excluded = r"^lm_head$"
    fp8_excluded = r"^lm_head$|\.mlp\.gate$"
    """Linears quantize_linears leaves alone: the LM head and the routers. (The stacked experts are
    parameters, not linears, and stay in the model's dtype.)"""
    """Linears that serve no LoRA (inference/lora); the stacked experts are parameters, not linears."""

    lora_token_modules = {"input": "model.embed_tokens", "output": "lm_head"}
    """Where an adapter's trained token rows go (inference/lora)."""

    @staticmethod
    def lora_module_name(name: str) -> str:
        """A module's name in transformers' model (as PEFT saves it) -> its name here: the same."""
        return name

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = Qwen3MoeModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        attention = self.model.layers[0].self_attn
        self.rotary = RotaryEmbedding(config, attention.head_dim)
        self.num_kv_heads, self.head_dim = attention.num_kv_heads, attention.head_dim
        self.dtype = torch.float32
        self.expert_store = None  # an ExpertStore when the routed experts are tiered

    @property
    def max_model_len(self) -> int:
        return int(self.config.max_position_embeddings)

    def cache_spec(self) -> CacheSpec:
        """One group: K and V of every layer, one entry per token."""
        layers = tuple(range(len(self.model.layers)))
        return CacheSpec((CacheGroup(KV, layers, (2, self.num_kv_heads, self.head_dim), self.dtype),))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """input_ids, positions [T] -> final hidden states [T, H]."""
        x = self.model.embed_tokens(input_ids)
        if self.expert_store is not None:
            self.expert_store.begin_step(x, input_ids)
        cos, sin = self.rotary.step_tables(positions, x.dtype)  # [T, 1, D] each
        for layer, cache in zip(self.model.layers, ctx.caches[KV], strict=True):
            x = layer(x, cos, sin, ctx, cache)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, H] -> [N, vocab]
        return self.lm_head(hidden)

    def load_weights(self, weights: CheckpointWeights, device: torch.device, dtype: torch.dtype) -> None:
        """Fill every parameter from the checkpoint (this module was built on the meta device)."""
        self.dtype = dtype
        tied = bool(getattr(self.config, "tie_word_embeddings", False))
        for name, _ in list(self.named_parameters()):
            if name == "lm_head.weight" and tied:
                continue
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")) and name not in weights:
                tensor = _stack_experts(weights, name, self.config.num_experts)
            else:
                tensor = weights.get(name)
            assign_parameter(self, name, tensor, device, dtype)
        if tied:
            if "lm_head.weight" in weights:  # some tied checkpoints store the copy anyway
                weights.get("lm_head.weight")
            self.lm_head.weight = self.model.embed_tokens.weight
        for layer in self.model.layers:
            layer.self_attn.fuse_qkv()

    def expert_sources(
        self, weights: CheckpointWeights, dtype: torch.dtype, quantization: str | None
    ) -> list[ExpertSource]:
        """Hand the routed experts to an expert store: detach them (unloaded) and describe how to read each.

        Called on the meta-device model before load_weights. The experts keep the model's dtype (as
        all-resident serving keeps the stacked experts; FP8 quantization leaves them alone too).
        """
        sources = []
        for index, layer in enumerate(self.model.layers):
            block = layer.mlp
            if not isinstance(block, Qwen3MoeSparseMoeBlock):
                continue
            prefix = f"model.layers.{index}.mlp.experts"
            stacked = f"{prefix}.gate_up_proj" in weights
            if stacked:
                names = [f"{prefix}.gate_up_proj", f"{prefix}.down_proj"]
            else:
                names = [
                    f"{prefix}.{e}.{part}.weight"
                    for e in range(self.config.num_experts)
                    for part in ("gate_proj", "up_proj", "down_proj")
                ]
            weights.set_aside(names)  # CheckpointError naming a missing one, before anything loads
            block.experts = None
            sources.append(
                ExpertSource(
                    layer=index,
                    num_experts=self.config.num_experts,
                    read=functools.partial(_read_expert, weights, prefix, stacked, dtype),
                    new_slot=functools.partial(Qwen3MoeExpert, self.config),
                    predict=lambda x, _ids, block=block: block.route(x)[1],
                    moe=block,
                )
            )
        return sources


def _read_expert(weights: CheckpointWeights, prefix: str, stacked: bool, dtype: torch.dtype, expert: int) -> dict:
    """One expert's gate_up [2I, H] and down [H, I] in `dtype`, read from the mapped checkpoint."""
    if stacked:
        gate_up = weights.read(f"{prefix}.gate_up_proj", expert)
        down = weights.read(f"{prefix}.down_proj", expert)
    else:
        gate_up = torch.cat(
            (weights.read(f"{prefix}.{expert}.gate_proj.weight"), weights.read(f"{prefix}.{expert}.up_proj.weight"))
        )
        down = weights.read(f"{prefix}.{expert}.down_proj.weight")
    return {"gate_up": gate_up.to(dtype), "down": down.to(dtype)}


def _stack_experts(weights: CheckpointWeights, name: str, num_experts: int) -> torch.Tensor:
    """[E, ...] from the per-expert tensors (mlp.experts.N.{gate,up,down}_proj.weight)."""
    prefix = name.rsplit(".", 1)[0]
    if name.endswith("gate_up_proj"):
        parts = [
            torch.cat(
                (weights.get(f"{prefix}.{e}.gate_proj.weight"), weights.get(f"{prefix}.{e}.up_proj.weight"))
            )
            for e in range(num_experts)
        ]
    else:
        parts = [weights.get(f"{prefix}.{e}.down_proj.weight") for e in range(num_experts)]
    return torch.stack(parts)
