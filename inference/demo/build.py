"""`python -m inference.demo build`: corpus -> tokenizer -> model -> training -> checkpoint folder.

The folder is an ordinary Hugging Face checkpoint (config.json, model.safetensors,
generation_config.json, tokenizer.json, tokenizer_config.json with the chat template), plus
eval/<family>.jsonl (held-out eval sets), finetune/ (the fine-tuning dataset) and build.json
(the settings, parameter counts, timings and machine, from which `eval` regenerates the
training corpus for its unigram baseline).
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from .config import FAMILIES, BuildSettings
from .corpus import Corpus
from .finetune_data import write_finetune_data
from .model import BOS_ID, EOS_ID, PAD_ID, build_model, parameter_counts
from .tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
from .train import train

TOKENIZER_SAMPLE = 20000
"""Training conversations (besides every handbook sentence) the BPE merges are learnt from."""


@contextmanager
def deterministic(threads: int) -> Iterator[None]:
    """Fixed thread count and deterministic kernels for the duration of a build, restored after."""
    previous_threads, previous_mode = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(previous_threads)
        torch.use_deterministic_algorithms(previous_mode)


def build(out: str | Path, settings: BuildSettings, log: Callable[[str], None] = print) -> Path:
    """Build the demo checkpoint into `out` (created if needed) and return its path."""
    from transformers import GenerationConfig

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with deterministic(settings.train.threads):
        corpus = Corpus(settings)
        sample = min(TOKENIZER_SAMPLE, settings.train.steps * settings.train.batch_size)
        raw_tokenizer = train_tokenizer(corpus.tokenizer_texts(sample), settings.model.vocab_size)
        save_tokenizer(raw_tokenizer, out, settings.model.max_position_embeddings)
        tokenizer = load_tokenizer(out)
        log(f"tokenizer: {raw_tokenizer.get_vocab_size()} tokens")

        model = build_model(settings.model, raw_tokenizer.get_vocab_size(), settings.seed)
        counts = parameter_counts(model)
        log(f"model: {counts['total']:,} parameters, {counts['active_per_token']:,} active per token")
        stats = train(model, tokenizer, corpus, settings, log)

        model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
        model.save_pretrained(out, safe_serialization=True)

    eval_dir = out / "eval"
    eval_dir.mkdir(exist_ok=True)
    for family in FAMILIES:
        lines = [json.dumps(e.to_json(), ensure_ascii=False) + "\n" for e in corpus.eval_examples(family)]
        (eval_dir / f"{family}.jsonl").write_text("".join(lines))
    write_finetune_data(out / "finetune", settings)

    info = {
        "settings": settings.to_dict(),
        "parameters": counts,
        "training": stats,
        "build_seconds": round(time.monotonic() - started, 1),
        "machine": {"cpu": _cpu_model(), "threads": settings.train.threads, "python": platform.python_version(),
                    "torch": torch.__version__, "transformers": _version("transformers"),
                    "tokenizers": _version("tokenizers")},
    }
    (out / "build.json").write_text(json.dumps(info, indent=2) + "\n")
    log(f"checkpoint written to {out} in {info['build_seconds'] / 60:.1f} min")
    return out


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
