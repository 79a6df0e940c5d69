"""KV tiers (inference/engine/tiers.py): pages in device memory, host memory and a disk file.

Tiering must not change results: with budgets small enough that every tier holds pages, greedy
tokens are those of the untiered engine and log-probabilities agree within 1e-4 at fp32, on the
shipped demo-v4, the tiny and the second DeepSeek-V4 (selective reads: the attention fetches only
the entries it reads from slower tiers) and a tiny Qwen3-MoE (whole pages staged before each step).
Many requests at once and preemption stay safe, a long prompt (the long-context path at ~20k
tokens) runs with the device tier at a tenth of its KV, and bad budgets fail naming the field.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.tiers_kv import long_context_checkpoint
from inference import LLM, SamplingParams
from inference.engine import EngineConfig
from tests.inference.test_qwen3_moe_model import build_qwen3_moe_checkpoint

pytestmark = pytest.mark.usefixtures("single_threaded_torch")

DEMO = Path(__file__).resolve().parents[2] / "models" / "demo-v4"
GREEDY = SamplingParams(temperature=0, max_tokens=6, logprobs=0, prompt_logprobs=0)


def prompts_for(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(7, vocab, (n,), generator=generator).tolist() for n in lengths]


def chosen_logprobs(output) -> list[float]:
    sampled = [e[t] for e, t in zip(output.outputs[0].logprobs, output.outputs[0].token_ids, strict=True)]
    prompt = [e[t] for e, t in zip(output.prompt_logprobs[1:], output.prompt_token_ids[1:], strict=True)]
    return sampled + prompt


def assert_same_results(expected, got) -> None:
    for a, b in zip(expected, got, strict=True):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids
        diffs = [abs(x - y) for x, y in zip(chosen_logprobs(a), chosen_logprobs(b), strict=True)]
        assert max(diffs) <= 1e-4


def tier_budgets(folder, pages: tuple[int, int, int], disk: Path, max_num_seqs: int, **settings) -> dict:
    """kv_*_bytes that give the device, host and disk tiers these many pages (slots come first)."""
    probe = LLM(
        folder, device="cpu", dtype="float32", max_num_seqs=max_num_seqs, kv_cache_memory=1 << 24, **settings
    )
    runner = probe._loop.engine.runner
    page, slots = runner.cache.page_bytes, runner.cache.slots.numel()
    probe.close()
    return dict(
        kv_device_bytes=slots + (pages[0] + 1) * page,
        kv_host_bytes=pages[1] * page,
        kv_disk_bytes=pages[2] * page,
        kv_disk_path=str(disk),
        max_num_seqs=max_num_seqs,
        **settings,
    )


@pytest.fixture(scope="module")
def qwen_checkpoint(tiny_checkpoint, tmp_path_factory):
    return build_qwen3_moe_checkpoint(tmp_path_factory.mktemp("qwen3-moe-tiers"), tiny_checkpoint, seed=3)


CASES = {
    # name: (vocab, prompt lengths, (device, host, disk) pages, engine settings)
    "demo-v4": (
        1000,
        [900, 150, 700, 40, 800, 600, 1000, 333],
        (14, 10, 400),
        dict(max_num_batched_tokens=128),
    ),
    "tiny-v4": (
        640,
        [200, 31, 150, 90, 250, 7, 180],
        (16, 6, 300),
        dict(max_num_batched_tokens=64, block_size=4),
    ),
    "second-v4": (
        96,
        [200, 31, 150, 90, 250, 7, 180],
        (20, 6, 300),
        dict(max_num_batched_tokens=64, block_size=4),
    ),
    "qwen3-moe": (
        640,
        [120, 31, 90, 64, 100, 7, 110],
        (40, 10, 300),
        dict(max_num_batched_tokens=64, block_size=4),
    ),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tiny_checkpoint):
    folder = {
        "demo-v4": lambda: DEMO,
        "tiny-v4": lambda: tiny_checkpoint,
        "second-v4": lambda: request.getfixturevalue("second_v4_checkpoint"),
        "qwen3-moe": lambda: request.getfixturevalue("qwen_checkpoint"),
    }[request.param]()
    return request.param, folder, *CASES[request.param]


def test_tiered_kv_gives_the_untiered_tokens_and_logprobs_with_every_tier_holding_pages(case, tmp_path):
    name, folder, vocab, lengths, pages, settings = case
    prompts = prompts_for(vocab, lengths)
    untiered = LLM(folder, device="cpu", dtype="float32", **settings)
    expected = untiered.generate(prompts, GREEDY)
    untiered.close()
    tiered = LLM(
        folder, device="cpu", dtype="float32", **tier_budgets(folder, pages, tmp_path, 4, **settings)
    )
    got = tiered.generate(prompts, GREEDY)
    stats = tiered.stats()
    tiered.close()
    assert_same_results(expected, got)
    for tier in ("device", "host", "disk"):
        assert stats[f"kv_{tier}_peak_bytes"] > 0, f"{name}: the {tier} tier never held a page"
    assert stats["kv_evictions"] > 0 and stats["kv_tier_misses"] > 0 and stats["kv_bytes_transferred"] > 0
    assert stats["kv_tier_hits"] > 0
    assert stats["kv_pages_free"] == stats["kv_pages_total"]  # every page given back
    assert not list(tmp_path.iterdir())  # the disk tier's file is gone once the engine is


def test_many_requests_with_preemption_on_tiered_kv_still_give_the_untiered_tokens(tiny_checkpoint, tmp_path):
    settings = dict(max_num_batched_tokens=64, block_size=4)
    prompts = prompts_for(640, [1 + (i * 37) % 200 for i in range(24)], seed=5)
    untiered = LLM(tiny_checkpoint, device="cpu", dtype="float32", **settings)
    expected = untiered.generate(prompts, GREEDY)
    untiered.close()
    # 30 pages in all tiers together, 16 for one sequence of ~200 tokens: requests must be preempted.
    budgets = tier_budgets(tiny_checkpoint, (22, 4, 4), tmp_path, 8, **settings)
    tiered = LLM(tiny_checkpoint, device="cpu", dtype="float32", **budgets)
    got = tiered.generate(prompts, GREEDY)
    stats = tiered.stats()
    tiered.close()
    assert_same_results(expected, got)
    assert stats["preemptions"] > 0 and stats["max_batch_size"] > 1
    assert stats["kv_disk_peak_bytes"] > 0
    assert stats["kv_pages_free"] == stats["kv_pages_total"]


def test_a_long_prompt_runs_with_the_device_tier_at_a_tenth_of_its_kv(tmp_path):
    """The long-context benchmark's path (bench.tiers --long-context) at 20,000 tokens."""
    folder = long_context_checkpoint(tmp_path / "demo-v4-long", 1 << 15)
    prompt = prompts_for(1000, [20_000], seed=7)
    settings = dict(max_num_seqs=1, max_num_batched_tokens=512)
    params = SamplingParams(temperature=0, max_tokens=3, logprobs=0)
    untiered = LLM(folder, device="cpu", dtype="float32", **settings)
    expected = untiered.generate(prompt, params)
    runner = untiered._loop.engine.runner
    needed = runner.block_manager.pages_for(20_003) * runner.cache.page_bytes
    untiered.close()
    budgets = dict(
        kv_device_bytes=runner.cache.slots.numel() + needed // 10,
        kv_host_bytes=needed // 4,
        kv_disk_bytes=needed,
        kv_disk_path=str(tmp_path / "disk"),
    )
    tiered = LLM(folder, device="cpu", dtype="float32", **settings, **budgets)
    got = tiered.generate(prompt, params)
    stats = tiered.stats()
    tiered.close()
    assert got[0].outputs[0].token_ids == expected[0].outputs[0].token_ids
    assert (
        max(
            abs(a - b)
            for a, b in zip(
                chosen_logprobs_sampled(expected[0]), chosen_logprobs_sampled(got[0]), strict=True
            )
        )
        <= 1e-4
    )
    assert stats["kv_device_peak_bytes"] <= needed // 10
    assert stats["kv_host_peak_bytes"] > 0 and stats["kv_disk_peak_bytes"] > 0
    assert stats["kv_prefetch_misses"] > 0  # entries were fetched from slower tiers while steps ran


