"""Write an FP8 copy of a checkpoint in DeepSeek's format: `python -m inference.quant fp8 SRC OUT`.

Each linear weight the engine would quantize at load time (quantization="fp8") is stored as a
float8_e4m3fn `weight` with its `weight_scale_inv` beside it; every other tensor and file is
copied unchanged. Serving the copy then reads half the bytes of bf16 from disk, and gives exactly
what `LLM(SRC, quantization="fp8")` gives. Families whose native definition reads FP8 checkpoints
only (see models/registry.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .fp8 import quantize_blockwise


def quantize_checkpoint(source: Path, out: Path) -> dict:
    """Quantize `source` into the new folder `out`; returns {"quantized": n, "bytes_before", "bytes_after"}."""
    import re

    from safetensors.torch import save_file
    from transformers import AutoConfig

    from ..engine.weights import CheckpointWeights
    from ..models import registry

    source, out = Path(source), Path(out)
    config = AutoConfig.from_pretrained(source)
    cls = registry.model_class(config)
    if not getattr(cls, "loads_native_fp8", False):
        raise ValueError(
            f"{config.model_type} checkpoints are not read in FP8: quantize at load time instead"
        )
    with torch.device("meta"):
        model = cls(config)
    excluded = getattr(cls, "fp8_excluded", None)
    linears = {
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and module.bias is None
        and not (excluded and re.search(excluded, name))
    }
    if out.exists():
        raise FileExistsError(f"{out} exists: choose a new folder")
    out.mkdir(parents=True)
    weights = CheckpointWeights(source)
    tensors, quantized, before, after = {}, 0, 0, 0
    for stored in weights.names():
        tensor = weights.get(stored)
        before += tensor.numel() * tensor.element_size()
        module = stored.removesuffix(".weight")
        if stored.endswith(".weight") and cls.checkpoint_module_name(module) in linears:
            q, scale_inv = quantize_blockwise(tensor)
            tensors[stored], tensors[f"{module}.weight_scale_inv"] = q, scale_inv
            after += q.numel() + scale_inv.numel() * 4
            quantized += 1
        else:
            tensors[stored] = tensor.contiguous()
            after += tensor.numel() * tensor.element_size()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    for item in source.iterdir():
        if (
            item.is_file()
            and not item.name.endswith(".safetensors")
            and item.name != "model.safetensors.index.json"
        ):
            shutil.copy2(item, out / item.name)
    config_path = out / "config.json"
    data = json.loads(config_path.read_text())
    data["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "weight_block_size": [128, 128],
        "activation_scheme": "dynamic",
    }
    config_path.write_text(json.dumps(data, indent=2) + "\n")
    return {"quantized": quantized, "bytes_before": before, "bytes_after": after}
