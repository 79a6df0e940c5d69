"""Model-file safety: no pickle, and a SHA-256 manifest of the files an engine loads.

A pickle checkpoint (`*.bin`, `*.pt`, `*.pth`, `*.pkl`, `*.ckpt`) runs code when it is loaded, so
a model folder holding one is refused outright: only safetensors weights are accepted (DESIGN.md).
At import the registry records the SHA-256 of every file the engine reads from the folder
(config, safetensors shards and their index, tokenizer and chat-template files); a worker checks
the folder against that manifest before it loads the model, so a file swapped or changed on a
worker host after import is refused, naming the file, instead of being run.

A fine-tuned variant's LoRA adapter folder has a manifest of its own (ADAPTER_PATTERNS: the files
inference.lora.adapter reads), recorded when the variant is registered and checked by a worker
before it serves the adapter (citadel.registry.adapter_check).

Documentation beside the weights (model cards, eval results) is left out on purpose: it does not
reach the engine, and tools rewrite it.
"""

import fnmatch
import hashlib
from pathlib import Path

from citadel.core.exceptions import CitadelError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")

# What the engine reads from a Hugging Face checkpoint folder (inference.loader): its top level only.
LOADED_PATTERNS = (
    "config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
    "chat_template.*", "preprocessor_config.json",
)

# What inference.lora.adapter reads from a PEFT adapter folder.
ADAPTER_PATTERNS = ("adapter_config.json", "*.safetensors")

_CHUNK = 1024 * 1024


class ModelFileRejected(CitadelError):
    """A model folder holds a pickle checkpoint, or a file that no longer matches its manifest."""

    status = 400
    code = "model_file_rejected"

    def __init__(self, message: str, *, file: str):
        super().__init__(message, param="path")
        self.file = file


def pickle_files(folder: Path) -> list[Path]:
    """Pickle weight files anywhere under `folder`, sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)


def pickle_refuse(folder: Path) -> None:
    """Raise ModelFileRejected naming the first pickle checkpoint in `folder`, if there is one."""
    found = pickle_files(folder)
    if found:
        names = ", ".join(str(p.relative_to(folder)) for p in found[:5])
        raise ModelFileRejected(
            f"{found[0]} is a pickle checkpoint ({names}{', ...' if len(found) > 5 else ''}): loading it could run "
            "arbitrary code, so Citadel refuses it. Convert the weights to safetensors (for example with "
            "`safetensors.torch.save_file`, or transformers' `save_pretrained(..., safe_serialization=True)`) "
            "and remove the pickle files from the folder.", file=str(found[0]))


def _loaded(name: str, patterns: tuple[str, ...] = LOADED_PATTERNS) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_build(folder: Path, patterns: tuple[str, ...] = LOADED_PATTERNS) -> dict[str, str]:
    """{file name: SHA-256 hex} of the files the engine loads from `folder` (refusing pickle first);
    `patterns` ADAPTER_PATTERNS for a LoRA adapter folder."""
    pickle_refuse(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and _loaded(p.name, patterns))
    return {p.name: file_sha256(p) for p in files}


def manifest_check(folder: Path, manifest: dict[str, str], patterns: tuple[str, ...] = LOADED_PATTERNS) -> None:
    """Raise ModelFileRejected naming the first file of `folder` that differs from `manifest`:
    changed, missing, or a loaded file (or a pickle) that was not there at import."""
    if folder.is_dir():
        pickle_refuse(folder)
    if not manifest:
        raise ModelFileRejected(
            f"No SHA-256 manifest is recorded for {folder}, so its files cannot be checked. Record it from a "
            "host that sees the trusted files: `citadel model_manifest MODEL`.", file=str(folder))
    present = ({p.name for p in folder.iterdir() if p.is_file() and _loaded(p.name, patterns)}
               if folder.is_dir() else set())
    for name in sorted(present - set(manifest)):
        raise ModelFileRejected(f"{folder / name} was not in the model's manifest when it was imported; remove it, "
                                "or record the manifest again if the change is trusted.", file=str(folder / name))
    for name, expected in sorted(manifest.items()):
        path = folder / name
        if not path.is_file():
            raise ModelFileRejected(f"{path} is missing: it was in the model's manifest when it was imported.",
                                    file=str(path))
        actual = file_sha256(path)
        if actual != expected:
            raise ModelFileRejected(
                f"{path} does not match the SHA-256 recorded when the model was imported (expected {expected}, found "
                f"{actual}): the file was changed or replaced, so it is not loaded. Restore the imported file, or "
                "record the manifest again if the change is trusted.", file=str(path))
