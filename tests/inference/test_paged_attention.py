"""Decode attention over the paged cache equals attention computed per sequence, for batches
attended in one group and in several length-sorted groups or one sequence at a time, with and
without a sliding window, whatever order the pages lie in; and freed pages are reused last-freed first."""

import random

import pytest
import torch

from inference.engine.block_manager import BlockManager
from inference.engine.cache import CacheGroup, CacheSpec
from inference.engine.context import ForwardContext
from inference.layers import attention


def _decode_step(seed: int, num_seqs: int, page_entries: int):
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    lens = [rng.randint(1, 300) for _ in range(num_seqs)]
    needed = [-(-n // page_entries) for n in lens]
    pages = list(range(1, sum(needed) + 40))
    rng.shuffle(pages)  # pages in any order, with free ones between them
    tables, taken = [], 0
    for count in needed:
        tables.append(pages[taken : taken + count])
        taken += count
    width = max(needed)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    # Each page holds two layers, as the engine's PagedCache lays them out: the layer is a strided view.
    pool = torch.randn(len(pages) + 1, 2, page_entries, 2, 2, 16, generator=generator)
    cache = pool[:, 1]
    q = torch.randn(num_seqs, 4, 16, generator=generator)
    return q, cache, block_tables, lens


def _context(lens):
    return ForwardContext(
        query_lens=[1] * len(lens),
        context_lens=lens,
        query_starts=list(range(len(lens) + 1)),
        num_decodes=len(lens),
        decode_context_lens=torch.tensor(lens),
        prompt_lens=lens,
        groups={},
        slots=None,
        caches={},
    )


@pytest.mark.parametrize("decode", ["_decode", "_decode_each"])  # grouped (GPUs), one sequence at a time (CPUs)
@pytest.mark.parametrize("sliding_window", [None, 50])
@pytest.mark.parametrize("num_seqs", [5, 3 * attention.DECODE_GROUP + 2])  # one group; several groups
def test_decode_equals_attention_computed_per_sequence(num_seqs, sliding_window, decode):
    q, cache, block_tables, lens = _decode_step(num_seqs, num_seqs=num_seqs, page_entries=8)
    out = getattr(attention, decode)(q, cache, block_tables, _context(lens), 0.25, sliding_window)
    for i, n in enumerate(lens):
        first = 0 if sliding_window is None else max(n - sliding_window, 0)
        kv = cache[block_tables[i]].flatten(0, 1)[first:n]  # [n', 2, Hkv, D]
        k, v = kv[:, 0].repeat_interleave(2, dim=1), kv[:, 1].repeat_interleave(2, dim=1)  # GQA: 2 q heads per kv head
        probs = torch.softmax(torch.einsum("hd,nhd->hn", q[i], k) * 0.25, dim=-1)
        torch.testing.assert_close(out[i], torch.einsum("hn,nhd->hd", probs, v), atol=1e-5, rtol=1e-5)


def test_freed_pages_are_reused_last_freed_first():
    spec = CacheSpec((CacheGroup("kv", (0,), (2, 1, 4), torch.float32),))
    manager = BlockManager(spec, num_pages=20, num_slots=0, block_size=4)

    class Seq:
        block_tables: list = []
        slot = None

    first, second = Seq(), Seq()
    manager.grow(first, 12)  # 3 pages
    manager.grow(second, 8)  # 2 pages
    assert first.block_tables == [[1, 2, 3]] and second.block_tables == [[4, 5]]
    manager.free(first)
    third = Seq()
    manager.grow(third, 16)  # reuses 1, 2, 3 (already touched memory) before any new page
    assert third.block_tables == [[1, 2, 3, 6]]
