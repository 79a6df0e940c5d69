"""Fixtures for engine tests: loaded engines and transformers references over tiny checkpoints.

`tiny_checkpoint` (tests/conftest.py) is the tiny DeepSeek-V4; `second_v4_checkpoint` is another
random V4 with a different shape of every feature, so that no constant of the tiny one can hide.
"""

import shutil
from pathlib import Path

import pytest
import torch

from inference import LLM


@pytest.fixture(scope="session")
def llm(tiny_checkpoint) -> LLM:
    return LLM(model=tiny_checkpoint, device="cpu", dtype="float32", seed=0)


@pytest.fixture(scope="session")
def hf_model(tiny_checkpoint):
    """The same checkpoint loaded by plain transformers: the correctness oracle."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_checkpoint, use_safetensors=True).eval()


def build_second_v4_checkpoint(folder: Path, tokenizer_from: Path) -> Path:
    """A different random V4: HCA first, rates 2 / 4, window 6, 2 streams, 3 of 5 experts routed
    by sigmoid scores, tied embeddings, plain RoPE on the compressed branches, a 96-token vocabulary
    (the tiny checkpoint's tokenizer; prompts are token ids below 96)."""
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    config = DeepseekV4Config(
        vocab_size=96,
        hidden_size=32,
        moe_intermediate_size=16,
        num_hidden_layers=5,
        num_attention_heads=2,
        head_dim=16,
        partial_rotary_factor=0.25,
        q_lora_rank=24,
        o_groups=1,
        o_lora_rank=8,
        n_routed_experts=5,
        num_experts_per_tok=3,
        scoring_func="sigmoid",
        layer_types=[
            "heavily_compressed_attention",
            "compressed_sparse_attention",
            "sliding_attention",
            "compressed_sparse_attention",
            "heavily_compressed_attention",
        ],
        mlp_layer_types=["hash_moe", "moe", "moe", "hash_moe", "moe"],
        compress_rates={"compressed_sparse_attention": 2, "heavily_compressed_attention": 4},
        sliding_window=6,
        index_n_heads=2,
        index_head_dim=8,
        index_topk=3,
        hc_mult=2,
        hc_sinkhorn_iters=5,
        max_position_embeddings=512,
        initializer_range=0.3,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DeepseekV4ForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random values for what transformers initialises to constants
        for name, param in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("sinks", "position_bias", "base", "hc_base"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
            elif leaf in ("scale", "hc_scale") or ("norm" in name and leaf == "weight"):
                param.copy_(1 + torch.randn(param.shape, generator=generator) * 0.2)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.1)
            elif name.endswith("tid2eid"):
                rows = [torch.randperm(5, generator=generator)[:3] for _ in range(buffer.shape[0])]
                buffer.copy_(torch.stack(rows))
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_from / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def second_v4_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    return build_second_v4_checkpoint(tmp_path_factory.mktemp("v4-second"), tiny_checkpoint)


@pytest.fixture(scope="session")
def second_v4_hf_model(second_v4_checkpoint):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(second_v4_checkpoint, use_safetensors=True).eval()


@pytest.fixture
def two_threads():
    """torch on two intra-op threads for the test (the CI machine's count), as it was afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)
