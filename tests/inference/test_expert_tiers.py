"""Expert tiers (inference/engine/expert_store.py): tiered serving equals all-resident serving.

With a fast tier of a few routed experts per layer (so experts move at every step), some in
host memory and the rest read from the checkpoint on disk, the engine must give the same
greedy tokens and log-probabilities (within 1e-4 at float32) as with every expert resident, on
the trained demo-v4, on tiny random DeepSeek-V4 and Qwen3-MoE configurations, and with FP8
experts (which stay FP8 in every tier). Bad budgets are refused naming the setting.
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from inference import LLM, SamplingParams
from inference.engine.expert_store import AgingLFU, ExpertBudgetError
from inference.lora import LoRARequest

from .conftest import build_second_v4_checkpoint
from .test_lora_serving import V4_TARGETS, make_adapter
from .test_qwen3_moe_model import build_qwen3_moe_checkpoint

DEMO = Path(__file__).resolve().parents[2] / "models" / "demo-v4"
PROMPTS = [
    "Convert 3 kilometres to metres.",
    "The old citadel stood on a hill above the river, and every morning the keepers opened its gates.",
    "Hello",
]
GREEDY = SamplingParams(temperature=0, max_tokens=12, logprobs=2, prompt_logprobs=1, ignore_eos=True)
TOLERANCE = 1e-4


pytestmark = pytest.mark.usefixtures("single_threaded_torch")


def generate(folder, prompts=PROMPTS, **settings):
    llm = LLM(folder, device="cpu", dtype="float32", **settings)
    try:
        return llm.generate(prompts, GREEDY), llm.stats()
    finally:
        llm.close()


def assert_same_outputs(expected, got):
    for a, b in zip(expected, got, strict=True):
        assert a.token_ids == b.token_ids
        for step, token in enumerate(a.token_ids):
            assert abs(a.logprobs[step][token] - b.logprobs[step][token]) <= TOLERANCE
        for position, token in enumerate(a.prompt_token_ids):
            if position:
                assert abs(a.prompt_logprobs[position][token] - b.prompt_logprobs[position][token]) <= TOLERANCE


def assert_every_tier_used(stats):
    assert stats["expert_misses"] > 0 and stats["expert_hits"] > 0
    assert stats["expert_host_hits"] > 0, "no fast-tier miss was served from host memory"
    assert stats["expert_host_misses"] > 0 and stats["expert_disk_bytes_read"] > 0, "nothing was read from disk"
    assert stats["expert_bytes_transferred"] > 0


@pytest.fixture(scope="module")
def demo_resident():
    return generate(DEMO)[0]


def test_demo_v4_with_two_of_eight_experts_resident_gives_the_all_resident_tokens_and_logprobs(demo_resident):
    outputs, stats = generate(DEMO, expert_cache_experts=2, expert_host_experts=3)
    assert_same_outputs(demo_resident, outputs)
    assert_every_tier_used(stats)
    assert stats["expert_fast_experts_per_layer"] == 2
    for layer in range(4):  # demo-v4's four MoE layers each count their own hits and misses
        assert stats[f"expert_l{layer}_hits"] + stats[f"expert_l{layer}_misses"] > 0
    assert stats["expert_hits"] == sum(stats[f"expert_l{i}_hits"] for i in range(4))
    assert stats["expert_prefetch_hits"] > 0  # the hash-routed layers are predicted exactly
    one_expert = stats["expert_resident_bytes"] // (4 * 2)
    assert one_expert == 3 * 128 * 128 * 4  # w1, w2, w3 of 128 x 128 in float32, per slot


def test_demo_v4_without_prefetch_and_with_every_expert_in_host_memory_is_exact_and_reads_no_disk(demo_resident):
    outputs, stats = generate(DEMO, expert_cache_experts=3, expert_prefetch=False)
    assert_same_outputs(demo_resident, outputs)
    assert stats["expert_misses"] > 0 and stats["expert_prefetch_hits"] == 0
    assert stats["expert_host_misses"] == 0 and stats["expert_disk_bytes_read"] == 0
    assert stats["expert_host_bytes"] == 4 * 8 * 3 * 128 * 128 * 4


def test_the_tiny_v4_served_from_one_expert_slot_per_layer_is_exact(tiny_checkpoint):
    expected = generate(tiny_checkpoint)[0]
    outputs, stats = generate(tiny_checkpoint, expert_cache_experts=1, expert_host_experts=2)
    assert_same_outputs(expected, outputs)  # fewer slots than experts per token: experts go through in turns
    assert_every_tier_used(stats)


def test_without_a_host_tier_every_miss_is_read_from_disk_and_outputs_stay_exact(tiny_checkpoint):
    expected = generate(tiny_checkpoint)[0]
    outputs, stats = generate(tiny_checkpoint, expert_cache_experts=2, expert_host_experts=0)
    assert_same_outputs(expected, outputs)
    assert stats["expert_host_hits"] == 0 and stats["expert_host_bytes"] == 0
    assert stats["expert_disk_bytes_read"] == stats["expert_bytes_transferred"] > 0


def test_a_lora_adapter_serves_the_same_over_tiered_experts(tiny_checkpoint, tmp_path):
    adapter = LoRARequest("a", make_adapter(tiny_checkpoint, tmp_path / "adapter", V4_TARGETS, seed=3))
    results = []
    for settings in ({}, {"expert_cache_experts": 2, "expert_host_experts": 4}):
        llm = LLM(tiny_checkpoint, device="cpu", dtype="float32", **settings)
        try:
            results.append(llm.generate(PROMPTS, GREEDY, lora_request=adapter))
        finally:
            llm.close()
    assert_same_outputs(*results)


def test_a_second_v4_shape_with_three_experts_per_token_and_two_slots_is_exact(tiny_checkpoint, tmp_path):
    folder = build_second_v4_checkpoint(tmp_path / "v4", tiny_checkpoint)
    prompts = [[0, 5, 9, 33, 70, 12, 4], [0, 40, 41, 42], [0, 90, 3, 3, 17, 58, 60, 61, 22]]
    expected = generate(folder, prompts)[0]
    outputs, stats = generate(folder, prompts, expert_cache_experts=2, expert_host_experts=2)
    assert_same_outputs(expected, outputs)
    assert_every_tier_used(stats)


@pytest.mark.parametrize("layout", ["stacked", "one tensor per expert"])
def test_qwen3_moe_with_tiered_experts_is_exact_in_either_checkpoint_layout(tiny_checkpoint, tmp_path, layout):
    folder = build_qwen3_moe_checkpoint(tmp_path / "qwen", tiny_checkpoint)
    if layout != "stacked":
        unstack_experts(folder / "model.safetensors")
    expected = generate(folder)[0]
    outputs, stats = generate(folder, expert_cache_experts=2, expert_host_experts=2)
    assert_same_outputs(expected, outputs)
    assert_every_tier_used(stats)
    assert {"expert_l0_hits", "expert_l2_hits"} <= set(stats) and "expert_l1_hits" not in stats  # layer 1 is dense


def unstack_experts(path: Path) -> None:
    """Rewrite stacked Qwen3-MoE experts as the Hub's one tensor per expert (gate_proj, up_proj, down_proj)."""
    tensors = load_file(path)
    for name in [n for n in tensors if n.endswith("experts.gate_up_proj")]:
        prefix = name.removesuffix(".gate_up_proj")
        gate_up, down = tensors.pop(name), tensors.pop(f"{prefix}.down_proj")
        for e in range(gate_up.shape[0]):
            gate, up = gate_up[e].chunk(2)
            tensors[f"{prefix}.{e}.gate_proj.weight"] = gate.contiguous()
            tensors[f"{prefix}.{e}.up_proj.weight"] = up.contiguous()
            tensors[f"{prefix}.{e}.down_proj.weight"] = down[e].contiguous()
    assert any(".experts.0.gate_proj" in n for n in tensors), "the checkpoint had no stacked experts"
    save_file(tensors, path)


