"""Continuous batching, chunked prefill, preemption and seeded sampling on the native engine.

Batching must not change results: many prompts decoded together give what each gives alone, and
what transformers gives; prompts split into chunks give what a one-shot prefill gives; requests
preempted when the cache runs out still finish, with the same tokens.
"""

import pytest
import torch
from transformers import AutoConfig

from inference import LLM, SamplingParams
from inference.detokenizer import IncrementalDetokenizer
from inference.engine import EngineConfig, LLMEngine, Sequence
from inference.loader import load_tokenizer
from inference.models import load_model
from tests.inference.test_qwen3_moe_model import build_qwen3_moe_checkpoint, reference

pytestmark = pytest.mark.usefixtures("single_threaded_torch")

GREEDY = SamplingParams(temperature=0, max_tokens=6)  # stops at eos, as transformers' generate does


def mixed_prompts(count: int, seed: int = 0) -> list[list[int]]:
    """`count` token-id prompts from 1 to ~120 tokens long."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [1 + (i * 37) % 120 for i in range(count)]
    return [torch.randint(7, 640, (n,), generator=generator).tolist() for n in lengths]


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint, tmp_path_factory):
    return build_qwen3_moe_checkpoint(tmp_path_factory.mktemp("qwen3-moe-batching"), tiny_checkpoint, seed=2)


@pytest.fixture(scope="module")
def llm(checkpoint):
    engine = LLM(checkpoint, device="cpu", dtype="float32", max_num_batched_tokens=96)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def hf_model(checkpoint):
    return reference(checkpoint)


def make_engine(checkpoint, **settings) -> tuple[LLMEngine, object]:
    config = AutoConfig.from_pretrained(checkpoint)
    model = load_model(checkpoint, config, torch.device("cpu"), torch.float32)
    engine = LLMEngine(
        model, EngineConfig(**settings), torch.device("cpu"), {1}, torch.Generator().manual_seed(0)
    )
    return engine, load_tokenizer(checkpoint)


def new_sequence(tokenizer, request_id: str, prompt: list[int], params: SamplingParams) -> Sequence:
    return Sequence(request_id, None, prompt, params, IncrementalDetokenizer(tokenizer, params.stop))


# -- batched equals alone equals transformers ----------------------------------------------------


def test_32_prompts_batched_give_the_same_greedy_tokens_as_one_at_a_time_and_as_transformers(llm, hf_model):
    prompts = mixed_prompts(32)
    before = llm.stats()["steps"]
    batched = llm.generate(prompts, GREEDY)
    stats = llm.stats()
    assert stats["max_batch_size"] >= 8  # prompts join as the 96-token budget allows, and leave when done
    assert stats["steps"] - before < 32 * GREEDY.max_tokens / 4  # steps were shared

    alone = [llm.generate(p, GREEDY)[0] for p in prompts]
    assert [o.token_ids for o in batched] == [o.token_ids for o in alone]
    for prompt, out in zip(prompts, batched, strict=True):
        with torch.no_grad():
            expected = hf_model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=6)
        assert out.token_ids == expected[0, len(prompt) :].tolist()


def test_prompt_logprobs_of_32_batched_prompts_match_transformers_within_1e_3(llm, hf_model):
    prompts = mixed_prompts(32, seed=1)
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1))
    worst = 0.0
    for prompt, out in zip(prompts, outputs, strict=True):
        with torch.no_grad():
            expected = torch.log_softmax(hf_model(torch.tensor([prompt])).logits[0], dim=-1)
        assert len(out.prompt_logprobs) == len(prompt)
        for position in range(1, len(prompt)):
            worst = max(
                worst,
                abs(
                    out.prompt_logprobs[position][prompt[position]] - expected[position - 1, prompt[position]]
                ),
            )
    assert worst <= 1e-3


def test_chunked_prefill_gives_the_same_tokens_and_logprobs_as_a_one_shot_prefill(checkpoint):
    prompts = mixed_prompts(6, seed=3)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, prompt_logprobs=2, logprobs=2)
    chunked = LLM(checkpoint, device="cpu", max_num_batched_tokens=5)
    one_shot = LLM(checkpoint, device="cpu", max_num_batched_tokens=4096)
    try:
        a, b = chunked.generate(prompts, params), one_shot.generate(prompts, params)
    finally:
        chunked.close()
        one_shot.close()
    for x, y in zip(a, b, strict=True):
        assert x.token_ids == y.token_ids
        for left, right in zip(
            x.prompt_logprobs[1:] + x.logprobs, y.prompt_logprobs[1:] + y.logprobs, strict=True
        ):
            assert list(left) == list(right)
            assert list(left.values()) == pytest.approx(list(right.values()), abs=1e-4)


def test_a_long_prompt_is_prefilled_in_chunks_while_a_running_request_keeps_decoding(checkpoint):
    engine, tokenizer = make_engine(checkpoint, max_num_batched_tokens=16)
    short = new_sequence(
        tokenizer, "short", [5, 6, 7], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    )
    engine.add_request(short)
    engine.step()
    long_prompt = torch.randint(7, 640, (110,), generator=torch.Generator().manual_seed(4)).tolist()
    long = new_sequence(tokenizer, "long", long_prompt, SamplingParams(temperature=0, max_tokens=2))
    engine.add_request(long)
    steps_until_long_starts = 0
    while not long.token_ids:
        events = engine.step()
        steps_until_long_starts += 1
        assert short in [seq for seq, _ in events]  # one token for the short request at every step
        assert long.num_computed_tokens <= 15 * steps_until_long_starts  # chunks fit beside the decode
    assert steps_until_long_starts == -(-long.num_prompt_tokens // 15)


# -- preemption ------------------------------------------------------------------------------------


def test_requests_preempted_when_the_cache_runs_out_all_finish_with_the_same_output(checkpoint, llm):
    prompts = mixed_prompts(8, seed=5)
    params = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=1)] * 6 + [
        SamplingParams(temperature=0.8, seed=s, max_tokens=24, ignore_eos=True) for s in (1, 2)
    ]
    page_bytes = 3 * 16 * 2 * 2 * 16 * 4  # layers * block_size * (K, V) * kv_heads * head_dim * float32
    small = LLM(checkpoint, device="cpu", kv_cache_memory=25 * page_bytes, max_num_batched_tokens=64)
    try:
        tight = small.generate(prompts, params)
        stats = small.stats()
    finally:
        small.close()
    roomy = llm.generate(prompts, params)
    assert stats["preemptions"] > 0
    assert stats["kv_pages_total"] == 24
    assert all(o.finish_reason == "length" for o in tight)
    assert [o.token_ids for o in tight] == [o.token_ids for o in roomy]
    assert [o.text for o in tight] == [o.text for o in roomy]
    for x, y in zip(tight[:6], roomy[:6], strict=True):
        assert [list(e) for e in x.logprobs] == [list(e) for e in y.logprobs]


def test_a_preempted_request_recomputes_and_continues_where_it_stopped(checkpoint):
    engine, tokenizer = make_engine(checkpoint, kv_cache_memory=5 * 12288, max_num_batched_tokens=64)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    # 4 pages of 16 tokens: each request (20 + 40 tokens) fits alone, both together do not.
    first = new_sequence(tokenizer, "first", [9] * 20, params)
    second = new_sequence(tokenizer, "second", [10] * 20, params)
    engine.add_request(first)
    engine.add_request(second)
    while engine.has_unfinished():
        engine.step()
    assert engine.stats.preemptions >= 1
    assert second.num_preemptions >= 1 and first.num_preemptions == 0
    assert len(first.token_ids) == len(second.token_ids) == 40
    reference_engine, _ = make_engine(checkpoint)
    alone = new_sequence(tokenizer, "alone", [10] * 20, params)
    reference_engine.add_request(alone)
    while reference_engine.has_unfinished():
        reference_engine.step()
    assert second.token_ids == alone.token_ids
    assert engine.runner.block_manager.num_free_pages == 4


# -- seeded sampling -------------------------------------------------------------------------------


def test_a_seeded_request_samples_the_same_tokens_alone_or_in_a_batch(llm):
    prompts = mixed_prompts(6, seed=6)
    params = [
        SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=100 + i, max_tokens=12, ignore_eos=True)
        for i in range(6)
    ]
    alone = [llm.generate(p, sp)[0].token_ids for p, sp in zip(prompts, params, strict=True)]
    noise = mixed_prompts(10, seed=7)
    batched = llm.generate(prompts + noise, params + [SamplingParams(temperature=1.0, max_tokens=12)] * 10)
    assert [o.token_ids for o in batched[:6]] == alone
    assert len({tuple(t) for t in alone}) == 6
