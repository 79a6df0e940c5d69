"""Prefix caching against the uncached engine: same tokens, same log-probabilities, real hits.

Each case runs one workload twice, with enable_prefix_caching on and off and otherwise the same
settings, and compares greedy tokens (identical) and the sampled tokens' log-probabilities
(within 1e-4, float32). Prompts share prefixes of several lengths, on and off block boundaries,
sent one after another (later ones hit what earlier ones cached) and all at once. The models:
the tiny random DeepSeek-V4 (paged compressed groups plus per-sequence rings, restored from the
snapshot a hit ends at), a second V4 of another shape, a tiny Qwen3-MoE and models/demo-v4.
"""

from pathlib import Path
from unittest.mock import patch

import pytest
import torch

from inference import LLM, LoRARequest, SamplingParams
from inference.engine.block_manager import BlockManager
from inference.engine.cache import CacheGroup, CacheSpec
from inference.engine.config import EngineConfig
from inference.engine.prefix_cache import block_hash
from inference.engine.scheduler import Scheduler
from inference.engine.sequence import Sequence

from .conftest import build_second_v4_checkpoint
from .test_lora_serving import V4_TARGETS, make_adapter
from .test_qwen3_moe_model import build_qwen3_moe_checkpoint

DEMO = Path(__file__).resolve().parents[2] / "models" / "demo-v4"
GREEDY = SamplingParams(temperature=0, max_tokens=6, logprobs=0, ignore_eos=True)
TOLERANCE = 1e-4


pytestmark = pytest.mark.usefixtures("single_threaded_torch")


