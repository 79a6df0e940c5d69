"""Which checkpoint a benchmark runs on when none is named, and building it when it is not on disk.

DeepSeek-V4: the trained demo model (models/demo-v4) when it has been built, else the tiny
random checkpoint of inference/tiny_checkpoint.py. Qwen3-MoE: a random checkpoint sized for
timing (about 110M parameters, 8 layers of 32 experts, 4 active), large enough that the model's
arithmetic, not Python overhead, dominates a step on a CPU; the toy checkpoints the tests use
(hidden size 64) measure mostly overhead. Built checkpoints go to a temporary folder that the
caller removes.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from .machine import ROOT

FAMILIES = ("deepseek_v4", "qwen3_moe")
DEMO_V4 = ROOT / "models" / "demo-v4"

QWEN3_MOE_TIMING = dict(
    hidden_size=512,
    intermediate_size=1024,
    moe_intermediate_size=256,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=64,
    num_experts=32,
    num_experts_per_tok=4,
    norm_topk_prob=True,
    max_position_embeddings=2048,  # the full workload needs 1024 + 256 tokens
)
"""The timing-sized Qwen3-MoE (Qwen3-30B-A3B: hidden 2048, 48 layers, 128 experts, 8 active)."""

QWEN3_MOE_TOY = dict(
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_experts=8,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    max_position_embeddings=1024,
)
"""A toy Qwen3-MoE for checking the harness in seconds (tests)."""


def family_of(path: Path) -> str:
    """The model_type in the checkpoint's config.json."""
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{path} has no config.json: pass the folder of a Hugging Face checkpoint")
    return json.loads(config.read_text()).get("model_type", "unknown")


def default_checkpoint(family: str, workdir: Path) -> tuple[Path, str]:
    """(folder, how it was chosen) of `family`'s default checkpoint, built in `workdir` if needed."""
    if family == "deepseek_v4":
        if (DEMO_V4 / "config.json").is_file():
            return DEMO_V4, "models/demo-v4"
        from inference.tiny_checkpoint import build_tiny_checkpoint

        return build_tiny_checkpoint(
            workdir / "tiny-v4", seed=0
        ), "tiny DeepSeek-V4 (inference.tiny_checkpoint)"
    if family == "qwen3_moe":
        path = build_qwen3_moe_checkpoint(workdir / "qwen3-moe-timing", QWEN3_MOE_TIMING)
        return path, "random Qwen3-MoE, timing size (bench.checkpoints.QWEN3_MOE_TIMING)"
    raise ValueError(f"unknown family {family!r}: choose one of {', '.join(FAMILIES)}")


def build_qwen3_moe_checkpoint(out: Path, sizes: dict, seed: int = 0) -> Path:
    """A random-weight Qwen3-MoE checkpoint of `sizes` in `out`, with the tiny checkpoints' tokenizer."""
    import torch
    from transformers import GenerationConfig, Qwen3MoeConfig, Qwen3MoeForCausalLM

    from inference.tiny_checkpoint import BOS, EOS, PAD, SPECIAL_TOKENS, build_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save(str(out / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "additional_special_tokens": SPECIAL_TOKENS[3:],
        "add_bos_token": True,
        "model_max_length": sizes["max_position_embeddings"],
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    ids = {name: tokenizer.token_to_id(token) for name, token in (("bos", BOS), ("eos", EOS), ("pad", PAD))}
    config = Qwen3MoeConfig(
        vocab_size=tokenizer.get_vocab_size(),
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
        tie_word_embeddings=False,
        **sizes,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3MoeForCausalLM(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"]
    )
    model.save_pretrained(out, safe_serialization=True)
    return out


def temporary_workdir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="citadel-bench-")
