"""Rotary position embeddings, computed exactly as transformers does (so logits match bit for bit)."""

from __future__ import annotations

import torch
from torch import nn

STATIC_ROPE_TYPES = ("default", "linear", "yarn", "llama3")


class RotaryEmbedding(nn.Module):
    """cos/sin for any positions, from the config's rope_parameters (transformers' own formulas)."""

    def __init__(self, config, dim: int):
        super().__init__()
        rope = dict(getattr(config, "rope_parameters", None) or {})
        rope_type = rope.get("rope_type", "default")
        if rope_type not in STATIC_ROPE_TYPES:
            raise ValueError(
                f"rope_type {rope_type!r} is not supported by Citadel's engine; "
                f"supported: {', '.join(STATIC_ROPE_TYPES)}"
            )
        if rope_type == "default":
            base = rope.get("rope_theta", 10000.0)
            inv_freq = 1.0 / (
                base ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim)
            )
            scaling = 1.0
        else:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
        self.dim = dim
        self.scaling = float(scaling)
        self._inv_freq = inv_freq.float()
        self._by_device: dict[torch.device, torch.Tensor] = {}

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, dim] in `dtype`."""
        inv_freq = self._by_device.get(positions.device)
        if inv_freq is None:
            inv_freq = self._by_device.setdefault(positions.device, self._inv_freq.to(positions.device))
        freqs = positions[:, None].float() * inv_freq  # [T, dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)

    def step_tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, signed sin [T, 1, dim] for `rotate`, built once per step for every layer.

        transformers' rotate_half(x) * sin is (-x2 * sin, x1 * sin) for halves x1, x2; that is x rolled by half
        its width times (-sin, +sin): the same products, in two operations instead of five.
        """
        cos, sin = self.cos_sin(positions, dtype)
        half = sin.shape[-1] // 2
        signed_sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
        return cos[:, None], signed_sin[:, None]

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        """x [T, heads, dim] rotated by the step tables cos, signed_sin [T, 1, dim] (step_tables)."""
        return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin
