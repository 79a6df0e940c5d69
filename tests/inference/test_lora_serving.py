"""Serving PEFT LoRA adapters, checked against PEFT over transformers on the same weights.

Adapters are made by PEFT itself (`get_peft_model` + `save_pretrained`) with random A and B
(init_lora_weights=False, so every adapted layer really changes the output), on the tiny
DeepSeek-V4 (every adaptable projection: attention, compressors, indexer, shared expert) and on
a tiny Qwen3-MoE (attention and the dense MLP).
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from inference import LLM, LoRARequest, SamplingParams
from inference.lora import AdapterError

from .test_qwen3_moe_model import build_qwen3_moe_checkpoint

V4_TARGETS = [
    "q_a_proj",
    "q_b_proj",
    "kv_proj",
    "o_b_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "weights_proj",
]
QWEN_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]  # PEFT turns MLP names into expert parameters
PROMPTS = [
    "The keepers opened the gates of the citadel every morning.",
    "Hello",
    "What is two plus two? Four, and three plus three is six.",
]


pytestmark = pytest.mark.usefixtures("single_threaded_torch")


def make_adapter(base: Path, out: Path, targets: list[str], seed: int, rank: int = 4, **extra) -> Path:
    """A PEFT LoRA adapter with random A and B for the checkpoint in `base`, saved in `out`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, use_safetensors=True)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False, **extra)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # B starts at a small scale even when not zero: make the update matter
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(20)
    peft_model.save_pretrained(out)
    return out


def peft_reference(base: Path, adapter: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, use_safetensors=True)
    return PeftModel.from_pretrained(model, adapter).eval()


def reference_logprobs(model, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([token_ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def max_prompt_logprob_error(output, reference) -> float:
    expected = reference_logprobs(reference, output.prompt_token_ids)
    return max(
        abs(output.prompt_logprobs[p][t] - expected[p - 1, t].item())
        for p, t in enumerate(output.prompt_token_ids)
        if p
    )


SCORE = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def v4_adapters(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("v4-adapters")
    return [make_adapter(tiny_checkpoint, root / f"a{i}", V4_TARGETS, seed=i) for i in range(3)]


@pytest.fixture(scope="module")
def v4_llm(tiny_checkpoint):
    llm = LLM(tiny_checkpoint, device="cpu", dtype="float32", max_loras=2)
    yield llm
    llm.close()


def test_v4_adapter_prompt_logprobs_match_peft_within_1e_3(tiny_checkpoint, v4_adapters, v4_llm):
    reference = peft_reference(tiny_checkpoint, v4_adapters[0])
    outputs = v4_llm.generate(PROMPTS, SCORE, lora_request=LoRARequest("a0", v4_adapters[0]))
    errors = [max_prompt_logprob_error(out, reference) for out in outputs]
    assert max(errors) <= 1e-3, errors
    # and the adapter really changes the model: the base model's logprobs are far from these
    base = v4_llm.generate(PROMPTS[:1], SCORE)[0]
    assert max_prompt_logprob_error(base, reference) > 1e-2


def test_v4_greedy_output_with_an_adapter_equals_peft_generate(tiny_checkpoint, v4_adapters, v4_llm):
    reference = peft_reference(tiny_checkpoint, v4_adapters[1])
    out = v4_llm.generate(PROMPTS[0], GREEDY, lora_request=LoRARequest("a1", v4_adapters[1]))[0]
    with torch.no_grad():
        ids = torch.tensor([out.prompt_token_ids])
        expected = reference.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=12,
            min_new_tokens=12,
            do_sample=False,
        )[0, ids.shape[1] :]
    assert out.token_ids == expected.tolist()


def test_requests_for_different_adapters_and_the_base_batch_together_as_they_run_alone(v4_adapters, v4_llm):
    requests = [
        None,
        LoRARequest("a0", v4_adapters[0]),
        LoRARequest("a1", v4_adapters[1]),
        None,
        LoRARequest("a0", v4_adapters[0]),
    ]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(requests))]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=1)
    together = v4_llm.generate(prompts, params, lora_request=requests)
    batch_sizes = v4_llm.stats()["batch_sizes"]
    assert max(batch_sizes) >= len(requests)  # they did share steps
    for prompt, request, batched in zip(prompts, requests, together, strict=True):
        alone = v4_llm.generate(prompt, params, lora_request=request)[0]
        assert batched.token_ids == alone.token_ids
        for a, b in zip(batched.logprobs, alone.logprobs, strict=True):
            assert a.keys() == b.keys() and all(abs(a[t] - b[t]) < 1e-4 for t in a)
    # different adapters give different answers (so the rows did not get each other's updates)
    assert len({tuple(out.token_ids) for out in together[:3]}) == 3


