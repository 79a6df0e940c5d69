"""Resumable training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint folder `checkpoints/step-<N>/` holds:

    adapter/                 the PEFT adapter at step N (adapter_config.json + adapter_model.safetensors),
                             loadable on its own like the final one
    optimizer.safetensors    every tensor of the optimizer's state_dict, keyed "<param index>.<name>"
    rng.safetensors          torch's CPU (and CUDA) generator states
    state.json               step, data position, losses, counters, the optimizer's param groups and
                             scalar state, the scheduler position, the config and the data fingerprint

It is written into a hidden temporary folder that is renamed into place only when complete, so
a worker killed mid-write leaves no half checkpoint that resume could pick up.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STEP_DIR = re.compile(r"^step-(\d+)$")


def save_checkpoint(checkpoints_dir: Path, step: int, model, optimizer, state: dict) -> Path:
    """Write checkpoint `step` atomically and return its folder."""
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoints_dir / f"step-{step}"
    temporary = checkpoints_dir / f".tmp-step-{step}-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    model.save_pretrained(temporary / "adapter", safe_serialization=True)
    tensors, scalars = _split_optimizer(optimizer.state_dict())
    save_file(tensors, temporary / "optimizer.safetensors")
    save_file(_rng_tensors(), temporary / "rng.safetensors")
    _write_json(temporary / "state.json", {**state, "optimizer": scalars})
    if final.exists():  # a rerun reached the same step again: replace it
        shutil.rmtree(final)
    os.replace(temporary, final)
    return final


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The newest complete checkpoint folder, or None."""
    if not checkpoints_dir.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in checkpoints_dir.iterdir()
             if (m := STEP_DIR.match(p.name)) and (p / "state.json").is_file()]
    return max(found)[1] if found else None


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    if not checkpoints_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoints_dir.iterdir()
             if (m := STEP_DIR.match(p.name)) and (p / "state.json").is_file()]
    return [p for _, p in sorted(found)]


def load_checkpoint(folder: Path, model, optimizer) -> dict:
    """Restore adapter weights, optimizer and RNG from `folder`; returns its state.json."""
    from peft.utils import set_peft_model_state_dict

    state = json.loads((folder / "state.json").read_text())
    weights = load_file(folder / "adapter" / "adapter_model.safetensors")
    result = set_peft_model_state_dict(model, weights)
    missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    assert not missing, f"checkpoint adapter keys not in the model: {missing[:3]}"
    optimizer.load_state_dict(_join_optimizer(load_file(folder / "optimizer.safetensors"), state["optimizer"]))
    _restore_rng(load_file(folder / "rng.safetensors"))
    return state


def _split_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors keyed "<index>.<name>", and the rest (param groups, non-tensor state) for JSON."""
    tensors, plain = {}, {}
    for index, entries in state_dict["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().contiguous().cpu()
            else:
                plain.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "plain_state": plain}


def _join_optimizer(tensors: dict[str, torch.Tensor], scalars: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for index, entries in scalars["plain_state"].items():
        state.setdefault(int(index), {}).update(entries)
    return {"state": state, "param_groups": scalars["param_groups"]}


def _rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, value in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{index}"] = value
    return tensors


def _restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[f"torch_cuda_{i}"] for i in range(len(tensors)) if f"torch_cuda_{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


def _write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2) + "\n")
