"""A device KV tier too small for DeepSeek-V4's prefix-cache snapshots is refused at load, not mid-request.

Under KV tiers, a cached block's snapshot of a sequence's slot (V4's window ring and compressor state,
kept in the model dtype) is a run of logical pages brought onto the device tier whole to be saved or
loaded (KVTiers.on_device). With kv_cache_dtype="fp8" the pages are about 4x smaller, so a snapshot
takes about 4x as many of them: a kv_device_bytes sized for "auto" used to fail in the middle of a
request ("the device KV tier (14 pages) cannot hold 21 pages"). The runner's load-time check counts
them: a budget below the minimum is refused naming kv_device_bytes and that minimum, and the minimum
itself serves prefix hits from every tier with the untiered fp8 engine's tokens.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from inference import LLM

from .test_kv_cache_fp8 import assert_same_tokens
from .test_prefix_cache import run, shared_prefix_prompts

DEMO = Path(__file__).resolve().parents[2] / "models" / "demo-v4"
SETTINGS = dict(block_size=4, max_num_seqs=4, max_num_batched_tokens=256, kv_cache_dtype="fp8")
REFUSAL = r"kv_device_bytes=\d+ holds (\d+) pages .* snapshot .* takes (\d+).* at least (\d+)"


pytestmark = pytest.mark.usefixtures("single_threaded_torch")


@pytest.fixture(scope="module")
def sizes() -> dict:
    """fp8 page bytes, slot bytes and snapshot pages of demo-v4 under SETTINGS (and "auto"'s, to compare)."""
    found = {}
    for dtype in ("auto", "fp8"):
        probe = LLM(
            DEMO,
            device="cpu",
            dtype="float32",
            kv_cache_memory=1 << 24,
            **{**SETTINGS, "kv_cache_dtype": dtype},
        )
        runner = probe._loop.engine.runner
        found[dtype] = (
            runner.cache.page_bytes,
            runner.cache.slots.numel(),
            runner.block_manager.prefix.snapshot_pages,
        )
        probe.close()
    return found


def tiers(device_bytes: int, page: int, tmp_path) -> dict:
    return dict(
        kv_device_bytes=device_bytes,
        kv_host_bytes=40 * page,
        kv_disk_bytes=4000 * page,
        kv_disk_path=str(tmp_path),
    )


def test_a_device_tier_sized_for_auto_pages_is_refused_at_load_naming_the_fp8_minimum(sizes, tmp_path):
    page, slots, snapshot = sizes["fp8"]
    auto_snapshot = sizes["auto"][2]
    assert snapshot >= 3 * auto_snapshot  # fp8 pages are ~4x smaller; the snapshot keeps its bytes
    budget = slots + (2 * auto_snapshot + 1) * page  # "auto"'s snapshot twice over, and what a step writes
    with pytest.raises(ValueError, match=REFUSAL) as refused:
        LLM(DEMO, device="cpu", dtype="float32", **SETTINGS, **tiers(budget, page, tmp_path))
    held, needed, least = map(int, re.search(REFUSAL, str(refused.value)).groups())
    assert (held, needed) == ((budget - slots) // page - 1, snapshot)
    assert least == slots + (snapshot + 1) * page  # the slots, the snapshot's pages and the null page
    assert "enable_prefix_caching=false" in str(refused.value)
    # A page less than the minimum is refused too; without prefix caching no snapshot is taken, so it loads.
    with pytest.raises(ValueError, match=REFUSAL):
        LLM(DEMO, device="cpu", dtype="float32", **SETTINGS, **tiers(least - page, page, tmp_path))
    LLM(
        DEMO,
        device="cpu",
        dtype="float32",
        enable_prefix_caching=False,
        **SETTINGS,
        **tiers(least - page, page, tmp_path),
    ).close()


def test_the_minimum_device_tier_serves_fp8_prefix_hits_with_the_untiered_fp8_tokens(sizes, tmp_path):
    page, slots, snapshot = sizes["fp8"]
    least = slots + (snapshot + 1) * page
    first, second = shared_prefix_prompts(1000, 420, seed=5), shared_prefix_prompts(1000, 420, seed=6)
    prompts = first + second + first  # the second set pushes the first one's blocks and snapshots down a tier
    tiered, stats = run(DEMO, prompts, True, **SETTINGS, **tiers(least, page, tmp_path))
    untiered, plain = run(DEMO, prompts, True, **SETTINGS)
    assert_same_tokens(tiered, untiered)
    # The tiers hold more pages than the untiered cache (281), so they keep more blocks cached.
    assert stats["prefix_hits"] >= plain["prefix_hits"] > 0, (stats, plain)
    assert stats["kv_evictions"] > 0 and stats["kv_prefetch_hits"] > 0 and stats["kv_disk_peak_bytes"] > 0, (
        stats
    )