def test_more_adapters_than_places_are_loaded_and_evicted_on_demand(tiny_checkpoint, v4_adapters):
    llm = LLM(tiny_checkpoint, device="cpu", dtype="float32", max_loras=1)
    try:
        requests = [LoRARequest(f"a{i % 3}", v4_adapters[i % 3]) for i in range(6)] + [None]
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(requests))]
        together = llm.generate(prompts, GREEDY, lora_request=requests)
        stats = llm.stats()
        assert stats["loras_loaded"] == 1 and stats["lora_evictions"] >= 2 and stats["lora_loads"] >= 3
        for prompt, request, out in zip(prompts, requests, together, strict=True):
            assert out.token_ids == llm.generate(prompt, GREEDY, lora_request=request)[0].token_ids
    finally:
        llm.close()


def test_a_streamed_request_with_an_adapter_gives_the_same_text_as_generate(v4_adapters, v4_llm):
    request = LoRARequest("a2", v4_adapters[2])
    events = list(v4_llm.stream(PROMPTS[1], GREEDY, lora_request=request))
    assert (
        "".join(e.text for e in events) == v4_llm.generate(PROMPTS[1], GREEDY, lora_request=request)[0].text
    )


def test_a_qwen3_moe_adapter_matches_peft_within_1e_3(tiny_checkpoint, tmp_path):
    base = build_qwen3_moe_checkpoint(tmp_path / "qwen", tiny_checkpoint)
    adapter = make_adapter(base, tmp_path / "adapter", QWEN_TARGETS, seed=5)
    reference = peft_reference(base, adapter)
    llm = LLM(base, device="cpu", dtype="float32")
    try:
        outputs = llm.generate(PROMPTS, SCORE, lora_request=LoRARequest("qwen-adapter", adapter))
        errors = [max_prompt_logprob_error(out, reference) for out in outputs]
        assert max(errors) <= 1e-3, errors
    finally:
        llm.close()


# -- bad adapters: a clear error for the request, and the engine serves on -------------------------


def _copy(adapter: Path, folder: Path) -> Path:
    shutil.copytree(adapter, folder)
    return folder


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _edit_weights(folder: Path, edit) -> None:
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def _first_key(tensors: dict, part: str) -> str:
    return next(k for k in sorted(tensors) if part in k)


BAD_ADAPTERS = {
    "no folder": (lambda f: shutil.rmtree(f), "is not a folder"),
    "pickle only": (lambda f: (f / "adapter_model.safetensors").rename(f / "adapter_model.bin"), "pickle"),
    "not LoRA": (lambda f: _edit_config(f, peft_type="IA3"), "peft_type"),
    "DoRA": (lambda f: _edit_config(f, use_dora=True), "DoRA"),
    "biases": (lambda f: _edit_config(f, bias="all"), "bias"),
    "bad alpha": (lambda f: _edit_config(f, lora_alpha="big"), "lora_alpha"),
    "corrupt weights": (lambda f: (f / "adapter_model.safetensors").write_bytes(b"\x00" * 64), "safetensors"),
    "other model's shapes": (
        lambda f: _edit_weights(f, lambda t: t.update({_first_key(t, "lora_A"): torch.zeros(4, 7)})),
        "different base model",
    ),
    "unservable module": (
        lambda f: _edit_weights(
            f,
            lambda t: t.update(
                {
                    "base_model.model.model.layers.0.self_attn.o_a_proj.lora_A.weight": torch.zeros(4, 8),
                    "base_model.model.model.layers.0.self_attn.o_a_proj.lora_B.weight": torch.zeros(8, 4),
                }
            ),
        ),
        "o_a_proj",
    ),
    "NaN": (
        lambda f: _edit_weights(f, lambda t: t[_first_key(t, "lora_B")].fill_(float("nan"))),
        "non-finite",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_ADAPTERS))
