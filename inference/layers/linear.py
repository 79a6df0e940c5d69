"""F.linear whose one-row products on a CPU use every intra-op thread.

A batch-of-one decode step multiplies a single row by each weight matrix. For that shape torch
calls MKL's matrix-vector product, which runs on one core however many intra-op threads torch
has: on the 2-core CI machine it read float32 weights at ~11 GB/s with one thread or two. The
same product written as a bmm over row blocks of the weight ([parts, rows / parts, in]) is spread
over the threads by torch's own parallel loop over the batch: a 512x512 weight took ~65 us
instead of ~100, an 8192x512 one ~0.85 ms instead of ~1.6 (bench.engine's batch of one is ~12%
faster on Qwen3-MoE). Each block is the same kernel over the same rows, so the result has the same
bits as F.linear (tests/inference/test_linear.py checks the shapes the models use).

Only float32 on a CPU, one row, and weights of at least SPLIT_MIN_ELEMENTS: bfloat16 has its own
kernels that this does not speed up, and for small weights the extra dispatch costs more than the
second core gives. Every other call is F.linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SPLIT_MIN_ELEMENTS = 1 << 17
"""Smallest weight (out x in) whose one-row product is split: a 512x256 float32 weight (512 KiB)."""

MIN_ROWS_PER_PART = 64
"""Each thread's block of output rows is at least this tall."""


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), with a [1, in] float32 x on a CPU computed over row blocks in parallel."""
    if weight.numel() < SPLIT_MIN_ELEMENTS:  # first, alone: most of a small model's calls stop here
        return F.linear(x, weight, bias)
    parts = _parts(x, weight)
    if parts < 2:
        return F.linear(x, weight, bias)
    rows, inner = weight.shape
    out = torch.bmm(x.view(1, 1, inner).expand(parts, 1, inner), weight.view(parts, rows // parts, inner).mT)
    out = out.view(1, rows)
    return out if bias is None else out + bias


def _parts(x: torch.Tensor, weight: torch.Tensor) -> int:
    """How many row blocks to split the product into (below 2: do not split)."""
    if (
        x.dim() != 2
        or x.shape[0] != 1
        or x.device.type != "cpu"
        or x.dtype != torch.float32
        or weight.dtype != torch.float32
        or weight.dim() != 2
        or weight.numel() < SPLIT_MIN_ELEMENTS
        or not weight.is_contiguous()
    ):
        return 1
    rows = weight.shape[0]
    parts = min(torch.get_num_threads(), rows // MIN_ROWS_PER_PART)
    while parts > 1 and rows % parts:
        parts -= 1
    return parts


class Linear(nn.Linear):
    """nn.Linear computed by `linear` above: what the model families build their projections from.

    A subclass, so LoRA wrapping, FP8 quantization and checkpoint loading treat it as the
    nn.Linear it is.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
