"""Citadel's DeepSeek-V4: transformers' DeepseekV4ForCausalLM, computed over the engine's batched steps.

The model implements the engine's model interface (inference/engine/__init__.py): it takes the
tokens of several sequences flattened into one [T] tensor, each sequence feeding a prefill chunk
or one decode token, and keeps each sequence's state (sliding-window keys, compressor tails,
compressed entries, indexer keys) in the engine's cache, as the groups its `cache_spec()`
declares (deepseek_v4_cache.py). Each step's addressing is derived once from the ForwardContext
(a V4Batch, deepseek_v4_batch.py). Every layer type transformers defines is here: sliding-window,
compressed sparse attention with its lightning indexer, heavily compressed attention; hash-routed
and top-k routed MoE with a shared expert; hyper-connections with Sinkhorn mixing.

    llm = inference.LLM("/models/deepseek-v4")     # registry.load_model builds and fills it

Weights load 1:1 from DeepSeek's tensor names, memory-mapped from the safetensors shards onto
a model built on the meta device. The same names with transformers' few top-level renames
(model. prefix, embed_tokens, lm_head, hc_head.hc_*) are accepted, as `save_pretrained` writes
them; the multi-token-prediction layers (mtp.*) are not used and are skipped.

Each sequence's original prompt length (ForwardContext.prompt_lens) decides how exact ties among
the indexer's scores are broken (deepseek_v4_attention.select_top_k), so that results equal
transformers' generate() whatever the chunking, batching or recomputation after preemption.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..engine.cache import CacheSpec
from ..engine.context import ForwardContext
from ..engine.weights import CheckpointError, CheckpointWeights
from ..layers.linear import Linear
from ..quant.fp8 import FP8_DTYPE
from .deepseek_v4_attention import Attention
from .deepseek_v4_batch import V4Batch
from .deepseek_v4_cache import V4CacheLayout
from .deepseek_v4_layers import (
    HyperConnection,
    MoE,
    RMSNorm,
    Rotary,
    expert_sources,
    on_numpy,
    unweighted_rms_norm,
)

# transformers' save_pretrained names for the few top-level tensors -> DeepSeek's.
_TOP_LEVEL_RENAMES = {
    "embed_tokens.weight": "embed.weight",
    "lm_head.weight": "head.weight",
    "hc_head.hc_fn": "hc_head_fn",
    "hc_head.hc_base": "hc_head_base",
    "hc_head.hc_scale": "hc_head_scale",
}
_SKIPPED_PREFIXES = ("mtp.",)

# LoRA adapters name modules as transformers' DeepseekV4ForCausalLM does (PEFT wraps that model)
# -> this model's names. transformers' o_a_proj is a grouped projection whose LoRA PEFT cannot
# apply either, so it has no counterpart; routed experts are stacked parameters there.
_LORA_NAMES = (
    (r"model\.embed_tokens", "embed"),
    (r"lm_head", "head"),
    (r"model\.layers\.(\d+)\.self_attn\.compressor\.indexer\.scorer\.weights_proj", r"layers.\1.attn.indexer.weights_proj"),
    (r"model\.layers\.(\d+)\.self_attn\.compressor\.indexer\.q_b_proj", r"layers.\1.attn.indexer.wq_b"),
    (r"model\.layers\.(\d+)\.self_attn\.compressor\.indexer\.kv_proj", r"layers.\1.attn.indexer.compressor.wkv"),
    (r"model\.layers\.(\d+)\.self_attn\.compressor\.indexer\.gate_proj", r"layers.\1.attn.indexer.compressor.wgate"),
    (r"model\.layers\.(\d+)\.self_attn\.compressor\.kv_proj", r"layers.\1.attn.compressor.wkv"),
    (r"model\.layers\.(\d+)\.self_attn\.compressor\.gate_proj", r"layers.\1.attn.compressor.wgate"),
    (r"model\.layers\.(\d+)\.self_attn\.q_a_proj", r"layers.\1.attn.wq_a"),
    (r"model\.layers\.(\d+)\.self_attn\.q_b_proj", r"layers.\1.attn.wq_b"),
    (r"model\.layers\.(\d+)\.self_attn\.kv_proj", r"layers.\1.attn.wkv"),
    (r"model\.layers\.(\d+)\.self_attn\.o_b_proj", r"layers.\1.attn.wo_b"),
    (r"model\.layers\.(\d+)\.mlp\.shared_experts\.gate_proj", r"layers.\1.ffn.shared_experts.w1"),
    (r"model\.layers\.(\d+)\.mlp\.shared_experts\.up_proj", r"layers.\1.ffn.shared_experts.w3"),
    (r"model\.layers\.(\d+)\.mlp\.shared_experts\.down_proj", r"layers.\1.ffn.shared_experts.w2"),
)


class Block(nn.Module):
    """Attention and MoE, each entered and left through hyper-connections over hc_mult streams."""

    def __init__(self, config, layer_id: int):
        super().__init__()
        hc, D = config.hc_mult, config.hidden_size
        self.attn = Attention(config, layer_id)
        self.ffn = MoE(config, layer_id)
        self.attn_norm = RMSNorm(D, config.rms_norm_eps)
        self.ffn_norm = RMSNorm(D, config.rms_norm_eps)
        self.hc = HyperConnection(config)
        mix = (2 + hc) * hc
        for site in ("attn", "ffn"):
            setattr(self, f"hc_{site}_fn", nn.Parameter(torch.empty(mix, hc * D, dtype=torch.float32)))
            setattr(self, f"hc_{site}_base", nn.Parameter(torch.empty(mix, dtype=torch.float32)))
            setattr(self, f"hc_{site}_scale", nn.Parameter(torch.empty(3, dtype=torch.float32)))

    def forward(
        self, h: torch.Tensor, input_ids: torch.Tensor, batch: V4Batch, rotary: Rotary
    ) -> torch.Tensor:
        """h [T, hc, D] -> [T, hc, D]."""
        post, comb, x = self.hc(h, self.hc_attn_fn, self.hc_attn_base, self.hc_attn_scale)
        x = self.attn(self.attn_norm(x), batch, rotary)
        h = _merge(h, post, comb, x)
        post, comb, x = self.hc(h, self.hc_ffn_fn, self.hc_ffn_base, self.hc_ffn_scale)
        x = self.ffn(self.ffn_norm(x), input_ids)
        return _merge(h, post, comb, x)


def _merge(h: torch.Tensor, post: torch.Tensor, comb: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Streams h [T, hc, D] after a sublayer's output x [T, D]: post_k * x + sum_j comb[j, k] * h_j."""
    if on_numpy(h):  # as the hyper-connections compute theirs: NumPy calls cost less than dispatches
        hn, out = h.numpy(), post.numpy()[:, :, None] * x.numpy()[:, None, :]
        return torch.from_numpy(np.add(out, np.matmul(comb.numpy().transpose(0, 2, 1), hn), out=out))
    if h.dtype != torch.float32:
        post, comb = post.to(h.dtype), comb.to(h.dtype)
    # comb mixes the input streams transposed: out_k = sum_j comb[j, k] * h_j.
    return post.unsqueeze(-1) * x.unsqueeze(-2) + torch.matmul(comb.transpose(-1, -2), h)


