"""`python -m inference.demo tiny-moe`: a tiny random-weight Qwen3-MoE checkpoint.

The engine supports more MoE families than DeepSeek-V4; this is the classic one
(softmax top-k router, no shared expert, grouped-query attention) at toy size, so engine
tests cover a second family in seconds. The weights are random (seeded) and a few hundred
kilobytes; the tokenizer, special tokens and chat template are tiny_checkpoint.py's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..tiny_checkpoint import build_tokenizer
from .model import BOS_ID, EOS_ID, PAD_ID
from .tokenizer import save_tokenizer

CONFIG_KWARGS = dict(
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_experts=8,
    num_experts_per_tok=2,
    decoder_sparse_step=1,
    norm_topk_prob=True,
    max_position_embeddings=1024,
    # Larger than the default 0.02 so the random logits are peaked enough for greedy
    # decoding to be well away from ties.
    initializer_range=0.2,
    tie_word_embeddings=False,
)


def build_tiny_moe(out: str | Path, seed: int = 0) -> Path:
    """Write the tiny Qwen3-MoE checkpoint into `out` (created if needed) and return its path."""
    from transformers import GenerationConfig, Qwen3MoeConfig, Qwen3MoeForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    save_tokenizer(tokenizer, out, CONFIG_KWARGS["max_position_embeddings"])
    config = Qwen3MoeConfig(vocab_size=tokenizer.get_vocab_size(), bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                            pad_token_id=PAD_ID, **CONFIG_KWARGS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3MoeForCausalLM(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    model.save_pretrained(out, safe_serialization=True)
    return out
