"""Citadel's native Qwen3-MoE against transformers' `Qwen3MoeForCausalLM` on the same random weights.

The checkpoints are tiny and random (hidden 64, 8 experts, one dense layer), written by
transformers' own save_pretrained, with the tokenizer of the tiny DeepSeek-V4 checkpoint.
`build_qwen3_moe_checkpoint` is shared with the engine tests (tests/inference/test_engine_*.py).
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from inference import LLM, SamplingParams
from inference.engine.weights import CheckpointError
from inference.models import UnsupportedModelError

TINY_CONFIG = dict(
    vocab_size=640,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    mlp_only_layers=[1],  # one dense MLP layer between two MoE layers
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_experts=8,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    max_position_embeddings=512,
    initializer_range=0.1,  # logits spread enough that greedy choices are never near-ties
    bos_token_id=0,
    eos_token_id=1,
)
PROMPTS = [
    "The old citadel stood on a hill above the river, and every morning the keepers opened its gates.",
    "Hello",
    "What is two plus two?",
]


def build_qwen3_moe_checkpoint(folder: Path, tokenizer_from: Path, seed: int = 0, **overrides) -> Path:
    """A random tiny Qwen3-MoE checkpoint in `folder` (norm weights random too, so none can be forgotten)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**{**TINY_CONFIG, **overrides})).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.copy_(1 + 0.2 * torch.randn_like(parameter))
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_from / name, folder / name)
    return folder


def reference(folder: Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True).eval()


def assert_prompt_logprobs_match(llm, hf_model, prompts, tolerance):
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2))
    for out in outputs:
        with torch.no_grad():
            logits = hf_model(torch.tensor([out.prompt_token_ids])).logits[0].float()
        expected = torch.log_softmax(logits, dim=-1)
        got = [out.prompt_logprobs[p][t] for p, t in enumerate(out.prompt_token_ids) if p]
        want = [expected[p - 1, t].item() for p, t in enumerate(out.prompt_token_ids) if p]
        assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= tolerance


pytestmark = pytest.mark.usefixtures("single_threaded_torch")


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint, tmp_path_factory):
    return build_qwen3_moe_checkpoint(tmp_path_factory.mktemp("qwen3-moe"), tiny_checkpoint)


@pytest.fixture(scope="module")
def llm(checkpoint):
    engine = LLM(checkpoint, device="cpu", dtype="float32")
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def hf_model(checkpoint):
    return reference(checkpoint)


def test_a_qwen3_moe_checkpoint_runs_on_the_native_engine(llm):
    assert llm.stats()["backend"] == "citadel"


def test_prompt_logprobs_match_transformers_within_1e_3(llm, hf_model):
    assert_prompt_logprobs_match(llm, hf_model, PROMPTS, 1e-3)


def test_greedy_output_is_token_identical_to_transformers_generate(llm, hf_model):
    params = SamplingParams(temperature=0, max_tokens=12)  # both stop at eos (min_new_tokens would mask it)
    for out in llm.generate(PROMPTS, params):
        prompt = torch.tensor([out.prompt_token_ids])
        with torch.no_grad():
            expected = hf_model.generate(prompt, do_sample=False, max_new_tokens=12)
        assert out.token_ids == expected[0, prompt.shape[1] :].tolist()


def test_stacked_expert_tensors_load_the_same_model_as_per_expert_tensors(checkpoint, llm, tmp_path):
    folder = tmp_path / "stacked"
    shutil.copytree(checkpoint, folder)
    tensors = load_file(folder / "model.safetensors")
    for layer in range(TINY_CONFIG["num_hidden_layers"]):
        prefix = f"model.layers.{layer}.mlp.experts"
        if f"{prefix}.0.gate_proj.weight" not in tensors:
            continue
        experts = range(TINY_CONFIG["num_experts"])
        gate_up = [
            torch.cat(
                (tensors.pop(f"{prefix}.{e}.gate_proj.weight"), tensors.pop(f"{prefix}.{e}.up_proj.weight"))
            )
            for e in experts
        ]
        tensors[f"{prefix}.gate_up_proj"] = torch.stack(gate_up)
        tensors[f"{prefix}.down_proj"] = torch.stack(
            [tensors.pop(f"{prefix}.{e}.down_proj.weight") for e in experts]
        )
    save_file(tensors, folder / "model.safetensors")
    stacked = LLM(folder, device="cpu", dtype="float32")
    params = SamplingParams(temperature=0, max_tokens=6, prompt_logprobs=0, ignore_eos=True)
    a, b = stacked.generate(PROMPTS[0], params)[0], llm.generate(PROMPTS[0], params)[0]
    stacked.close()
    assert a.token_ids == b.token_ids
    for left, right in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:], strict=True):
        assert list(left) == list(right)
        assert list(left.values()) == pytest.approx(list(right.values()), abs=1e-5)