def shared_prefix_prompts(vocab: int, base_len: int, seed: int = 0) -> list[list[int]]:
    """Prompts over one base text: prefixes of several lengths (block-aligned and not) plus own tails."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(3, vocab, (base_len,), generator=g).tolist()
    cuts = [base_len, base_len - 1, base_len // 2 + 3, base_len // 3, 7, base_len]
    tails = [5, 0, 4, 9, 3, 1]
    return [
        base[:c] + torch.randint(3, vocab, (t,), generator=g).tolist()
        for c, t in zip(cuts, tails, strict=True)
    ]


def run(path, prompts, on: bool, salts=None, lora=None, **settings):
    """Sequential then concurrent generation; returns (outputs, stats)."""
    llm = LLM(model=path, device="cpu", dtype="float32", seed=0, enable_prefix_caching=on, **settings)
    try:
        outputs = [llm.generate([p], GREEDY, lora, salts)[0] for p in prompts]
        outputs += llm.generate(prompts, GREEDY, lora, salts)
        return outputs, llm.stats()
    finally:
        llm.close()


def assert_same(cached, uncached) -> None:
    for a, b in zip(cached, uncached, strict=True):
        ta, tb = a.outputs[0].token_ids, b.outputs[0].token_ids
        assert ta == tb
        la = [entry[t] for entry, t in zip(a.outputs[0].logprobs, ta, strict=True)]
        lb = [entry[t] for entry, t in zip(b.outputs[0].logprobs, tb, strict=True)]
        assert max(abs(x - y) for x, y in zip(la, lb, strict=True)) <= TOLERANCE


def check_model(path, vocab, base_len, expect_hits=True, **settings) -> dict:
    prompts = shared_prefix_prompts(vocab, base_len)
    cached, stats = run(path, prompts, True, **settings)
    uncached, off_stats = run(path, prompts, False, **settings)
    assert_same(cached, uncached)
    assert "prefix_hits" not in off_stats
    if expect_hits:
        assert stats["prefix_hits"] > 0
        assert stats["prefill_tokens"] < off_stats["prefill_tokens"]
    return stats


@pytest.fixture(scope="module")
def wide_indexer_v4(tmp_path_factory):
    """The tiny V4 with 16 indexer heads: its random indexer scores almost never tie exactly, so
    its prompts' blocks are cacheable (the tiny V4's 4 heads tie within a few dozen tokens)."""
    from inference import tiny_checkpoint

    with patch.dict(tiny_checkpoint.CONFIG_KWARGS, index_n_heads=16):
        return tiny_checkpoint.build_tiny_checkpoint(tmp_path_factory.mktemp("wide-indexer-v4"), seed=5)


def test_a_tiny_v4_gives_the_same_tokens_and_logprobs_with_prefix_hits(wide_indexer_v4):
    stats = check_model(wide_indexer_v4, 500, 110, block_size=2, max_num_batched_tokens=40)
    assert stats["prefix_block_tokens"] == 48  # lcm of 8 tokens per CSA page and 48 per HCA page


def test_v4_blocks_after_an_indexer_tie_are_reused_only_by_prompts_that_break_it_alike(tiny_checkpoint):
    """The tiny V4 ties within its first block. transformers breaks the tie on a row of
    prompt_len // 4 entries (the CSA rate), so what a prompt computed from there on is reused by
    prompts whose length has the same quotient and by no other (Sequence.first_tie, tied_block_hash)."""
    check_model(tiny_checkpoint, 500, 110, expect_hits=False, block_size=2, max_num_batched_tokens=40)
    prompt = shared_prefix_prompts(500, 110)[0]  # 115 tokens: 115 // 4 = 28
    same_length, shorter, longer = prompt[:-1] + [4], prompt[:-1], prompt + [4]  # 115, 114 (28), 116 (29)
    settings = dict(block_size=2, max_num_batched_tokens=40)
    llm = LLM(model=tiny_checkpoint, device="cpu", dtype="float32", **settings)
    try:
        assert hits_after(llm, prompt) == 0
        blocks = llm._loop.engine.runner.block_manager.prefix.blocks.values()
        assert blocks and all(block.tied for block in blocks)  # the tie is in the first block
        assert hits_after(llm, longer) == 0
        assert hits_after(llm, same_length) == 96  # both blocks its 114 reusable tokens span
        assert hits_after(llm, shorter) == 96
        outputs = [llm.generate([p], GREEDY)[0] for p in (same_length, shorter, longer)]  # from the cache
    finally:
        llm.close()
    uncached, _ = run(tiny_checkpoint, [same_length, shorter, longer], False, **settings)
    assert_same(outputs, uncached[:3])


def test_a_second_v4_shape_gives_the_same_tokens_and_logprobs_with_the_prefix_cache(
    tiny_checkpoint, tmp_path
):
    folder = build_second_v4_checkpoint(tmp_path / "second-v4", tiny_checkpoint)
    check_model(folder, 96, 70, expect_hits=False, block_size=1, max_num_batched_tokens=32)


def test_a_tiny_qwen3_moe_gives_the_same_tokens_and_logprobs_with_prefix_hits(tiny_checkpoint, tmp_path):
    folder = build_qwen3_moe_checkpoint(tmp_path / "qwen", tiny_checkpoint, seed=4)
    stats = check_model(folder, 500, 90, block_size=4, max_num_batched_tokens=48)
    assert stats["prefix_block_tokens"] == 4


def test_demo_v4_gives_the_same_tokens_and_logprobs_with_prefix_hits():
    stats = check_model(DEMO, 1000, 420, block_size=4, max_num_batched_tokens=256)
    assert stats["prefix_block_tokens"] == 192


def test_preemption_and_eviction_under_a_small_cache_change_no_token(wide_indexer_v4):
    one, other = shared_prefix_prompts(500, 100, seed=1), shared_prefix_prompts(500, 100, seed=9)
    prompts = (one + other) * 2  # two prefixes computed at once (one request of each; the others wait)
    settings = dict(block_size=2, max_num_seqs=4, kv_cache_memory=4 * 22528 + 50 * 768)
    cached, stats = run(wide_indexer_v4, prompts, True, **settings)
    uncached, _ = run(wide_indexer_v4, prompts, False, **settings)
    assert_same(cached, uncached)
    assert stats["preemptions"] > 0 and stats["prefix_evictions"] > 0 and stats["prefix_hits"] > 0


def hits_after(llm, prompt, **kwargs) -> int:
    before = llm.stats()["prefix_hits"]
    llm.generate([prompt], GREEDY, **kwargs)
    return llm.stats()["prefix_hits"] - before


def tier_settings(path, tmp_path, device_pages: int, host_pages: int, disk_pages: int, **settings) -> dict:
    """KV tiers of that many pages each (the device tier also holds the per-sequence slots)."""
    probe = LLM(model=path, device="cpu", dtype="float32", kv_cache_memory=1 << 22, **settings)
    runner = probe._loop.engine.runner
    page, slots = runner.cache.page_bytes, runner.cache.slots.numel()
    probe.close()
    return dict(
        kv_device_bytes=slots + device_pages * page,
        kv_host_bytes=host_pages * page,
        kv_disk_bytes=disk_pages * page,
        kv_disk_path=str(tmp_path / "kv-disk"),
    )


@pytest.mark.parametrize("tiered", [False, True], ids=["untiered", "kv-tiers"])
def test_a_salt_hits_only_its_own_cached_prefixes(wide_indexer_v4, tmp_path, tiered):
    prompts = shared_prefix_prompts(500, 110, seed=2)
    settings = dict(block_size=2, max_num_seqs=4, max_num_batched_tokens=48)
    if tiered:
        settings.update(tier_settings(wide_indexer_v4, tmp_path, 120, 40, 2000, **settings))
    llm = LLM(model=wide_indexer_v4, device="cpu", dtype="float32", **settings)
    try:
        assert hits_after(llm, prompts[0], cache_salt="team-a") == 0
        assert hits_after(llm, prompts[2], cache_salt="team-b") == 0
        assert hits_after(llm, prompts[2]) == 0  # no salt is a namespace of its own
        assert hits_after(llm, prompts[2], cache_salt="team-a") == 48  # its 56-token prefix: one block
        assert hits_after(llm, prompts[1], cache_salt="team-a") == 96
    finally:
        llm.close()


def test_lora_requests_never_hit_another_adapters_cached_prefix(wide_indexer_v4, tmp_path):
    first = make_adapter(wide_indexer_v4, tmp_path / "a", V4_TARGETS, seed=1)
    second = make_adapter(wide_indexer_v4, tmp_path / "b", V4_TARGETS, seed=2)
    prompt = shared_prefix_prompts(500, 110, seed=3)[0]
    llm = LLM(model=wide_indexer_v4, device="cpu", dtype="float32", block_size=2)
    try:
        a, b = LoRARequest("a", str(first)), LoRARequest("b", str(second))
        assert hits_after(llm, prompt, lora_request=a) == 0
        assert hits_after(llm, prompt, lora_request=b) == 0
        assert hits_after(llm, prompt) == 0
        assert (
            hits_after(llm, prompt, lora_request=LoRARequest("b", str(first))) == 0
        )  # same name, other weights
        assert hits_after(llm, prompt, lora_request=b) == 96
        with_cache = llm.generate([prompt], GREEDY, lora_request=b)[0]
    finally:
        llm.close()
    without, _ = run(wide_indexer_v4, [prompt], False, lora=b, block_size=2)
    assert_same([with_cache], without[:1])


def test_prompt_logprobs_requests_bypass_the_cache_and_get_every_position(wide_indexer_v4):
    prompt = shared_prefix_prompts(500, 110, seed=4)[0]
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    outputs = []
    for on in (True, False):
        llm = LLM(
            model=wide_indexer_v4, device="cpu", dtype="float32", block_size=2, enable_prefix_caching=on
        )
        try:
            llm.generate([prompt], GREEDY)
            outputs.append(llm.generate([prompt], params)[0])
            if on:
                assert llm.stats()["prefix_hits"] == 0
        finally:
            llm.close()
    got = [e[t] for e, t in zip(outputs[0].prompt_logprobs[1:], prompt[1:], strict=True)]
    want = [e[t] for e, t in zip(outputs[1].prompt_logprobs[1:], prompt[1:], strict=True)]
    assert max(abs(x - y) for x, y in zip(got, want, strict=True)) <= TOLERANCE


def test_unused_cached_blocks_are_evicted_least_recently_used_first():
    spec = CacheSpec((CacheGroup("kv", (0,), (2, 1, 4), torch.float32),))
    manager = BlockManager(spec, num_pages=5, num_slots=0, block_size=2, prefix_caching=True)

    def sequence(tokens):
        seq = Sequence("r", None, tokens, SamplingParams(), detokenizer=None)
        hit = manager.cached_prefix(seq)
        manager.grow(seq, seq.num_tokens, hit)
        seq.num_computed_tokens = seq.num_tokens
        manager.cache_blocks(seq)
        return seq, hit

    first, _ = sequence([1, 2, 3, 4, 5])  # blocks [1, 2] and [3, 4], one private page
    manager.free(first)
    assert manager.num_free_pages == 4 and manager.prefix.stats()["prefix_cached_blocks"] == 2
    second, hit = sequence([1, 2, 3, 4, 9])
    assert len(hit) == 2 and hit[0].ref == 1
    manager.free(second)
    third, hit = sequence([7, 7, 8, 8, 6, 6, 5])  # needs 4 pages: evicts [3, 4] (deepest) first, then [1, 2]
    assert hit == [] and manager.prefix.evictions == 2
    manager.free(third)


def test_block_hashes_depend_on_the_parent_the_salt_and_the_adapter():
    root = block_hash(None, None, None, [1, 2])
    assert block_hash(None, None, None, [1, 2]) == root
    assert (
        len(
            {
                root,
                block_hash(None, "s", None, [1, 2]),
                block_hash(None, None, "a", [1, 2]),
                block_hash(root, None, None, [1, 2]),
                block_hash(None, None, None, [2, 1]),
            }
        )
        == 5
    )


def test_enable_prefix_caching_must_be_a_boolean():
    with pytest.raises(ValueError, match="enable_prefix_caching must be true or false"):
        EngineConfig(enable_prefix_caching="yes")


def test_a_cache_salt_must_be_a_string(tiny_checkpoint):
    llm = LLM(model=tiny_checkpoint, device="cpu", dtype="float32", block_size=2)
    try:
        with pytest.raises(ValueError, match="cache_salt must be a string"):
            llm.generate([[5, 6, 7]], GREEDY, cache_salt=[7])
        with pytest.raises(ValueError, match="pass one cache_salt string"):
            llm.generate([[5, 6, 7]], GREEDY, cache_salt=7)
    finally:
        llm.close()


def test_cached_prefixes_in_kv_tiers_give_the_same_tokens_as_an_untiered_uncached_engine(
    tiny_checkpoint, tmp_path
):
    """A Qwen3-MoE's cached blocks are logical pages like any other: they work from any tier."""
    folder = build_qwen3_moe_checkpoint(tmp_path / "qwen", tiny_checkpoint, seed=4)
    settings = dict(max_num_seqs=4, max_num_batched_tokens=40)
    probe = LLM(model=folder, device="cpu", dtype="float32", kv_cache_memory=1 << 22, **settings)
    page = probe._loop.engine.runner.cache.page_bytes
    probe.close()
    tiers = dict(
        kv_device_bytes=12 * page,
        kv_host_bytes=30 * page,
        kv_disk_bytes=400 * page,
        kv_disk_path=str(tmp_path / "d"),
    )
    first, second = shared_prefix_prompts(500, 100, seed=5), shared_prefix_prompts(500, 100, seed=6)
    prompts = first + second + first  # the second set pushes the first one's cached pages down a tier
    cached, stats = run(folder, prompts, True, **settings, **tiers)
    uncached, _ = run(folder, prompts, False, **settings)
    assert_same(cached, uncached)
    assert stats["prefix_hits"] > 0 and stats["kv_evictions"] > 0, stats


