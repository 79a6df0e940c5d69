"""Block-wise FP8 weights: the format, quantizing at load time, DeepSeek-format FP8 checkpoints, quality."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from bench.fp8 import engine_eval, eval_lines
from inference import LLM, SamplingParams
from inference.engine.weights import CheckpointError
from inference.models import UnsupportedModelError
from inference.quant import FP8_BLOCK, Fp8Linear, dequantize_blockwise, quantize_blockwise
from inference.quant.convert import quantize_checkpoint

from .test_qwen3_moe_model import build_qwen3_moe_checkpoint

DEMO = "models/demo-v4"


pytestmark = pytest.mark.usefixtures("single_threaded_torch")


def test_each_128x128_block_gets_one_scale_and_values_keep_e4m3_precision():
    torch.manual_seed(0)
    weight = torch.randn(300, 200) * torch.logspace(-3, 1, 200)  # columns of very different magnitude
    q, scale_inv = quantize_blockwise(weight)
    assert q.dtype == torch.float8_e4m3fn and q.shape == weight.shape
    assert scale_inv.shape == (3, 2) and scale_inv.dtype == torch.float32
    block = weight[:FP8_BLOCK, :FP8_BLOCK]
    assert scale_inv[0, 0] == pytest.approx(block.abs().max().item() / 448, rel=1e-6)
    restored = dequantize_blockwise(q, scale_inv)
    scales = scale_inv.repeat_interleave(FP8_BLOCK, 0)[:300].repeat_interleave(FP8_BLOCK, 1)[:, :200]
    # e4m3 keeps 3 mantissa bits: half a step is 1/16 of the value; values near zero are limited by the
    # smallest subnormal step (2^-9 of the block scale).
    assert ((restored - weight).abs() <= weight.abs() / 16 + scales * 2**-9 + 1e-12).all()


def test_fp8_values_and_their_scales_round_trip_exactly():
    q, scale_inv = quantize_blockwise(torch.randn(128, 256))
    again_q, again_scale = quantize_blockwise(dequantize_blockwise(q, scale_inv))
    assert torch.equal(again_q.float(), q.float()) and torch.equal(again_scale, scale_inv)


def test_a_scale_of_the_wrong_shape_is_refused_naming_both_shapes():
    q, _ = quantize_blockwise(torch.randn(130, 64))
    with pytest.raises(ValueError, match=r"\(1, 1\).*\(2, 1\)"):
        dequantize_blockwise(q, torch.ones(1, 1))


def test_an_fp8_linear_computes_what_its_dequantized_weight_computes():
    linear = torch.nn.Linear(200, 300, bias=False)
    layer = Fp8Linear.from_linear(linear)
    x = torch.randn(5, 200)
    assert torch.allclose(layer(x), x @ layer.dequantized_weight().T, atol=1e-5)
    assert (layer(x) - linear(x)).norm() / linear(x).norm() < 0.05


@pytest.fixture(scope="module")
def base_and_fp8():
    base = LLM(DEMO, device="cpu", dtype="float32")
    fp8 = LLM(DEMO, device="cpu", dtype="float32", quantization="fp8")
    yield base, fp8
    base.close()
    fp8.close()


def test_fp8_demo_v4_keeps_perplexity_within_1_percent_and_exact_match_within_1_point(base_and_fp8):
    base, fp8 = base_and_fp8
    families = eval_lines(__import__("pathlib").Path(DEMO), limit=None)  # every eval line
    before, after = engine_eval(base, families), engine_eval(fp8, families)
    ppl_delta = abs(after["all"]["answer_perplexity"] / before["all"]["answer_perplexity"] - 1)
    assert ppl_delta <= 0.01, (before["all"], after["all"])
    assert abs(after["all"]["exact_match"] - before["all"]["exact_match"]) <= 0.01
    quantized = [m for m in fp8._loop.engine.runner.model.modules() if isinstance(m, Fp8Linear)]
    assert len(quantized) > 50  # attention and every expert, not a token few


def test_a_deepseek_format_fp8_checkpoint_serves_exactly_what_quantizing_at_load_serves(
    base_and_fp8, tmp_path
):
    _, fp8 = base_and_fp8
    stats = quantize_checkpoint(DEMO, tmp_path / "fp8")
    assert stats["bytes_after"] < 0.45 * stats["bytes_before"]  # float32 -> FP8 for most bytes
    tensors = load_file(tmp_path / "fp8" / "model.safetensors")
    assert tensors["model.layers.0.attn.wq_a.weight"].dtype == torch.float8_e4m3fn
    assert "model.layers.0.attn.wq_a.weight_scale_inv" in tensors
    native = LLM(tmp_path / "fp8", device="cpu")
    try:
        params = SamplingParams(temperature=0, max_tokens=8, prompt_logprobs=1, ignore_eos=True)
        prompt = "Convert 3 kilometres to metres."
        a, b = native.generate(prompt, params)[0], fp8.generate(prompt, params)[0]
        assert a.token_ids == b.token_ids and a.prompt_logprobs == b.prompt_logprobs
    finally:
        native.close()


def test_an_unknown_quantization_is_refused_naming_the_setting():
    with pytest.raises(ValueError, match="quantization must be one of"):
        LLM(DEMO, device="cpu", quantization="int3")


def test_an_orphan_scale_tensor_is_refused_naming_it(tmp_path):
    folder = tmp_path / "orphan"
    shutil.copytree(DEMO, folder)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.attn.wq_a.weight_scale_inv"] = torch.ones(1, 1)  # its weight is not FP8
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(Exception, match="weight_scale_inv") as error:
        LLM(folder, device="cpu").generate("Hi", SamplingParams(max_tokens=1))
    assert isinstance(error.value, CheckpointError | RuntimeError)


def test_fp8_checkpoints_of_a_family_that_does_not_read_them_are_refused(tiny_checkpoint, tmp_path):
    folder = build_qwen3_moe_checkpoint(tmp_path / "qwen", tiny_checkpoint)
    tensors = load_file(folder / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj"
    tensors[f"{name}.weight"], tensors[f"{name}.weight_scale_inv"] = quantize_blockwise(
        tensors[f"{name}.weight"]
    )
    save_file(tensors, folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    with pytest.raises(Exception, match="quantization='fp8'") as error:
        LLM(folder, device="cpu").generate("Hi", SamplingParams(max_tokens=1))
    assert isinstance(error.value, UnsupportedModelError | RuntimeError), config["model_type"]


def test_a_qwen3_moe_model_quantized_at_load_stays_close_to_unquantized(tiny_checkpoint, tmp_path):
    folder = build_qwen3_moe_checkpoint(tmp_path / "qwen", tiny_checkpoint)
    base, fp8 = LLM(folder, device="cpu"), LLM(folder, device="cpu", quantization="fp8")
    try:
        params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
        prompt = "The keepers opened the gates of the citadel every morning."
        a, b = base.generate(prompt, params)[0], fp8.generate(prompt, params)[0]
        errors = [
            abs(a.prompt_logprobs[p][t] - b.prompt_logprobs[p][t])
            for p, t in enumerate(a.prompt_token_ids)
            if p
        ]
        assert 0 < max(errors) < 0.5  # quantized (not identical), and close
    finally:
        base.close()
        fp8.close()
