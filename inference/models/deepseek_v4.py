"""Citadel's DeepSeek-V4: transformers' DeepseekV4ForCausalLM, computed over a batched step.

The model takes the tokens of several sequences flattened into one [T] tensor, each sequence
feeding a prefill chunk or one decode token, and keeps each sequence's state (sliding-window
keys, compressor tails, compressed entries, indexer keys) in a V4CachePool (deepseek_v4_cache.py),
addressed step by step through a V4Batch (deepseek_v4_batch.py). Every layer type transformers
defines is here: sliding-window, compressed sparse attention with its lightning indexer, heavily
compressed attention; hash-routed and top-k routed MoE with a shared expert; hyper-connections
with Sinkhorn mixing.

    model = load_model(folder, device="cpu", dtype=torch.float32)
    pool = V4CachePool(model.config, byte_budget=1 << 30, max_seqs=64, dtype=model.dtype,
                       device=model.device)
    caches = [pool.allocate(prompt_len=len(p)) for p in prompts]
    batch = V4Batch.build(pool, [(c, len(p)) for c, p in zip(caches, prompts)])
    hidden = model(torch.tensor(sum(prompts, [])), batch)       # [T, D], advances the caches
    logits = model.compute_logits(hidden[[o - 1 for o in batch.offsets[1:]]])   # last token of each

Weights load 1:1 from DeepSeek's tensor names, memory-mapped from the safetensors shards onto
a model built on the meta device. The same names with transformers' few top-level renames
(model. prefix, embed_tokens, lm_head, hc_head.hc_*) are accepted, as `save_pretrained` writes
them; the multi-token-prediction layers (mtp.*) are not used and are skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .deepseek_v4_attention import Attention
from .deepseek_v4_batch import V4Batch
from .deepseek_v4_layers import HyperConnection, MoE, RMSNorm, Rotary, unweighted_rms_norm

# transformers' save_pretrained names for the few top-level tensors -> DeepSeek's.
_TOP_LEVEL_RENAMES = {
    "embed_tokens.weight": "embed.weight",
    "lm_head.weight": "head.weight",
    "hc_head.hc_fn": "hc_head_fn",
    "hc_head.hc_base": "hc_head_base",
    "hc_head.hc_scale": "hc_head_scale",
}
_SKIPPED_PREFIXES = ("mtp.",)


class CheckpointError(ValueError):
    """The checkpoint does not fit the model: a missing, unexpected, misshapen or unreadable tensor."""


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
        dtype = h.dtype
        post, comb, x = self.hc(h, self.hc_attn_fn, self.hc_attn_base, self.hc_attn_scale)
        x = self.attn(self.attn_norm(x), batch, rotary)
        # comb mixes the input streams transposed: out_k = sum_j comb[j, k] * h_j.
        h = post.to(dtype).unsqueeze(-1) * x.unsqueeze(-2) + torch.matmul(comb.to(dtype).transpose(-1, -2), h)
        post, comb, x = self.hc(h, self.hc_ffn_fn, self.hc_ffn_base, self.hc_ffn_scale)
        x = self.ffn(self.ffn_norm(x), input_ids)
        return post.to(dtype).unsqueeze(-1) * x.unsqueeze(-2) + torch.matmul(
            comb.to(dtype).transpose(-1, -2), h
        )


class CitadelDeepseekV4(nn.Module):
    """DeepSeek-V4 causal LM over V4Batch steps (build with load_model, or on meta and load_weights)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        hc, D = config.hc_mult, config.hidden_size
        self.embed = nn.Embedding(config.vocab_size, D)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(D, config.rms_norm_eps)
        self.hc_head_fn = nn.Parameter(torch.empty(hc, hc * D, dtype=torch.float32))
        self.hc_head_base = nn.Parameter(torch.empty(hc, dtype=torch.float32))
        self.hc_head_scale = nn.Parameter(torch.empty(1, dtype=torch.float32))
        self.head = nn.Linear(D, config.vocab_size, bias=False)
        self.rotary: Rotary | None = None  # built on the real device by load_weights

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, batch: V4Batch) -> torch.Tensor:
        """input_ids [T] of the batch's sequences -> final hidden states [T, D]; advances the caches."""
        assert self.rotary is not None, "load the weights first (load_weights builds the rotary tables)"
        assert input_ids.shape == (batch.num_tokens,)
        x = self.embed(input_ids)  # [T, D]
        batch.rope = {
            kind: self.rotary.cos_sin(batch.positions, kind, x.dtype) for kind in ("main", "compress")
        }
        h = x.unsqueeze(1).expand(-1, self.config.hc_mult, -1).contiguous()  # [T, hc, D]
        for layer in self.layers:
            h = layer(h, input_ids, batch, self.rotary)
        batch.commit()
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

    def load_weights(self, weights, device: torch.device | str, dtype: torch.dtype) -> None:
        """Fill from a checkpoint reader with names() and get(name) (the engine's CheckpointWeights)."""
        fill_weights(self, weights, device, dtype)