def test_v4_cached_prefixes_in_kv_tiers_give_the_same_tokens_and_logprobs_as_a_plain_engine(
    wide_indexer_v4, tmp_path
):
    """DeepSeek-V4's cached blocks and their slot snapshots are logical pages like any other: pushed
    down to the host and disk tiers by later prompts, they are reused from there."""
    settings = dict(block_size=2, max_num_seqs=4, max_num_batched_tokens=40)
    tiers = tier_settings(wide_indexer_v4, tmp_path, 90, 30, 3000, **settings)
    first, second = shared_prefix_prompts(500, 100, seed=5), shared_prefix_prompts(500, 100, seed=6)
    prompts = first + second + first  # the second set pushes the first one's cached pages down a tier
    cached, stats = run(wide_indexer_v4, prompts, True, **settings, **tiers)
    plain, _ = run(wide_indexer_v4, prompts, False, **settings)
    assert_same(cached, plain)
    assert stats["prefix_hits"] > 0 and stats["kv_evictions"] > 0 and stats["kv_prefetch_hits"] > 0, stats


def test_requests_arriving_together_compute_their_shared_prefix_once(wide_indexer_v4):
    """All at once, the first request computes the shared prefix and the others wait for it to be
    cached (prefix-aware admission) instead of computing it alongside: every other one hits it."""
    g = torch.Generator().manual_seed(8)
    base = torch.randint(3, 500, (200,), generator=g).tolist()
    prompts = [base + torch.randint(3, 500, (10,), generator=g).tolist() for _ in range(8)]
    settings = dict(block_size=2, max_num_seqs=8, max_num_batched_tokens=64)
    llm = LLM(model=wide_indexer_v4, device="cpu", dtype="float32", **settings)
    try:
        cached = llm.generate(prompts, GREEDY)
        stats = llm.stats()
    finally:
        llm.close()
    plain = LLM(model=wide_indexer_v4, device="cpu", dtype="float32", enable_prefix_caching=False, **settings)
    try:
        assert_same(cached, plain.generate(prompts, GREEDY))
    finally:
        plain.close()
    assert stats["prefix_hits"] == 7 * 192  # the 4 blocks of 48 tokens under the 200 shared ones


def test_a_waiting_request_is_held_for_a_prefix_being_computed_and_others_pass_it():
    spec = CacheSpec((CacheGroup("kv", (0,), (2, 1, 4), torch.float32),))
    manager = BlockManager(spec, num_pages=64, num_slots=0, block_size=2, prefix_caching=True)
    scheduler = Scheduler(EngineConfig(max_num_seqs=8, max_num_batched_tokens=10, block_size=2), manager)
    first = Sequence("first", None, list(range(1, 9)), SamplingParams(), detokenizer=None)
    sharing = Sequence("sharing", None, list(range(1, 11)), SamplingParams(), detokenizer=None)
    other = Sequence("other", None, [20, 21, 22], SamplingParams(), detokenizer=None)
    for seq in (first, sharing, other):
        scheduler.add(seq)
    batch = scheduler.schedule()
    assert batch.seqs == [first, other] and batch.num_tokens == [8, 2]  # `sharing` waits, `other` passes
    scheduler.commit(batch)
    first.token_ids.append(5)
    batch = scheduler.schedule()
    assert batch.seqs[-1] is sharing and sharing.num_computed_tokens == 8  # it starts from the cache
    assert manager.prefix.hit_tokens == 8
