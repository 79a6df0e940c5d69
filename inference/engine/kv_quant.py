"""FP8 KV storage (kv_cache_dtype="fp8"): cache pages hold float8_e4m3fn values with a scale per row.

Why: KV pages dominate the memory of long contexts and of many concurrent sequences; storing them
in FP8 halves their bytes against bf16 (a quarter against float32), so the same kv_cache_memory, or
the same KV tier budgets (kv_device_bytes / kv_host_bytes / kv_disk_bytes), hold twice as many pages.

The format. A paged group's entry has rows: its last dimension (one head of K or V of a token for a
plain K/V cache, [2, kv_heads, head_dim]; one compressed entry, or one indexer key, for
DeepSeek-V4's CSA/HCA groups, whose `segments` say where one ends and the other begins). Each row
of n values is stored as n + 1 bytes: n float8_e4m3fn values, then one signed byte e, and the row
reads back as value * 2**e. So the scale is per token and head (per token-head), chosen for each
row when it is written:
- accurate: a row's values share a scale only with the values of the same head of the same token,
  so one large head never flattens another, and no statistics are needed ahead of time (no
  calibration, nothing that depends on which other tokens share a page or a batch);
- simple: a row is quantized alone, at write time, and never rewritten (pages are append-only), so
  quantizing is deterministic: the same token's entries give the same bytes in any batch, which is
  why fp8 KV with KV tiers returns exactly what fp8 KV without tiers returns (the tiers copy bytes);
- cheap: a power-of-two scale fits in one byte (e4m3 is a floating-point format, so a scale that
  is a power of two loses nothing but at most the top binade: the row's largest value lands in
  (224, 448] instead of at 448 exactly, with the same 3-bit mantissa), and applying it is exact.
  One byte per 128-value row makes a page 0.504 of its bf16 bytes (head_dim 128; 0.508 at 64).

Only the paged groups (what grows with the sequence, what the block manager and KV tiers count in
pages) are stored in FP8. Per-sequence slots (DeepSeek-V4's sliding-window ring and its
compressors' not-yet-compressed tails) keep the model's dtype: they are a fixed size whatever the
length, and the tails are pre-softmax gate logits that FP8 would distort.

A packed cache is recognised by its dtype (uint8, which no model computes in): `store` quantizes on
write into the cache, `load` dequantizes what a read gathered; both are the identity for "auto".
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .cache import CacheGroup, CacheSpec
from .config import KV_CACHE_DTYPES

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite float8_e4m3fn
PACKED = torch.uint8
"""The dtype of a packed (FP8) cache tensor: bytes, values and scales side by side."""


def is_packed(cache: torch.Tensor) -> bool:
    return cache.dtype == PACKED


def storage_spec(spec: CacheSpec, kv_cache_dtype: str) -> CacheSpec:
    """The CacheSpec the cache memory is laid out by: `spec` itself for "auto"; for "fp8", each paged
    group as packed rows (one more byte per row of its last dimension, or per segment of it)."""
    if kv_cache_dtype == "auto":
        return spec
    assert kv_cache_dtype in KV_CACHE_DTYPES, kv_cache_dtype
    groups = []
    for group in spec.groups:
        if not group.per_sequence:
            *outer, last = group.entry_shape
            rows = len(group.segments) if group.segments else 1
            assert not group.segments or sum(group.segments) == last, group
            group = dataclasses.replace(group, entry_shape=(*outer, last + rows), dtype=PACKED)
        groups.append(group)
    return CacheSpec(tuple(groups))


def packed_columns(segments: tuple[int, ...], index: int, packed: bool) -> slice:
    """Columns of segment `index` of a row split into `segments`, in the stored layout."""
    extra = 1 if packed else 0
    start = sum(segments[:index]) + extra * index
    return slice(start, start + segments[index] + extra)


def quantize(x: torch.Tensor) -> torch.Tensor:
    """x [..., n] (any float dtype) -> [..., n + 1] uint8: n e4m3 values, then the row's exponent byte."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)  # [..., 1]
    mantissa, exponent = torch.frexp(amax / FP8_MAX)  # amax / 448 = mantissa * 2**exponent, mantissa in [0.5, 1)
    # The least e with amax / 448 <= 2**e, so the row's largest value lands in (224, 448]: a row already
    # on the grid quantizes to itself again (an all-zero row gets e = 0).
    exponent = (exponent - (mantissa == 0.5).int()).clamp_(-126, 127)
    values = (xf * torch.exp2(-exponent.float())).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return torch.cat((values.view(PACKED), exponent.to(torch.int8).view(PACKED)), dim=-1)


def dequantize(packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[..., n + 1] uint8 (as `quantize` wrote it) -> [..., n] in `dtype`."""
    values = packed[..., :-1].view(FP8)
    exponent = packed[..., -1:].view(torch.int8)
    work = dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32  # 2**e exact in both
    out = values.to(work).mul_(torch.exp2(exponent.to(work)))
    return out if work == dtype else out.to(dtype)


def store(x: torch.Tensor, cache_dtype: torch.dtype) -> torch.Tensor:
    """What to write into a cache of `cache_dtype`: x quantized for a packed cache, else x in that dtype."""
    if cache_dtype == PACKED:
        return quantize(x)
    return x if x.dtype == cache_dtype else x.to(cache_dtype)


def load(entries: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Entries read from a cache -> `dtype`: dequantized when packed, else unchanged."""
    return dequantize(entries, dtype) if entries.dtype == PACKED else entries


def bytes_ratio(group: CacheGroup, packed: CacheGroup, reference: torch.dtype = torch.bfloat16) -> float:
    """A packed group's bytes per entry over the same entry in `reference` (0.5 plus the scale bytes)."""
    return math.prod(packed.entry_shape) / (math.prod(group.entry_shape) * reference.itemsize)
