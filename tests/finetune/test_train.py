"""train(): a short run on each supported family lowers the loss and leaves a PEFT adapter that loads.

Tiny runs (16 conversations, a dozen steps, one thread): a few seconds each.
"""

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from finetune import ConfigError, TrainConfig, TrainResult, train

QUICK = {"rank": 4, "alpha": 8, "learning_rate": 1e-2, "epochs": 3, "batch_size": 4, "max_seq_len": 128,
         "checkpoint_every": 4, "eval_every": 6}


def run(model, train_file, out, events=None, **overrides) -> TrainResult:
    events = [] if events is None else events
    return train(base_model=model, train_file=train_file, validation_file=train_file, output_dir=out,
                 config=TrainConfig.from_dict({**QUICK, **overrides}), on_event=events.append, device="cpu")


def assert_loadable_adapter(model_path, adapter_dir):
    files = sorted(p.name for p in adapter_dir.iterdir())
    assert "adapter_config.json" in files and "adapter_model.safetensors" in files
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    ids = torch.tensor([[0, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        before = base(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(base, adapter_dir).eval()
        after = adapted(input_ids=ids).logits
    assert not torch.allclose(before, after), "the adapter changes nothing"


def test_a_short_demo_v4_run_lowers_the_loss_and_writes_a_loadable_adapter(demo, small_train, tmp_path):
    events = []
    result = run(demo, small_train, tmp_path / "out", events, trainable_tokens="new")
    assert not result.cancelled and result.steps == result.total_steps == 12
    metrics = [e for e in events if e["type"] == "metrics"]
    evals = [e for e in events if e["type"] == "eval"]
    assert [m["step"] for m in metrics] == list(range(1, 13))
    assert set(metrics[0]) == {"type", "step", "total_steps", "epoch", "loss", "learning_rate",
                               "tokens_per_second", "eta_seconds"}
    assert result.train_loss < metrics[0]["loss"] / 2
    assert [e["step"] for e in evals] == [6, 12] and evals[-1]["valid_loss"] < evals[0]["valid_loss"]
    assert [e["step"] for e in events if e["type"] == "checkpoint"] == [4, 8]
    json.dumps(events)
    assert_loadable_adapter(demo, tmp_path / "out" / "adapter")
    assert result.adapter_dir == str(tmp_path / "out" / "adapter")


def test_a_short_qwen3_moe_run_with_routed_experts_lowers_the_loss_and_loads(qwen, small_train, tmp_path):
    events = []
    result = run(qwen, small_train, tmp_path / "out", events, target_modules="attention+experts")
    first = next(e for e in events if e["type"] == "metrics")
    assert result.train_loss < first["loss"]
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert set(config["target_parameters"]) == {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"}
    assert_loadable_adapter(qwen, tmp_path / "out" / "adapter")


def test_shared_experts_on_a_family_without_them_is_refused_before_loading(qwen, small_train, tmp_path):
    with pytest.raises(ConfigError) as caught:
        run(qwen, small_train, tmp_path / "out", target_modules="attention+shared_experts")
    assert caught.value.field == "target_modules" and "no shared experts" in caught.value.message


def test_an_explicit_module_that_does_not_exist_is_named(demo, small_train, tmp_path):
    with pytest.raises(ConfigError) as caught:
        run(demo, small_train, tmp_path / "out", target_modules=["q_proj"])
    assert "'q_proj' matches no module" in caught.value.message
    with pytest.raises(ConfigError) as caught:
        run(demo, small_train, tmp_path / "out", target_modules=["o_a_proj"])
    assert "grouped projection" in caught.value.message


def test_a_file_with_bad_lines_is_refused_with_the_first_line_named(demo, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\n')
    with pytest.raises(ConfigError) as caught:
        run(demo, bad, tmp_path / "out")
    assert caught.value.field == "train_file" and "line 1" in caught.value.message
