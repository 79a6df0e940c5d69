"""Memory-mapped safetensors weights of a checkpoint folder, with errors that name the file.

Tensors come straight from the mapped shards (nothing is read until a parameter is filled), so
loading never holds the checkpoint twice in memory. A shard that cannot be parsed, a shard the
index names but the folder lacks, and a tensor in two shards are refused with the file's name.
Models consume tensors by name; whatever is left unconsumed at the end is an unexpected tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """The checkpoint's weights do not fit the model: missing, unexpected or corrupt."""


class CheckpointWeights:
    """Name -> tensor over every *.safetensors shard of a folder (memory-mapped, read lazily)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._handles: dict[Path, object] = {}
        self._where: dict[str, Path] = {}
        for shard in self._shards():
            try:
                handle = safe_open(str(shard), framework="pt")
                names = list(handle.keys())
            except (SafetensorError, OSError, ValueError) as error:
                raise CheckpointError(
                    f"the weight shard {shard} is corrupt or truncated ({error}): "
                    "copy it again from the source"
                ) from error
            self._handles[shard] = handle
            for name in names:
                if name in self._where:
                    raise CheckpointError(
                        f"tensor {name!r} is in both {self._where[name].name} and {shard.name}"
                    )
                self._where[name] = shard
        self._unused = set(self._where)
        self._aside: set[str] = set()

    def _shards(self) -> list[Path]:
        index = self.folder / INDEX_FILE
        if not index.is_file():
            return sorted(self.folder.glob("*.safetensors"))
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"{index} is not a valid safetensors index ({error})") from error
        shards = sorted({self.folder / name for name in weight_map.values()})
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise CheckpointError(
                f"{index.name} lists shards that {self.folder} lacks: {', '.join(missing[:5])}; "
                "copy the whole checkpoint folder again"
            )
        return shards

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self) -> list[str]:
        """Every tensor's name, except those set aside for another reader (set_aside)."""
        return sorted(n for n in self._where if n not in self._aside)

    def set_aside(self, names: list[str]) -> None:
        """Leave `names` out of names() and of check_all_used: their reader (the expert store) reads them
        itself with read(), when needed. CheckpointError when the checkpoint lacks one."""
        for name in names:
            self._check_has(name)
        self._aside.update(names)
        self._unused.difference_update(names)

    def read(self, name: str, index: int | None = None) -> torch.Tensor:
        """Tensor `name`, or only its entry `index` along the first dimension, read from the mapped
        shard now (nothing else of the file is read), as a tensor of its own."""
        self._check_has(name)
        handle = self._handles[self._where[name]]
        try:
            if index is None:
                return handle.get_tensor(name)
            return handle.get_slice(name)[index : index + 1][0]
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(f"cannot read tensor {name!r} from {self._where[name]}: {error}") from error

    def _check_has(self, name: str) -> None:
        if name not in self._where:
            raise CheckpointError(
                f"the checkpoint in {self.folder} has no tensor {name!r}: it does not match its config.json "
                "(or a shard is missing)"
            )

    def dtype_name(self, name: str) -> str:
        """The stored dtype of `name` as safetensors writes it (e.g. "F8_E4M3"), without reading the tensor."""
        return self._handles[self._where[name]].get_slice(name).get_dtype()

    def get(self, name: str) -> torch.Tensor:
        """The tensor `name` (marked as used); CheckpointError when the checkpoint lacks it."""
        if name not in self._where:
            raise CheckpointError(
                f"the checkpoint in {self.folder} has no tensor {name!r}: it does not match its config.json "
                "(or a shard is missing)"
            )
        self._unused.discard(name)
        try:
            return self._handles[self._where[name]].get_tensor(name)
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(f"cannot read tensor {name!r} from {self._where[name]}: {error}") from error

    def skip(self, name: str) -> None:
        """Mark `name` as deliberately unused (e.g. DeepSeek's multi-token-prediction layers), unread."""
        self._unused.discard(name)

    def check_all_used(self) -> None:
        """Raise if the checkpoint holds tensors the model never asked for."""
        if self._unused:
            names = sorted(self._unused)
            raise CheckpointError(
                f"the checkpoint in {self.folder} has {len(names)} tensor(s) the model does not use, e.g. "
                f"{', '.join(names[:5])}: it does not match its config.json"
            )


def assign_parameter(module: torch.nn.Module, name: str, tensor: torch.Tensor, device, dtype) -> None:
    """Replace parameter `name` (dotted) of `module`, built on the meta device, with `tensor`."""
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    expected = getattr(owner, attr)
    if tuple(expected.shape) != tuple(tensor.shape):
        raise CheckpointError(
            f"tensor {name!r} has shape {tuple(tensor.shape)} in the checkpoint but the config implies "
            f"{tuple(expected.shape)}"
        )
    # copy=True: a parameter never views the mapped shard. One view (a tensor already in the device's
    # dtype) keeps the whole shard mapped, and every page of it loading read stays in the process's memory.
    value = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype, copy=True)
    setattr(owner, attr, torch.nn.Parameter(value, requires_grad=False))
