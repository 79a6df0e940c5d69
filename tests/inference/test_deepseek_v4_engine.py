"""DeepSeek-V4 served by `inference.LLM` on the engine's scheduler, against transformers.

Continuous batching, chunked prefill and preemption must not change results: 32 prompts decoded
together give what each gives alone and what transformers' generate() gives one unpadded
sequence at a time; a tiny token budget (prompts in many chunks) and a tiny cache (requests
preempted and recomputed) give the same tokens again and give every page back. Each test runs on
the tiny V4 checkpoint and on a second V4 config with other windows, rates and shapes.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from inference import LLM, RequestOutput, SamplingParams
from inference.engine.block_manager import BlockManager
from inference.models.deepseek_v4_cache import V4CacheLayout

pytestmark = pytest.mark.usefixtures("single_threaded_torch")

DEMO = Path(__file__).resolve().parents[2] / "models" / "demo-v4"
GREEDY = SamplingParams(temperature=0, max_tokens=6)  # stops at eos, as transformers' generate does
GREEDY_WITH_LOGPROBS = SamplingParams(temperature=0, max_tokens=6, prompt_logprobs=0, logprobs=0)


def mixed_prompts(count: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """`count` token-id prompts from 1 to 100 tokens long."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [1 + (i * 37) % 100 for i in range(count)]
    return [torch.randint(7, vocab, (n,), generator=generator).tolist() for n in lengths]


@dataclass
class Served:
    """One V4 checkpoint served by an LLM, and the 32 prompts it decoded together."""

    folder: Path
    hf: object
    llm: LLM
    prompts: list[list[int]]
    batched: list[RequestOutput]
    batched_stats: dict


@pytest.fixture(scope="module", params=["tiny", "second"])
def served(request, tiny_checkpoint):
    if request.param == "tiny":
        folder, hf, vocab = tiny_checkpoint, request.getfixturevalue("hf_model"), 640
    else:
        folder = request.getfixturevalue("second_v4_checkpoint")
        hf, vocab = request.getfixturevalue("second_v4_hf_model"), 96
    llm = LLM(folder, device="cpu", dtype="float32")
    prompts = mixed_prompts(32, vocab)
    batched = llm.generate(prompts, GREEDY_WITH_LOGPROBS)
    yield Served(folder, hf, llm, prompts, batched, llm.stats())
    llm.close()


def small_cache_bytes(folder: Path, max_num_seqs: int, block_size: int, longest: int) -> int:
    """Cache memory for `max_num_seqs` slots and pages for 1.5 sequences of `longest` tokens."""
    spec = V4CacheLayout.from_config(AutoConfig.from_pretrained(folder)).cache_spec(torch.float32)
    pages = BlockManager(spec, 2, 0, block_size).pages_for(longest) * 3 // 2
    return max_num_seqs * spec.slot_bytes + (pages + 1) * spec.page_bytes(block_size)


def assert_same_outputs(ours: list[RequestOutput], expected: list[RequestOutput]) -> None:
    assert [o.token_ids for o in ours] == [o.token_ids for o in expected]
    assert [o.text for o in ours] == [o.text for o in expected]
    assert [o.finish_reason for o in ours] == [o.finish_reason for o in expected]
    for a, b in zip(ours, expected, strict=True):
        for left, right in zip(a.prompt_logprobs[1:] + a.logprobs, b.prompt_logprobs[1:] + b.logprobs, strict=True):
            assert list(left) == list(right)
            assert list(left.values()) == pytest.approx(list(right.values()), abs=1e-4)


def test_32_mixed_length_prompts_batched_give_the_greedy_tokens_of_one_at_a_time_and_of_transformers(served):
    stats = served.batched_stats
    assert stats["backend"] == "citadel"
    assert stats["max_batch_size"] >= 16  # the prompts shared steps
    alone = [served.llm.generate(p, GREEDY_WITH_LOGPROBS)[0] for p in served.prompts]
    assert_same_outputs(served.batched, alone)
    for prompt, out in zip(served.prompts, served.batched, strict=True):
        with torch.no_grad():
            expected = served.hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=6)
        assert out.token_ids == expected[0, len(prompt) :].tolist(), f"prompt of {len(prompt)} tokens"


def test_prompt_logprobs_of_the_32_batched_prompts_are_within_1e_3_of_transformers(served):
    worst = 0.0
    for prompt, out in zip(served.prompts, served.batched, strict=True):
        with torch.no_grad():
            expected = torch.log_softmax(served.hf(torch.tensor([prompt])).logits[0].float(), dim=-1)
        assert len(out.prompt_logprobs) == len(prompt)
        for position in range(1, len(prompt)):
            token = prompt[position]
            worst = max(worst, abs(out.prompt_logprobs[position][token] - expected[position - 1, token].item()))
    assert worst <= 1e-3


