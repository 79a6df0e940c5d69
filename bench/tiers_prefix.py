"""The prefix-cache section of `python -m bench.tiers`: cache on against off, side by side in one run.

32 requests share one 2,000-token system prompt and differ in a short user question; all 32 are
submitted at once (one thread each, as a server's callers would) and each one's time to first
token is taken from its submission. The same two engines (enable_prefix_caching on, off; all else
equal) serve the workload in interleaved rounds; each round gives the cached engine a salt of its
own, so every round starts with a cold cache and the first request computes the prefix itself.

models/demo-v4 allows 1,024 positions, fewer than the prompt: the section serves a variant whose
config allows 4,096 (bench.tiers_kv.long_context_checkpoint: the demo's weights and tokenizer,
only max_position_embeddings raised), so the 2,000-token prompt is kept as the issue states.
block_size=4 in both engines: a DeepSeek-V4 prefix block spans whole pages of both compressed
groups (the least common multiple of their tokens per page, 768 tokens at block_size 16, 192 at
4), and the finer block lets a hit cover all but the last 0-191 tokens of the shared prompt.

With the cache on, the first request computes the shared prompt and the others wait for it to be
cached (prefix-aware admission, engine/scheduler.py) instead of computing it alongside. demo-v4's
indexer ties exactly (top-k) about 1,150 tokens into the prompt; transformers breaks such ties by the
prompt's length (on rows of prompt_len // 4 entries), so from there on cached blocks are shared only by
prompts of the same length class (the 32 questions make prompts of 2,022-2,025 tokens: 2 classes); the
first request of each class computes the rest itself.

Each engine first serves two short requests (nothing cached: shorter than a block), so one-time costs
fall on neither side's rounds. Reports prefix_ttft_speedup (mean TTFT off / on, median of rounds; target at least 5), the TTFT
medians and means, prefix_hit_rate (prompt tokens taken from the cache / all prompt tokens of the
cached engine's requests) and whether both engines generated the same greedy tokens.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from pathlib import Path

from .checkpoints import DEMO_V4

SYSTEM_TOKENS = 2000
REQUESTS = 32
QUICK_REQUESTS = 8
"""--quick: 8 requests in one round (the 32 of the full run take long on a loaded CPU)."""
SETTINGS = dict(block_size=4, max_num_seqs=32, max_num_batched_tokens=512)

SYSTEM_TEXT = (
    "You are the assistant of the citadel's archive. The keepers open the gates at dawn, count the "
    "visitors, and write every question and every answer in the ledger before the lamps are lit. "
    "Answer briefly, name the shelf where the book is kept, and never reveal a sealed record. "
)


def _prompts(tokenizer, requests: int = REQUESTS) -> list[list[int]]:
    """`requests` prompts: the same SYSTEM_TOKENS-token system prompt, then a question of its own."""
    rules, n = [], 1
    while len(tokenizer(" ".join(rules)).input_ids) < SYSTEM_TOKENS:
        rules.append(f"Rule {n}: {SYSTEM_TEXT}")
        n += 1
    system = tokenizer(" ".join(rules)).input_ids[:SYSTEM_TOKENS]
    return [
        system
        + tokenizer(
            f"\nQuestion {i}: where is book number {i * 37 % 101} kept?", add_special_tokens=False
        ).input_ids
        for i in range(requests)
    ]


def _round(llm, prompts, salt: str | None) -> dict:
    """All prompts at once; per request: seconds from submission to its first token."""
    from inference import SamplingParams

    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    ttft: list[float | None] = [None] * len(prompts)
    tokens: list[list[int]] = [[] for _ in prompts]
    before = llm.stats()
    start = threading.Barrier(len(prompts) + 1)

    def serve(i: int) -> None:
        start.wait()
        submitted = time.perf_counter()
        for event in llm.stream(prompts[i], params, cache_salt=salt):
            if ttft[i] is None:
                ttft[i] = time.perf_counter() - submitted
            tokens[i] += event.token_ids

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    started = time.perf_counter()
    start.wait()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    after = llm.stats()
    hits = after.get("prefix_hits", 0) - before.get("prefix_hits", 0)
    misses = after.get("prefix_misses", 0) - before.get("prefix_misses", 0)
    return {
        "ttft_mean_s": statistics.fmean(ttft),
        "ttft_median_s": statistics.median(ttft),
        "wall_s": wall,
        "hit_rate": hits / (hits + misses) if hits + misses else 0.0,
        "tokens": tokens,
    }


def run(quick: bool) -> dict:
    """The prefix section's results (keys merged into bench.tiers' JSON line)."""
    from inference import LLM

    from .tiers_kv import long_context_checkpoint

    rounds, requests = (1, QUICK_REQUESTS) if quick else (3, REQUESTS)
    with tempfile.TemporaryDirectory(prefix="bench-tiers-prefix-") as tmp:
        folder = long_context_checkpoint(Path(tmp) / "demo-v4-4k", 4096, DEMO_V4)
        cached = LLM(model=folder, device="cpu", dtype="float32", enable_prefix_caching=True, **SETTINGS)
        uncached = LLM(model=folder, device="cpu", dtype="float32", enable_prefix_caching=False, **SETTINGS)
        try:
            prompts = _prompts(cached.tokenizer, requests)
            for llm in (uncached, cached):  # one-time costs (first step, memory first touched) off the clock
                _round(llm, [p[:64] for p in prompts[:2]], "bench-warm-up")
            on, off = [], []
            for r in range(rounds):  # interleaved, so load on a shared machine hits both alike
                off.append(_round(uncached, prompts, None))
                on.append(_round(cached, prompts, f"bench-round-{r}"))
        finally:
            cached.close()
            uncached.close()
    speedups = [b["ttft_mean_s"] / a["ttft_mean_s"] for a, b in zip(on, off, strict=True)]
    summary = lambda rs, key: round(statistics.median(r[key] for r in rs), 4)  # noqa: E731
    return {
        "prefix_ttft_speedup": round(statistics.median(speedups), 2),
        "prefix_hit_rate": summary(on, "hit_rate"),
        "prefix_same_greedy_tokens": all(a["tokens"] == b["tokens"] for a, b in zip(on, off, strict=True)),
        "prefix_detail": {
            "model": "models/demo-v4 with max_position_embeddings 4096 (demo-v4 allows 1,024)",
            "requests": requests,
            "system_prompt_tokens": SYSTEM_TOKENS,
            "prompt_tokens": [len(p) for p in prompts[:1]] + [len(prompts[-1])],
            "settings": SETTINGS,
            "rounds": rounds,
            "speedup_per_round": [round(s, 2) for s in speedups],
            "ttft_mean_s": {"on": summary(on, "ttft_mean_s"), "off": summary(off, "ttft_mean_s")},
            "ttft_mean_s_per_round": {
                "on": [round(r["ttft_mean_s"], 4) for r in on],
                "off": [round(r["ttft_mean_s"], 4) for r in off],
            },
            "hit_rate_per_round": [round(r["hit_rate"], 4) for r in on],
            "ttft_median_s": {"on": summary(on, "ttft_median_s"), "off": summary(off, "ttft_median_s")},
            "wall_s": {"on": summary(on, "wall_s"), "off": summary(off, "wall_s")},
        },
    }
