"""A loaded model keeps none of its checkpoint mapped.

Weights are read from memory-mapped shards. A parameter left as a view of a shard keeps the whole
shard mapped, and every page that loading read stays in the process's resident memory beside the
parameters' own copies (on the timing-size Qwen3-MoE of bench.engine: ~420 MiB, a quarter of the
engine's peak). So once loaded, no mapping of the checkpoint's files is left.
"""

from pathlib import Path

import torch

from inference.models.registry import load_model

from .test_qwen3_moe_model import build_qwen3_moe_checkpoint


def _mapped_files() -> set[str]:
    paths = set()
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6:
            paths.add(parts[5])
    return paths


def test_a_loaded_qwen3_moe_keeps_none_of_its_safetensors_shards_mapped(tiny_checkpoint, tmp_path):
    from transformers import AutoConfig

    folder = build_qwen3_moe_checkpoint(tmp_path / "qwen3", tiny_checkpoint)
    shards = {str(p.resolve()) for p in folder.glob("*.safetensors")}
    config = AutoConfig.from_pretrained(folder)
    model = load_model(folder, config, torch.device("cpu"), torch.float32)
    assert not any(p.is_meta for p in model.parameters())
    still_mapped = shards & _mapped_files()
    assert not still_mapped, f"loaded parameters still view {sorted(still_mapped)}"