def chosen_logprobs_sampled(output) -> list[float]:
    return [e[t] for e, t in zip(output.outputs[0].logprobs, output.outputs[0].token_ids, strict=True)]


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        (dict(kv_host_bytes=1 << 20), "kv_host_bytes"),
        (dict(kv_disk_bytes=1 << 20, kv_disk_path="/tmp/x"), "kv_disk_bytes"),
        (dict(kv_device_bytes=1 << 20, kv_disk_bytes=1 << 20), "kv_disk_path"),
        (dict(kv_device_bytes=1 << 20, kv_cache_memory=1 << 20), "kv_device_bytes"),
        (dict(kv_device_bytes=0), "kv_device_bytes"),
        (dict(kv_device_bytes=1 << 20, kv_host_bytes=-5), "kv_host_bytes"),
        (dict(kv_device_bytes=1 << 20, kv_disk_bytes=1 << 20, kv_disk_path=7), "kv_disk_path"),
    ],
)
def test_bad_tier_settings_are_rejected_naming_the_field(settings, field):
    with pytest.raises(ValueError, match=field):
        EngineConfig(**settings)


@pytest.mark.parametrize(
    ("budgets", "field"),
    [
        (dict(kv_device_bytes=1000), "kv_device_bytes"),  # not even one page next to the slots
        (dict(kv_device_bytes=1 << 24, kv_host_bytes=10), "kv_host_bytes"),  # less than a page
    ],
)
def test_tier_budgets_too_small_for_a_page_fail_at_load_naming_the_field(tiny_checkpoint, budgets, field):
    with pytest.raises(ValueError, match=field):
        LLM(tiny_checkpoint, device="cpu", dtype="float32", **budgets)


