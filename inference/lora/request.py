"""What a caller passes to serve a request with an adapter, shaped like vLLM's LoRARequest."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LoRARequest:
    """A PEFT LoRA adapter folder to apply to one request.

    name: how logs, metrics and errors call the adapter (e.g. the fine-tuned model's id).
    path: the folder holding adapter_config.json and adapter_model.safetensors.
    """

    name: str
    path: str | Path

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("LoRARequest.name must be a non-empty string naming the adapter")
        if not isinstance(self.path, str | Path) or not str(self.path):
            raise ValueError("LoRARequest.path must be the path of a PEFT adapter folder")
