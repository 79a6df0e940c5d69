"""The cache interface a family with heterogeneous caches (DeepSeek-V4) plugs into.

A toy model keeps a per-sequence state (how many tokens it has seen, in its slot) and a
compressed paged cache (the sum of every window of 4 token ids, one entry per window), and
predicts a token from nothing but those caches. Run through the engine with chunked prefill,
a tiny cache that forces preemption, and several requests at once, it must predict exactly
what a plain Python reference computes: slots, compressed block tables and zeroing all work.
"""

import pytest
import torch
from torch import nn

from inference import SamplingParams
from inference.detokenizer import IncrementalDetokenizer
from inference.engine import CacheGroup, CacheSpec, EngineConfig, ForwardContext, LLMEngine, Sequence
from inference.engine.block_manager import BlockManager
from inference.loader import load_tokenizer

VOCAB = 640
WINDOW = 4


class CountingModel(nn.Module):
    """Predicts (tokens seen + sum of the ids of every closed window of 4) % vocab."""

    max_model_len = 256

    def cache_spec(self) -> CacheSpec:
        return CacheSpec(
            (
                CacheGroup("windows", (0,), (16,), torch.float32, tokens_per_entry=WINDOW),  # sum in [0]
                CacheGroup("seen", (0,), (1,), torch.float32, per_sequence=True),
            )
        )

    def forward(self, input_ids, positions, ctx: ForwardContext) -> torch.Tensor:
        seen, sums, table = ctx.caches["seen"][0], ctx.caches["windows"][0], ctx.groups["windows"]
        out = []
        for i in range(ctx.num_seqs):
            slot = int(ctx.slots[i])
            for j in range(ctx.query_starts[i], ctx.query_starts[i + 1]):
                position, token = int(positions[j]), int(input_ids[j])
                seen[slot, 0] += 1
                assert int(seen[slot, 0]) == position + 1, "a slot was shared or not cleared"
                page, offset = table.slot(i, position // WINDOW)
                sums[page, offset, 0] += token
                closed = (position + 1) // WINDOW
                total = sum(float(sums[table.slot(i, k)][0]) for k in range(closed))
                out.append(position + 1 + total)
        return torch.tensor(out)[:, None]  # [T, 1]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return 10 * nn.functional.one_hot(hidden[:, 0].long() % VOCAB, VOCAB).float()


def expected_tokens(prompt: list[int], count: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(count):
        n = len(tokens)
        tokens.append(int(n + sum(tokens[: WINDOW * (n // WINDOW)])) % VOCAB)
    return tokens[len(prompt) :]


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return load_tokenizer(tiny_checkpoint)


def test_per_sequence_slots_and_compressed_pages_survive_batching_chunking_and_preemption(tokenizer):
    # block_size 2: a page is two 64-byte entries = 8 tokens; 10 usable pages cannot hold 6 requests.
    config = EngineConfig(
        max_num_seqs=4, max_num_batched_tokens=7, block_size=2, kv_cache_memory=4 * 64 + 11 * 128
    )
    engine = LLMEngine(CountingModel(), config, torch.device("cpu"), set(), torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, VOCAB, (n,), generator=generator).tolist() for n in (3, 9, 14, 1, 6, 11)]
    seqs = [
        Sequence(str(i), None, p, params, IncrementalDetokenizer(tokenizer, []))
        for i, p in enumerate(prompts)
    ]
    for seq in seqs:
        engine.add_request(seq)
    while engine.has_unfinished():
        engine.step()
        assert len(engine.scheduler.running) <= 4
    assert engine.stats.preemptions > 0
    assert [s.token_ids for s in seqs] == [expected_tokens(p, 16) for p in prompts]
    assert engine.runner.block_manager.num_free_pages == 10


def test_pages_are_counted_per_group_at_its_own_rate_and_slots_are_one_per_sequence(tokenizer):
    spec = CacheSpec(
        (
            CacheGroup("kv", (0, 1), (2, 1, 8), torch.float32),  # 128 bytes per token
            CacheGroup("compressed", (1,), (8,), torch.float32, tokens_per_entry=4),  # 32 bytes per 4 tokens
            CacheGroup("state", (0, 1), (3,), torch.float32, per_sequence=True),
        )
    )
    assert spec.page_bytes(16) == 2048
    assert spec.page_entries(spec.groups[1], 16) == 64  # 256 tokens per page
    manager = BlockManager(spec, num_pages=6, num_slots=1, block_size=16)
    seq = Sequence("a", None, [1] * 20, SamplingParams(), IncrementalDetokenizer(tokenizer, []))
    other = Sequence("b", None, [1], SamplingParams(), IncrementalDetokenizer(tokenizer, []))
    assert manager.pages_for(20) == 2 + 1
    manager.grow(seq, 20)
    assert [len(t) for t in seq.block_tables] == [2, 1] and seq.slot == 0
    assert not manager.can_grow(other, 1)  # the only slot is taken
    assert manager.max_tokens_per_sequence() == 64  # 4 kv pages + 1 compressed page in 5 usable pages
    manager.free(seq)
    assert manager.num_free_pages == 5 and manager.can_grow(other, 1)