def test_fp8_experts_stay_fp8_in_every_tier_and_serve_what_all_resident_fp8_serves():
    expected = generate(DEMO, quantization="fp8")[0]
    llm = LLM(DEMO, device="cpu", dtype="float32", quantization="fp8", expert_cache_experts=2, expert_host_experts=3)
    try:
        outputs, stats = llm.generate(PROMPTS, GREEDY), llm.stats()
        store = llm._loop.engine.runner.model.expert_store
        layer = store.layers[2]
        slot_dtypes = {t.dtype for t in layer.slots[0].tensors.values()}
        host_dtypes = {t.dtype for tensors in layer.host.values() for t in tensors.values()}
        disk_dtypes = {t.dtype for t in layer.source.read(7).values()}
    finally:
        llm.close()
    assert_same_outputs(expected, outputs)
    assert_every_tier_used(stats)
    for dtypes in (slot_dtypes, host_dtypes, disk_dtypes):
        assert dtypes == {torch.float8_e4m3fn, torch.float32}  # values, and their 128x128 block scales
    assert stats["expert_resident_bytes"] == 4 * 2 * 3 * (128 * 128 + 4)


def test_a_byte_budget_holds_twice_as_many_fp8_experts_as_bf16_ones():
    bf16_expert = 3 * 128 * 128 * 2
    budget = int(3.5 * bf16_expert) * 4  # three and a half bf16 experts for each of the four MoE layers
    counts = {}
    for name, settings in (("bf16", {"dtype": "bfloat16"}), ("fp8", {"dtype": "bfloat16", "quantization": "fp8"})):
        llm = LLM(DEMO, device="cpu", expert_cache_bytes=budget, **settings)
        try:
            counts[name] = llm.stats()["expert_fast_experts_per_layer"]
        finally:
            llm.close()
    assert counts == {"bf16": 3, "fp8": 6}