def keeps_float32(name: str) -> bool:
    """Parameters transformers keeps in float32 whatever the model dtype (norms, sinks, mixers, biases)."""
    leaf = name.rsplit(".", 1)[-1]
    return name.endswith("norm.weight") or leaf in ("ape", "attn_sink", "bias") or leaf.startswith("hc_")


def canonical_name(name: str) -> str | None:
    """A checkpoint tensor's name as this model calls it; None for tensors the model does not use."""
    if name.startswith("model."):
        name = name[len("model.") :]
    if name.startswith(_SKIPPED_PREFIXES):
        return None
    return _TOP_LEVEL_RENAMES.get(name, name)


class SafetensorsFolder:
    """Name -> tensor over the *.safetensors shards of a folder, memory-mapped and read lazily.

    The same two methods as the engine's CheckpointWeights (names, get), so either can fill the
    model; errors name the shard that cannot be read.
    """

    def __init__(self, folder: str | Path):
        self.folder = folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                shards = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
            except (ValueError, KeyError, TypeError, AttributeError) as error:
                raise CheckpointError(f"{index} is not a valid safetensors index ({error})") from error
            missing = [s.name for s in shards if not s.is_file()]
            if missing:
                raise CheckpointError(
                    f"{index.name} names shards that {folder} lacks: {', '.join(missing[:5])}"
                )
        else:
            shards = sorted(folder.glob("*.safetensors"))
        if not shards:
            raise CheckpointError(f"{folder} has no *.safetensors weights")
        self._where: dict[str, tuple[Path, object]] = {}
        for shard in shards:
            try:
                handle = safe_open(str(shard), framework="pt", device="cpu")
                names = list(handle.keys())
            except (SafetensorError, OSError, ValueError) as error:
                raise CheckpointError(
                    f"the weight shard {shard} is corrupt or truncated ({error}): copy it again"
                ) from error
            for name in names:
                if name in self._where:
                    raise CheckpointError(
                        f"tensor {name!r} is in both {self._where[name][0].name} and {shard.name}"
                    )
                self._where[name] = (shard, handle)

    def names(self) -> list[str]:
        return sorted(self._where)

    def get(self, name: str) -> torch.Tensor:
        shard, handle = self._where[name]
        try:
            return handle.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(f"cannot read tensor {name!r} from {shard}: {error}") from error


def fill_weights(model: CitadelDeepseekV4, weights, device: torch.device | str, dtype: torch.dtype) -> None:
    """Fill `model` (built on the meta device) from `weights` (names() and get(name), e.g. SafetensorsFolder).

    Floating-point tensors become `dtype` except those transformers keeps in float32; integer
    tables (the hash router's tid2eid) keep their type. Raises CheckpointError naming the tensor
    when one is missing, unexpected or misshapen.
    """
    device, where = torch.device(device), getattr(weights, "folder", "the checkpoint")
    by_name: dict[str, str] = {}
    for stored in weights.names():
        name = canonical_name(stored)
        if name is not None:
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
            f"the checkpoint in {where} is quantized (it has scale tensors such as "
            f"{next(n for n in unexpected if 'scale' in n)!r}); this model loads float32/bfloat16 weights: "
            "use a dequantized (bf16) copy of the checkpoint"
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
        if tensor.is_floating_point():
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


def load_weights(
    model: CitadelDeepseekV4, path: str | Path, device: torch.device | str, dtype: torch.dtype
) -> None:
    """Fill `model` (built on the meta device) from the checkpoint folder `path`, memory-mapped."""
    fill_weights(model, SafetensorsFolder(path), device, dtype)


def load_model(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """CitadelDeepseekV4 from a Hugging Face checkpoint folder (config.json + safetensors)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    if config.model_type != "deepseek_v4":
        raise ValueError(f"{path} holds a {config.model_type!r} model, not deepseek_v4")
    with torch.device("meta"):
        model = CitadelDeepseekV4(config)
    load_weights(model, path, device, dtype)
    return model
