"""Block-wise FP8 weights, in DeepSeek's format: e4m3 values and one float32 scale per 128x128 block.

A weight W [out, in] is stored as Q = W / s (rounded to float8_e4m3fn) with s = amax(block) / 448
for each 128x128 block, and `weight_scale_inv` [ceil(out/128), ceil(in/128)] holding the s: so
W ~= Q * s, block by block. That is how DeepSeek ships its FP8 checkpoints (`weight_scale_inv`
beside each quantized `weight`), and how bf16 or fp32 checkpoints are quantized at load time
(`LLM(..., quantization="fp8")`). Stored this way a weight takes one byte per value plus 4 bytes
per 16,384 values, about half of bf16.

On the CPU, and on GPUs without FP8 matrix units, Fp8Linear dequantizes its weight block by block
for each call and multiplies in the activations' dtype: correct everywhere, memory-light, and not
faster. On Hopper-class GPUs it could multiply in FP8 directly (torch._scaled_mm with block
scales); that path needs a GPU to be measured and is not enabled yet.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

FP8_BLOCK = 128
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448


def _pad_to_blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    rows, cols = w.shape
    return F.pad(w, (0, -cols % block, 0, -rows % block))


def quantize_blockwise(weight: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] -> (q float8_e4m3fn [out, in], scale_inv float32 [ceil(out/b), ceil(in/b)])."""
    if weight.dim() != 2:
        raise ValueError(f"block-wise FP8 quantizes 2-D weights, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    w = _pad_to_blocks(weight.detach().float(), block)
    blocks = w.view(w.shape[0] // block, block, w.shape[1] // block, block)  # [R, b, C, b]
    amax = blocks.abs().amax(dim=(1, 3))  # [R, C]
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (blocks / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(w.shape)[:rows, :cols].contiguous(), scale_inv.contiguous()


def dequantize_blockwise(
    q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32, block: int = FP8_BLOCK
) -> torch.Tensor:
    """(q [out, in], scale_inv [ceil(out/b), ceil(in/b)]) -> the weight [out, in] in `dtype`."""
    rows, cols = q.shape
    expected = (-(-rows // block), -(-cols // block))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"weight_scale_inv has shape {tuple(scale_inv.shape)}, but a {rows}x{cols} weight in "
            f"{block}x{block} blocks needs {expected}"
        )
    scales = scale_inv.float().repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    return (q.float() * scales).to(dtype)


class Fp8Linear(nn.Module):
    """A bias-free linear layer whose weight is block-wise FP8 (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = dtype
        rows, cols = -(-out_features // FP8_BLOCK), -(-in_features // FP8_BLOCK)
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=FP8_DTYPE), requires_grad=False
        )
        self.weight_scale_inv = nn.Parameter(
            torch.empty(rows, cols, dtype=torch.float32), requires_grad=False
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Fp8Linear:
        if linear.bias is not None:
            raise ValueError("Fp8Linear has no bias: quantize bias-free linear layers only")
        layer = cls(linear.in_features, linear.out_features, linear.weight.dtype)
        q, scale_inv = quantize_blockwise(linear.weight)
        layer.weight = nn.Parameter(q.to(linear.weight.device), requires_grad=False)
        layer.weight_scale_inv = nn.Parameter(scale_inv.to(linear.weight.device), requires_grad=False)
        return layer

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_blockwise(self.weight, self.weight_scale_inv, dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 {FP8_BLOCK}x{FP8_BLOCK}"


def quantize_linears(model: nn.Module, excluded: str | None = None) -> list[str]:
    """Replace every bias-free nn.Linear of `model` (loaded) by its FP8 version; return their names.

    excluded: a regular expression over module names to leave alone (LM heads, routers, weights a
    model reads directly instead of calling the layer).
    """
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module.bias is None and not (excluded and re.search(excluded, name))
    ]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Fp8Linear.from_linear(getattr(parent, child)))
    return names