def test_a_native_fp8_checkpoint_keeps_its_experts_fp8_when_tiered(tmp_path):
    from inference.quant.convert import quantize_checkpoint

    quantize_checkpoint(DEMO, tmp_path / "fp8")
    expected = generate(tmp_path / "fp8")[0]
    outputs, stats = generate(tmp_path / "fp8", expert_cache_experts=2, expert_host_experts=3)
    assert_same_outputs(expected, outputs)
    assert_every_tier_used(stats)
    assert stats["expert_resident_bytes"] == 4 * 2 * 3 * (128 * 128 + 4)


def test_replacement_keeps_an_often_used_expert_until_its_uses_fade():
    policy = AgingLFU(4)
    for _ in range(5):
        policy.touch([0])
    policy.touch([1])
    assert policy.victim([0, 1]) == 1  # used five times beats used once, even if once was later
    for _ in range(30):
        policy.touch([1, 2])
    assert policy.victim([0, 1]) == 0  # thirty uses of the layer later, the old favourite has aged out
    assert policy.victim([3, 2]) == 3  # never used goes first


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"expert_cache_experts": 0}, "expert_cache_experts must be a positive integer"),
        ({"expert_cache_experts": "2"}, "expert_cache_experts must be a positive integer"),
        ({"expert_cache_bytes": -1}, "expert_cache_bytes must be a positive integer"),
        ({"expert_cache_experts": 2, "expert_cache_bytes": 10**6}, "expert_cache_experts and expert_cache_bytes"),
        ({"expert_host_experts": 2}, "expert_host_experts needs a fast tier"),
        ({"expert_cache_experts": 2, "expert_host_experts": -1}, "expert_host_experts must be an integer >= 0"),
        ({"expert_cache_experts": 2, "expert_prefetch": "yes"}, "expert_prefetch must be true or false"),
    ],
)
def test_a_malformed_expert_budget_is_refused_naming_the_setting(settings, message):
    with pytest.raises(ValueError, match=message):
        LLM(DEMO, device="cpu", **settings)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"expert_cache_experts": 9}, r"expert_cache_experts=9 is more than the model's 8 routed experts"),
        ({"expert_cache_bytes": 1000}, r"expert_cache_bytes=1000 holds no expert: one expert is 196608 bytes"),
        ({"expert_cache_experts": 2, "expert_host_experts": 9}, r"expert_host_experts=9 is more than"),
    ],
)
def test_a_budget_this_model_cannot_use_is_refused_naming_the_setting(settings, message):
    with pytest.raises(ExpertBudgetError, match=message):
        LLM(DEMO, device="cpu", dtype="float32", **settings)