def test_a_bad_adapter_is_refused_with_an_error_naming_the_problem(case, v4_adapters, v4_llm, tmp_path):
    breaker, expected = BAD_ADAPTERS[case]
    folder = _copy(v4_adapters[0], tmp_path / "bad")
    breaker(folder)
    with pytest.raises(AdapterError, match=expected):
        v4_llm.generate(PROMPTS[1], GREEDY, lora_request=LoRARequest("bad", folder))
    assert v4_llm.generate(PROMPTS[1], GREEDY)[0].finish_reason == "length"  # the engine serves on


def test_an_adapter_on_routed_experts_is_refused_with_what_is_served(tiny_checkpoint, tmp_path):
    """PEFT adapts Qwen3-MoE's stacked experts as raw parameters when asked for the MLP names."""
    base = build_qwen3_moe_checkpoint(tmp_path / "qwen", tiny_checkpoint)
    adapter = make_adapter(
        base, tmp_path / "adapter", ["q_proj", "gate_proj", "up_proj", "down_proj"], seed=1
    )
    llm = LLM(base, device="cpu", dtype="float32")
    try:
        with pytest.raises(AdapterError, match="routed experts"):
            llm.generate(PROMPTS[1], GREEDY, lora_request=LoRARequest("experts", adapter))
    finally:
        llm.close()


def make_token_adapter(base: Path, out: Path, token_ids: list[int], heads: list[str], seed: int) -> Path:
    """An adapter that also trains the rows of `token_ids` in the embedding (and untied head): PEFT's
    trainable_token_indices, with rows set to random values so that they change the output."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, use_safetensors=True)
    indices = {name: token_ids for name in heads}
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "q_a_proj"],
        init_lora_weights=False,
        trainable_token_indices=indices,
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "trainable_tokens_delta" in name:
                param.copy_(torch.randn_like(param) * 2)
    peft_model.save_pretrained(out)
    return out


@pytest.mark.parametrize("family", ["deepseek_v4", "qwen3_moe tied"])
def test_an_adapter_with_trained_token_rows_matches_peft(family, tiny_checkpoint, v4_llm, tmp_path):
    if family == "deepseek_v4":
        base, llm, heads = tiny_checkpoint, v4_llm, ["embed_tokens", "lm_head"]
    else:
        base = build_qwen3_moe_checkpoint(tmp_path / "qwen", tiny_checkpoint, tie_word_embeddings=True)
        llm, heads = LLM(base, device="cpu", dtype="float32"), ["embed_tokens"]
    try:
        prompt_ids = llm.generate(PROMPTS[0], SCORE)[0].prompt_token_ids
        tokens = sorted(set(prompt_ids[1:6]))  # tokens the prompt feeds and predicts
        adapter = make_token_adapter(base, tmp_path / "tokens", tokens, heads, seed=3)
        reference = peft_reference(base, adapter)
        request = LoRARequest("tokens", adapter)
        outputs = llm.generate([PROMPTS[0], PROMPTS[0]], SCORE, lora_request=[request, None])
        assert max_prompt_logprob_error(outputs[0], reference) <= 1e-3
        assert max_prompt_logprob_error(outputs[1], reference) > 1e-2  # the base row in the same batch
    finally:
        if llm is not v4_llm:
            llm.close()