class CitadelDeepseekV4(nn.Module):
    """DeepSeek-V4 causal LM: the engine's model interface (cache_spec, forward, compute_logits, load_weights)."""

    lora_excluded = r"^head$|\.wo_a$|\.experts\.\d+\."
    """Linears that serve no LoRA (inference/lora): the LM head, wo_a (read as a grouped weight), and the
    routed experts (each sees only its own tokens, not the step's rows)."""
    fp8_excluded = r"^head$|compressor|indexer"
    """Linears quantize_linears leaves alone: the LM head, and the compressor and indexer projections that
    DeepSeek's own FP8 checkpoints ship unquantized."""

    lora_token_modules = {"input": "embed", "output": "head"}
    """Where an adapter's trained token rows go (inference/lora)."""
    loads_native_fp8 = True
    """DeepSeek's FP8 checkpoints (weight + weight_scale_inv) load as they are (models/registry.py)."""
    reads_kv_through_tiers = True
    """Compressed entries left in a slower KV tier are fetched by the attention itself, only the ones
    it reads (engine/tiers.py): a sequence may be longer than the device tier holds."""

    @property
    def tie_length_unit(self) -> int:
        """The indexer breaks top-k ties as transformers does, on rows prompt_len // csa_rate long: prompts
        whose lengths agree in that quotient compute the same (the prefix cache's tie class)."""
        return self.layout.csa_rate

    @staticmethod
    def checkpoint_module_name(stored: str) -> str:
        """A module's name in the checkpoint -> its name here."""
        return canonical_name(f"{stored}.weight").removesuffix(".weight")

    @staticmethod
    def lora_module_name(name: str) -> str | None:
        """A module's name in transformers' model (as PEFT saves it) -> its name here (None: none)."""
        import re

        for pattern, replacement in _LORA_NAMES:
            if re.fullmatch(pattern, name):
                return re.sub(pattern, replacement, name)
        return None

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.layout = V4CacheLayout.from_config(config)
        hc, D = config.hc_mult, config.hidden_size
        self.embed = nn.Embedding(config.vocab_size, D)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(D, config.rms_norm_eps)
        self.hc_head_fn = nn.Parameter(torch.empty(hc, hc * D, dtype=torch.float32))
        self.hc_head_base = nn.Parameter(torch.empty(hc, dtype=torch.float32))
        self.hc_head_scale = nn.Parameter(torch.empty(1, dtype=torch.float32))
        self.head = Linear(D, config.vocab_size, bias=False)
        self.rotary: Rotary | None = None  # built on the real device by load_weights
        self.expert_store = None  # an ExpertStore when the routed experts are tiered (engine/expert_store.py)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def max_model_len(self) -> int:
        return int(self.config.max_position_embeddings)

    def cache_spec(self) -> CacheSpec:
        """The window ring and compressor tails per sequence, CSA and HCA entries in pages."""
        return self.layout.cache_spec(self.dtype)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """input_ids, positions [T] of the step's sequences -> final hidden states [T, D]; writes the caches."""
        assert self.rotary is not None, "load the weights first (load_weights builds the rotary tables)"
        batch = V4Batch.build(self.layout, positions, ctx)
        assert input_ids.shape == (batch.num_tokens,)
        x = self.embed(input_ids)  # [T, D]
        if self.expert_store is not None:
            self.expert_store.begin_step(x, input_ids)
        batch.rope = {kind: self.rotary.table(positions, kind, x.dtype, batch.end) for kind in ("main", "compress")}
        h = x.unsqueeze(1).expand(-1, self.config.hc_mult, -1).contiguous()  # [T, hc, D]
        for layer in self.layers:
            h = layer(h, input_ids, batch, self.rotary)
        flat = unweighted_rms_norm(h.flatten(1).float(), self.config.rms_norm_eps)
        pre = torch.sigmoid(
            nn.functional.linear(flat, self.hc_head_fn) * self.hc_head_scale + self.hc_head_base
        )
        pre = pre + self.config.hc_eps  # [T, hc]
        return self.norm((pre.unsqueeze(-1) * h).sum(dim=1).to(h.dtype))

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, D] -> float32 logits [N, vocab]."""
        return self.head(hidden).float()

    def expert_sources(self, weights: CheckpointWeights, dtype: torch.dtype, quantization: str | None):
        """Detach the routed experts for an expert store (deepseek_v4_layers.expert_sources)."""
        stored = {canonical_name(n): n for n in weights.names() if canonical_name(n) is not None}
        return expert_sources(self, stored, weights, dtype, quantization)

    def load_weights(self, weights: CheckpointWeights, device: torch.device | str, dtype: torch.dtype) -> None:
        """Fill every parameter and buffer from the checkpoint (this module was built on the meta device)."""
        fill_weights(self, weights, device, dtype)


def keeps_float32(name: str) -> bool:
    """Parameters transformers keeps in float32 whatever the model dtype (norms, sinks, mixers, biases)."""
    leaf = name.rsplit(".", 1)[-1]
    return (name.endswith("norm.weight") or leaf in ("ape", "attn_sink", "bias", "weight_scale_inv")
            or leaf.startswith("hc_"))


def canonical_name(name: str) -> str | None:
    """A checkpoint tensor's name as this model calls it; None for tensors the model does not use."""
    if name.startswith("model."):
        name = name[len("model.") :]
    if name.startswith(_SKIPPED_PREFIXES):
        return None
    return _TOP_LEVEL_RENAMES.get(name, name)