@pytest.mark.parametrize(
    "overrides",
    [dict(tie_word_embeddings=True), dict(use_sliding_window=True, sliding_window=6, attention_bias=True)],
    ids=["tied embeddings", "sliding window and attention bias"],
)
def test_config_variants_match_transformers(tiny_checkpoint, tmp_path, overrides):
    folder = build_qwen3_moe_checkpoint(tmp_path / "variant", tiny_checkpoint, seed=1, **overrides)
    hf_model = reference(folder)
    llm = LLM(folder, device="cpu", dtype="float32", max_num_batched_tokens=16)  # chunks cross the window
    try:
        assert_prompt_logprobs_match(llm, hf_model, PROMPTS[:1], 1e-3)
        out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=8))[0]
    finally:
        llm.close()
    prompt = torch.tensor([out.prompt_token_ids])
    with torch.no_grad():
        expected = hf_model.generate(prompt, do_sample=False, max_new_tokens=8)
    assert out.token_ids == expected[0, prompt.shape[1] :].tolist()


def test_bfloat16_weights_give_logprobs_close_to_transformers_in_bfloat16(checkpoint):
    llm = LLM(checkpoint, device="cpu", dtype="bfloat16")
    try:
        assert llm.dtype == torch.bfloat16
        assert_prompt_logprobs_match(llm, reference(checkpoint, torch.bfloat16), PROMPTS[:1], 0.05)
    finally:
        llm.close()


# -- bad checkpoints -------------------------------------------------------------------------------


def _edit_weights(checkpoint: Path, folder: Path, edit) -> Path:
    shutil.copytree(checkpoint, folder)
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")
    return folder


def test_a_missing_tensor_raises_an_error_naming_it(checkpoint, tmp_path):
    folder = _edit_weights(
        checkpoint, tmp_path / "missing", lambda t: t.pop("model.layers.0.self_attn.q_norm.weight")
    )
    with pytest.raises(CheckpointError, match=r"no tensor 'model\.layers\.0\.self_attn\.q_norm\.weight'"):
        LLM(folder, device="cpu")


def test_an_unexpected_tensor_raises_an_error_naming_it(checkpoint, tmp_path):
    folder = _edit_weights(
        checkpoint, tmp_path / "extra", lambda t: t.update({"model.extra.weight": torch.zeros(2)})
    )
    with pytest.raises(CheckpointError, match=r"does not use.*model\.extra\.weight"):
        LLM(folder, device="cpu")


def test_a_tensor_of_the_wrong_shape_raises_an_error_naming_it(checkpoint, tmp_path):
    folder = _edit_weights(
        checkpoint, tmp_path / "shape", lambda t: t.update({"model.norm.weight": torch.ones(3)})
    )
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' has shape \(3,\)"):
        LLM(folder, device="cpu")


def test_a_corrupt_shard_raises_an_error_naming_the_file(checkpoint, tmp_path):
    folder = tmp_path / "corrupt"
    shutil.copytree(checkpoint, folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupt or truncated"):
        LLM(folder, device="cpu")


def test_a_shard_missing_from_a_sharded_checkpoint_raises_an_error_naming_it(checkpoint, tmp_path):
    folder = tmp_path / "sharded"
    shutil.copytree(checkpoint, folder)
    tensors = load_file(folder / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    (folder / "model.safetensors").unlink()
    save_file(
        {n: tensors[n] for n in shards["model-00001-of-00002.safetensors"]},
        folder / "model-00001-of-00002.safetensors",
    )
    index = {"metadata": {}, "weight_map": {n: shard for shard, ns in shards.items() for n in ns}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"lacks: model-00002-of-00002\.safetensors"):
        LLM(folder, device="cpu")


def test_an_unknown_architecture_is_refused_with_the_supported_list(checkpoint, tmp_path):
    folder = tmp_path / "llama"
    shutil.copytree(checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=r"'llama' \(LlamaForCausalLM\).*deepseek_v4, qwen3_moe"):
        LLM(folder, device="cpu")
