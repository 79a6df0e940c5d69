"""TrainConfig: defaults, round trip, and a ConfigError naming each bad field."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from finetune import ConfigError, TrainConfig


def test_every_key_is_optional_and_the_defaults_are_valid():
    config = TrainConfig.from_dict({})
    assert config == TrainConfig()
    assert config.target_modules == "attention"


def test_to_dict_round_trips_through_json_including_a_module_list():
    config = TrainConfig.from_dict({"rank": 4, "alpha": 8, "lr_schedule": "linear",
                                    "target_modules": ["q_proj", "v_proj"], "seed": 3})
    again = TrainConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    assert again.to_dict()["target_modules"] == ["q_proj", "v_proj"]


@pytest.mark.parametrize("field, value", [
    ("rank", 0), ("rank", 2.5), ("rank", True), ("alpha", 0), ("alpha", "big"), ("dropout", 1.0),
    ("dropout", -0.1), ("learning_rate", 0), ("learning_rate", float("nan")), ("lr_schedule", "step"),
    ("warmup_steps", -1), ("epochs", 0), ("batch_size", 0), ("max_seq_len", 4), ("target_modules", "mlp"),
    ("target_modules", []), ("target_modules", [""]), ("target_modules", 3), ("seed", -1),
    ("checkpoint_every", -5), ("eval_every", "often"), ("weight_decay", 2), ("max_grad_norm", -1),
    ("trainable_tokens", "all"),
])
def test_a_bad_value_is_refused_with_its_field_named(field, value):
    with pytest.raises(ConfigError) as caught:
        TrainConfig.from_dict({field: value})
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")
    assert caught.value.message


def test_an_unknown_key_is_refused_and_the_known_ones_listed():
    with pytest.raises(ConfigError) as caught:
        TrainConfig.from_dict({"n_epochs": 3})
    assert caught.value.field == "n_epochs"
    assert "epochs" in caught.value.message


def test_routed_experts_with_dropout_name_the_dropout_and_the_way_out():
    with pytest.raises(ConfigError) as caught:
        TrainConfig.from_dict({"target_modules": "attention+experts", "dropout": 0.1})
    assert caught.value.field == "dropout"
    assert "set dropout to 0" in caught.value.message


def test_a_config_that_is_not_an_object_is_refused():
    with pytest.raises(ConfigError) as caught:
        TrainConfig.from_dict(["rank", 8])
    assert caught.value.field == "config"


def test_importing_the_package_loads_neither_torch_nor_django():
    code = ("import sys, finetune; from finetune import TrainConfig; TrainConfig.from_dict({}); "
            "print('torch' in sys.modules, 'django' in sys.modules)")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["False", "False"], done.stderr