def test_a_selective_device_tier_smaller_than_one_step_writes_is_rejected(tiny_checkpoint):
    probe = LLM(tiny_checkpoint, device="cpu", dtype="float32", max_num_seqs=4, kv_cache_memory=1 << 24)
    runner = probe._loop.engine.runner
    slots, page = runner.cache.slots.numel(), runner.cache.page_bytes
    probe.close()
    with pytest.raises(ValueError, match="kv_device_bytes.*max_num_batched_tokens"):
        LLM(tiny_checkpoint, device="cpu", dtype="float32", max_num_seqs=4, kv_device_bytes=slots + 3 * page)


def test_tied_indexer_rows_are_re_ranked_as_transformers_ranks_each_row_on_its_own():
    """A long prompt's prefill ties on thousands of queries: select_top_k re-ranks them in batches,
    and must pick exactly what a row-at-a-time ranking of each (padded to its own length) picks."""
    from inference.models.deepseek_v4_attention import select_top_k

    def one_row_at_a_time(scores, visible, hf_len, k):
        values, ids = scores.topk(k + 1, dim=-1)
        ids = ids[:, :k].clone()
        for row in ((visible > k) & (values[:, k - 1] == values[:, k])).nonzero().flatten().tolist():
            padded = scores.new_full((int(hf_len[row]),), float("-inf"))
            padded[: int(visible[row])] = scores[row, : int(visible[row])]
            ids[row] = padded.topk(k).indices
        return ids

    generator = torch.Generator().manual_seed(0)
    ties = 0
    for _ in range(20):
        queries, n = 48, int(torch.randint(10, 2000, (1,), generator=generator))
        scores = torch.relu(torch.randn(queries, n, generator=generator) - 1.5).round(decimals=1)
        visible = torch.randint(1, n + 1, (queries,), generator=generator)
        scores = scores.masked_fill(torch.arange(n)[None] >= visible[:, None], float("-inf"))
        prompt_rows = torch.rand(queries, generator=generator) < 0.5  # prompt queries: one longer row length
        hf_len = torch.where(prompt_rows, torch.full((queries,), n + 300), visible)
        values = scores.topk(9, dim=-1).values
        ties += int(((visible > 8) & (values[:, 7] == values[:, 8])).sum())
        ids, chosen = select_top_k(scores, visible, hf_len, 8)
        assert torch.equal(ids, one_row_at_a_time(scores, visible, hf_len, 8))
        assert torch.equal(chosen, ids < visible[:, None])
    assert ties > 100  # the case under test did occur