def test_chunked_prefill_with_a_tiny_token_budget_gives_identical_output(served):
    chunked = LLM(served.folder, device="cpu", dtype="float32", max_num_batched_tokens=9)
    try:
        outputs = chunked.generate(served.prompts[:12], GREEDY_WITH_LOGPROBS)
        stats = chunked.stats()
    finally:
        chunked.close()
    assert stats["max_batch_size"] >= 2  # decodes ran beside the chunks
    assert_same_outputs(outputs, served.batched[:12])


def test_preemption_under_a_tiny_cache_completes_every_request_identically_and_frees_every_page(served):
    prompts = served.prompts[:12]
    params = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0, prompt_logprobs=0)] * 10 + [
        SamplingParams(temperature=0.8, seed=s, max_tokens=24, ignore_eos=True, logprobs=0, prompt_logprobs=0)
        for s in (1, 2)
    ]
    memory = small_cache_bytes(served.folder, 4, 4, max(map(len, prompts)) + 24)
    small = LLM(served.folder, device="cpu", dtype="float32", max_num_seqs=4, block_size=4, kv_cache_memory=memory)
    try:
        tight = small.generate(prompts, params)
        stats = small.stats()
    finally:
        small.close()
    assert stats["preemptions"] > 0
    assert (stats["running"], stats["waiting"]) == (0, 0)
    assert stats["kv_pages_free"] == stats["kv_pages_total"]
    assert_same_outputs(tight, served.llm.generate(prompts, params))


def test_a_seeded_request_samples_the_same_tokens_alone_or_in_a_batch(served):
    prompts = served.prompts[:6]
    params = [
        SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=100 + i, max_tokens=10, ignore_eos=True)
        for i in range(6)
    ]
    alone = [served.llm.generate(p, sp)[0].token_ids for p, sp in zip(prompts, params, strict=True)]
    noise = served.prompts[6:16]
    batched = served.llm.generate(prompts + noise, params + [SamplingParams(temperature=1.0, max_tokens=10)] * 10)
    assert [o.token_ids for o in batched[:6]] == alone
    assert len({tuple(t) for t in alone}) == 6


def test_concurrent_streams_from_threads_are_batched_and_each_gets_its_own_output(served):
    llm, prompts = served.llm, served.prompts[:4]
    params = [SamplingParams(seed=s, temperature=0.8, max_tokens=16, ignore_eos=True) for s in range(4)]
    expected = [llm.generate(p, sp)[0].text for p, sp in zip(prompts, params, strict=True)]
    results: dict[int, str] = {}
    start = threading.Barrier(4)
    before = llm.stats()["batch_sizes"]

    def worker(i):
        start.wait()
        results[i] = "".join(event.text for event in llm.stream(prompts[i], params[i]))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert [results.get(i) for i in range(4)] == expected
    after = llm.stats()["batch_sizes"]
    batched_steps = sum(count - before.get(size, 0) for size, count in after.items() if size > 1)
    assert batched_steps >= 8  # the four streams shared most of their steps


def test_the_demo_v4_model_gives_transformers_greedy_answers_to_its_eval_prompts_in_one_batch():
    if not (DEMO / "config.json").is_file():
        pytest.skip(f"{DEMO} has no config.json yet (the demo model is trained separately)")
    if json.loads((DEMO / "config.json").read_text()).get("model_type") != "deepseek_v4":
        pytest.skip(f"{DEMO} is not a DeepSeek-V4 checkpoint")
    from transformers import AutoModelForCausalLM

    conversations = []
    for path in sorted((DEMO / "eval").glob("*.jsonl")):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        conversations += [line["messages"] for line in lines[:2]]
    assert conversations, f"{DEMO / 'eval'} has no eval prompts"
    llm = LLM(DEMO, device="cpu", dtype="float32")
    try:
        params = SamplingParams(temperature=0, max_tokens=32)
        outputs = llm.chat(conversations, params)
        assert llm.stats()["max_batch_size"] >= min(len(conversations), 4)
    finally:
        llm.close()
    hf = AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32).eval()
    for out in outputs:
        prompt = torch.tensor([out.prompt_token_ids])
        with torch.no_grad():
            expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=32)
        assert out.token_ids == expected[0, prompt.shape[1] :].tolist()
