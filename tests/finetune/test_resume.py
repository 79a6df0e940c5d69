"""Cancel, checkpoints and resume: a resumed run ends with the adapter an uninterrupted one writes."""

import json

import pytest
import torch
from safetensors.torch import load_file

from finetune import ConfigError, TrainConfig, train

CONFIG = {"rank": 4, "alpha": 8, "dropout": 0.1, "learning_rate": 5e-3, "epochs": 3, "batch_size": 4,
          "max_seq_len": 128, "checkpoint_every": 4, "eval_every": 0, "seed": 7}
FORBIDDEN_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


def run(model, train_file, out, stop_after=None, events=None, resume=True):
    events = [] if events is None else events

    def should_stop():
        return stop_after is not None and sum(e["type"] == "metrics" for e in events) >= stop_after

    return train(base_model=model, train_file=train_file, output_dir=out, config=TrainConfig.from_dict(CONFIG),
                 on_event=events.append, should_stop=should_stop, resume=resume, device="cpu")


def adapter_tensors(folder):
    return load_file(folder / "adapter_model.safetensors")


def test_should_stop_cancels_before_the_next_step_and_writes_no_adapter(demo, small_train, tmp_path):
    events = []
    result = run(demo, small_train, tmp_path / "out", stop_after=2, events=events)
    assert result.cancelled and result.steps == 2 and result.adapter_dir is None
    assert not (tmp_path / "out" / "adapter").exists()
    assert events[-1]["type"] == "message" and events[-1]["level"] == "warning"


def test_resuming_after_a_cancel_gives_the_same_adapter_as_an_uninterrupted_run(demo, small_train, tmp_path):
    whole = run(demo, small_train, tmp_path / "whole")
    first = run(demo, small_train, tmp_path / "split", stop_after=6)
    assert first.cancelled and first.checkpoints == [str(tmp_path / "split" / "checkpoints" / "step-4")]
    events = []
    second = run(demo, small_train, tmp_path / "split", events=events)
    assert any("resumed from checkpoint step-4" in e.get("text", "") for e in events)
    assert [e["step"] for e in events if e["type"] == "metrics"][0] == 5
    assert not second.cancelled and second.steps == whole.steps == 12
    assert second.trained_tokens == whole.trained_tokens
    a, b = adapter_tensors(tmp_path / "whole" / "adapter"), adapter_tensors(tmp_path / "split" / "adapter")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_finished_run_called_again_returns_its_result_without_training(demo, small_train, tmp_path):
    first = run(demo, small_train, tmp_path / "out")
    events = []
    again = run(demo, small_train, tmp_path / "out", events=events)
    assert again == first
    assert not any(e["type"] == "metrics" for e in events)


def test_a_checkpoint_holds_safetensors_and_json_only_and_no_file_is_a_pickle(demo, small_train, tmp_path):
    run(demo, small_train, tmp_path / "out", stop_after=9)
    run(demo, small_train, tmp_path / "out")
    checkpoint = tmp_path / "out" / "checkpoints" / "step-8"
    assert {p.name for p in checkpoint.iterdir()} >= {"adapter", "optimizer.safetensors", "rng.safetensors",
                                                       "state.json"}
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["step"] == 8 and state["position"] == {"epoch": 2, "batch": 0}
    assert state["optimizer"]["param_groups"]
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert files
    for path in files:
        assert path.suffix not in FORBIDDEN_SUFFIXES, path
        assert path.suffix in {".json", ".safetensors", ".md"}, path
        head = path.read_bytes()[:2]
        assert head[:1] != b"\x80" and head != b"PK", f"{path} looks like a pickle or torch.save archive"
    assert not [p for p in (tmp_path / "out" / "checkpoints").iterdir() if p.name.startswith(".tmp")]


def test_resuming_with_other_hyperparameters_is_refused_with_the_field_named(demo, small_train, tmp_path):
    run(demo, small_train, tmp_path / "out", stop_after=5)
    with pytest.raises(ConfigError) as caught:
        train(base_model=demo, train_file=small_train, output_dir=tmp_path / "out",
              config=TrainConfig.from_dict({**CONFIG, "learning_rate": 1e-3}), device="cpu")
    assert caught.value.field == "learning_rate" and "resume=False" in caught.value.message
