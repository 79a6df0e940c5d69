"""Prefill and decode steps over a transformers causal LM, with a KV cache per sequence.

This is the only place that calls the model, so the later runtime (paged KV cache, batching,
Citadel's own DeepSeek-V4 kernels) replaces this file and keeps the decode loop above it.
"""

from __future__ import annotations

import inspect

import torch


class HFModelRunner:
    """Runs one sequence at a time through a Hugging Face model's forward with its own cache."""

    def __init__(self, model):
        self.model = model
        self.device = next(model.parameters()).device
        # transformers 5 renames `past_key_values` to `cache` (the old name is deprecated).
        forward_params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in forward_params else "past_key_values"

    @property
    def max_model_len(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 2**31)

    def new_cache(self):
        """An empty cache; DeepSeek-V4 gets its compressor-aware cache layers from the config."""
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    @torch.inference_mode()
    def forward(self, token_ids: list[int], cache, start: int, all_logits: bool = False) -> torch.Tensor:
        """Feed `token_ids` at positions start.. and extend `cache` in place.

        Returns float32 logits [len(token_ids), vocab] if all_logits, else [1, vocab] for the
        last position only (the prefill of a long prompt then never materialises the rest).
        """
        input_ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)  # [1, n]
        positions = torch.arange(start, start + len(token_ids), device=self.device).unsqueeze(0)  # [1, n]
        out = self.model(
            input_ids=input_ids,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=0 if all_logits else 1,
            **{self._cache_arg: cache},
        )
        return out.logits[0].float()