def fill_weights(
    model: CitadelDeepseekV4, weights: CheckpointWeights, device: torch.device | str, dtype: torch.dtype
) -> None:
    """Fill `model` (built on the meta device) from the memory-mapped checkpoint `weights`.

    Floating-point tensors become `dtype` except those transformers keeps in float32; integer
    tables (the hash router's tid2eid) keep their type. Raises CheckpointError naming the tensor
    when one is missing, unexpected or misshapen.
    """
    device, where = torch.device(device), getattr(weights, "folder", "the checkpoint")
    by_name: dict[str, str] = {}
    for stored in weights.names():
        name = canonical_name(stored)
        if name is None:
            weights.skip(stored)
        else:
            by_name[name] = stored
    expected = dict(model.named_parameters())
    expected.update(model.named_buffers())
    if getattr(model.config, "tie_word_embeddings", False) and "head.weight" not in by_name:
        by_name["head.weight"] = by_name.get("embed.weight", "embed.weight")
    missing = sorted(set(expected) - set(by_name))
    if missing:
        raise CheckpointError(
            f"the checkpoint in {where} lacks {len(missing)} tensor(s) the config implies, e.g. "
            f"{', '.join(missing[:5])}: the weights do not match config.json, or a shard is missing"
        )
    unexpected = sorted(by_name[n] for n in set(by_name) - set(expected))
    if any(n.endswith((".scale", ".weight_scale_inv")) for n in unexpected):
        raise CheckpointError(
            f"the checkpoint in {where} has scale tensors that belong to no FP8 weight, e.g. "
            f"{next(n for n in unexpected if 'scale' in n)!r}: FP8 checkpoints are read in DeepSeek's "
            "format (a float8_e4m3fn `weight` beside each `weight_scale_inv`)"
        )
    if unexpected:
        raise CheckpointError(
            f"the checkpoint in {where} has {len(unexpected)} tensor(s) this model does not use, e.g. "
            f"{', '.join(unexpected[:5])}: the weights do not match config.json"
        )
    for name, target in expected.items():
        tensor = weights.get(by_name[name])
        if tuple(tensor.shape) != tuple(target.shape):
            raise CheckpointError(
                f"tensor {by_name[name]!r} has shape {tuple(tensor.shape)} in the checkpoint, the config "
                f"implies {tuple(target.shape)}"
            )
        if tensor.dtype == FP8_DTYPE:  # a native FP8 weight: its module was made an Fp8Linear
            tensor = tensor.to(device=device)
        elif tensor.is_floating_point():
            tensor = tensor.to(device=device, dtype=torch.float32 if keeps_float32(name) else dtype)
        else:
            tensor = tensor.to(device=device)
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        if leaf in owner._buffers:
            owner._buffers[leaf] = tensor
        else:
            owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    model.rotary = Rotary(model.config, device)
    model.eval()

