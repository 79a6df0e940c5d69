"""Citadel's demo models, built reproducibly from the project's own code.

`build` trains a small DeepSeek-V4 model (transformers' `DeepseekV4ForCausalLM`, every V4
feature active) on a synthetic chat corpus: arithmetic, unit conversion and questions about a
generated company handbook. It writes a Hugging Face checkpoint with held-out eval files and a
fine-tuning dataset; `eval` measures it; `tiny-moe` writes a random Qwen3-MoE checkpoint for
engine tests. See `python -m inference.demo --help` and models/demo-v4/MODEL_CARD.md.
"""

from .build import build
from .config import BuildSettings, preset

__all__ = ["build", "BuildSettings", "preset"]
