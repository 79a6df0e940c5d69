"""The tiny checkpoint is a valid, deterministic DeepSeek-V4 checkpoint that transformers loads."""

import json

from inference.tiny_checkpoint import build_tiny_checkpoint, main


def test_the_tiny_checkpoint_has_every_file_a_hugging_face_folder_needs(tiny_checkpoint):
    names = {p.name for p in tiny_checkpoint.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    assert "tokenizer_config.json" in names
    assert not any(name.endswith((".bin", ".pt")) for name in names)


def test_the_tiny_checkpoint_uses_every_deepseek_v4_layer_type(tiny_checkpoint):
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["model_type"] == "deepseek_v4"
    assert set(config["layer_types"]) == {
        "sliding_attention",
        "compressed_sparse_attention",
        "heavily_compressed_attention",
    }
    assert set(config["mlp_layer_types"]) == {"hash_moe", "moe"}
    assert config["n_shared_experts"] == 1
    assert config["rope_parameters"]["compress"]["rope_type"] == "yarn"


def test_the_same_seed_builds_identical_files_and_another_seed_other_weights(tiny_checkpoint, tmp_path):
    again = build_tiny_checkpoint(tmp_path / "again", seed=0)
    for path in tiny_checkpoint.iterdir():
        assert (again / path.name).read_bytes() == path.read_bytes(), path.name
    other = build_tiny_checkpoint(tmp_path / "other", seed=1)
    assert (other / "model.safetensors").read_bytes() != (tiny_checkpoint / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (tiny_checkpoint / "tokenizer.json").read_bytes()


def test_the_command_line_builds_a_checkpoint(tmp_path, capsys):
    assert main([str(tmp_path / "cli"), "--seed", "3"]) == 0
    assert (tmp_path / "cli" / "model.safetensors").is_file()
    assert "written to" in capsys.readouterr().out
