"""The demo model itself: a transformers `DeepseekV4ForCausalLM` built from `ModelSettings`.

Nothing here reimplements the architecture; this file only maps the settings onto
`DeepseekV4Config`, fills what transformers leaves for the checkpoint to provide (the hash
routers' token -> experts table, zero in a fresh model, which would send every token to expert
0), and counts parameters the way a model card reports them.
"""

from __future__ import annotations

import torch

from ..tiny_checkpoint import SPECIAL_TOKENS
from .config import ModelSettings

BOS_ID, EOS_ID, PAD_ID = 0, 1, 2
assert SPECIAL_TOKENS[:3] == ["<|begin|>", "<|end|>", "<|pad|>"]


def model_config(settings: ModelSettings, vocab_size: int):
    """The `DeepseekV4Config` of the demo model."""
    from transformers import DeepseekV4Config

    s = settings
    return DeepseekV4Config(
        vocab_size=vocab_size,
        hidden_size=s.hidden_size,
        num_hidden_layers=len(s.layer_types),
        layer_types=list(s.layer_types),
        mlp_layer_types=list(s.mlp_layer_types),
        num_attention_heads=s.num_attention_heads,
        num_key_value_heads=1,
        head_dim=s.head_dim,
        partial_rotary_factor=s.partial_rotary_factor,
        q_lora_rank=s.q_lora_rank,
        o_groups=s.o_groups,
        o_lora_rank=s.o_lora_rank,
        moe_intermediate_size=s.moe_intermediate_size,
        n_routed_experts=s.n_routed_experts,
        num_experts_per_tok=s.num_experts_per_tok,
        n_shared_experts=s.n_shared_experts,
        sliding_window=s.sliding_window,
        compress_rates={"compressed_sparse_attention": s.csa_compress_rate,
                        "heavily_compressed_attention": s.hca_compress_rate},
        index_n_heads=s.index_n_heads,
        index_head_dim=s.index_head_dim,
        index_topk=s.index_topk,
        hc_mult=s.hc_mult,
        hc_sinkhorn_iters=s.hc_sinkhorn_iters,
        max_position_embeddings=s.max_position_embeddings,
        # YaRN on the compressed branches, as in the real model (factor 16 there).
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256,
                         "beta_fast": 32, "beta_slow": 1},
        initializer_range=s.initializer_range,
        tie_word_embeddings=False,
        num_nextn_predict_layers=0,  # no multi-token-prediction layer (transformers does not build one)
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )


def build_model(settings: ModelSettings, vocab_size: int, seed: int):
    """A freshly initialised float32 DeepseekV4ForCausalLM, the same for the same seed."""
    from transformers import DeepseekV4ForCausalLM

    config = model_config(settings, vocab_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DeepseekV4ForCausalLM(config).to(torch.float32)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("tid2eid"):
                # Each token goes to num_experts_per_tok distinct experts, fixed for good (hash routing).
                n_tokens, top_k = buffer.shape
                rows = [torch.randperm(config.n_routed_experts, generator=generator)[:top_k] for _ in range(n_tokens)]
                buffer.copy_(torch.stack(rows))
    return model


def parameter_counts(model) -> dict[str, int]:
    """Total parameters, and those one token uses (shared experts plus its routed top-k)."""
    config = model.config
    total = sum(p.numel() for p in model.parameters())
    experts = [m for name, m in model.named_modules() if name.endswith("mlp.experts")]
    routed = sum(p.numel() for m in experts for p in m.parameters())
    unused_fraction = 1 - config.num_experts_per_tok / config.n_routed_experts
    embedding = model.get_input_embeddings().weight.numel()
    active = total - round(routed * unused_fraction)
    return {"total": total, "active_per_token": active, "routed_experts": routed,
            "embedding": embedding, "active_per_token_without_embedding": active - embedding}
