"""Opening a Hugging Face checkpoint folder safely: check it, pick device and dtype, load its tokenizer.

Operators point Citadel at folders copied from elsewhere, so a missing piece must produce an
error that names the folder and the file, not a stack trace from deep inside transformers.
Weights are only ever read from safetensors: a folder with nothing but pickle files
(pytorch_model.bin, *.pt) is refused, because unpickling runs arbitrary code.
"""

from __future__ import annotations

from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_checkpoint_folder(model: str | Path) -> Path:
    """Return the folder as a resolved Path, or raise an error saying what is missing."""
    path = Path(model).expanduser()
    hint = "pass the folder of a Hugging Face checkpoint (config.json, *.safetensors, tokenizer files)"
    if not path.exists():
        raise FileNotFoundError(f"model folder {path} does not exist: {hint}")
    if not path.is_dir():
        raise ValueError(f"model path {path} is a file, not a folder: {hint}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model folder {path} has no config.json: {hint}")
    if not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ValueError(
                f"model folder {path} has only pickle weights ({', '.join(pickles)}); Citadel loads "
                "safetensors only, because unpickling can run arbitrary code. Convert the weights "
                "to safetensors where the file is trusted, then copy the folder again."
            )
        raise FileNotFoundError(f"model folder {path} has no *.safetensors weights: {hint}")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"model folder {path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): "
            "copy the tokenizer files that came with the checkpoint into it"
        )
    return path.resolve()


def resolve_device(device: str) -> torch.device:
    """The torch device for `device`: auto means CUDA when available, else CPU; cuda without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but no CUDA GPU is available: use device='cpu' or 'auto'")
        return torch.device(device)
    raise ValueError(f"device must be 'auto', 'cpu' or 'cuda' (or 'cuda:N'), got {device!r}")


def resolve_dtype(dtype: str, device: torch.device, config) -> torch.dtype:
    """The torch dtype for `dtype`: auto is the checkpoint's own dtype, but float32 instead of half on CPU."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {', '.join(DTYPES)}, got {dtype!r}")
        return DTYPES[dtype]
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = DTYPES.get(stored)
    if device.type == "cpu" or stored not in DTYPES.values():
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return stored


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)

