"""The KV section of `python -m bench.tiers`: tiered KV against untiered, side by side in one run.

Citadel's engine serves the same workload twice, interleaved: untiered, its cache sized to exactly
what the workload needs at once (no preemption), and tiered, with the device tier given about a
third of those pages and host memory and a disk file behind it. It reports

- kv_fast_tier_saving: 1 - tiered device-tier bytes (slots and pages) / untiered cache bytes
  (target at least 0.40);
- kv_throughput_ratio: tiered over untiered output tokens/s on the whole workload, prefill included
  (median of interleaved rounds; target at least 0.90), with the tiers' counters;
- on a Qwen3-MoE, the same two for Citadel's whole-page tiers (every page of a step on the device:
  the saving comes from running fewer sequences at once), and transformers' generate() with
  `cache_implementation="offloaded"` against its default cache on the same model
  (hf_offloaded_throughput_ratio; transformers' offloaded cache needs a CUDA device, so on a CPU
  it is reported as not applicable, with transformers' reason).

`long_context()` (python -m bench.tiers --long-context) prefills and decodes one very long prompt
on a long-context variant of models/demo-v4 (`long_context_checkpoint`: its config allows more
positions; weights and tokenizer are the demo's) with the device tier at a tenth of the KV the
prompt needs, and reports wall times and peak bytes per tier.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from .checkpoints import DEMO_V4, QWEN3_MOE_TIMING, build_qwen3_moe_checkpoint

DEVICE_SHARE = 0.3
"""Share of the workload's pages the tiered engine's device tier holds (the slots come on top)."""


def long_context_checkpoint(folder: Path, max_positions: int, source: Path = DEMO_V4) -> Path:
    """A variant of the demo checkpoint whose config allows `max_positions` positions (weights and
    tokenizer linked, not copied). The compressed branches' YaRN RoPE keeps its trained settings."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads((source / "config.json").read_text())
    config["max_position_embeddings"] = max_positions
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (source / name).exists() and not (folder / name).exists():
            os.symlink((source / name).resolve(), folder / name)
    return folder


def _prompts(count: int, lengths: tuple[int, int], vocab: int, seed: int = 0) -> list[list[int]]:
    import torch

    generator = torch.Generator().manual_seed(seed)
    low, high = lengths
    sizes = [low + (i * 7919) % (high - low + 1) for i in range(count)]
    return [torch.randint(7, vocab, (n,), generator=generator).tolist() for n in sizes]


def _needed(folder, prompts, output: int, settings: dict) -> tuple[int, int, int]:
    """(slot bytes, page bytes, pages) the workload needs at once: max_num_seqs of its longest sequences."""
    from inference import LLM

    probe = LLM(folder, device="cpu", dtype="float32", kv_cache_memory=1 << 24, **settings)
    runner = probe._loop.engine.runner
    slots, page = runner.cache.slots.numel(), runner.cache.page_bytes
    longest = sorted((len(p) + output for p in prompts), reverse=True)[: settings["max_num_seqs"]]
    pages = sum(runner.block_manager.pages_for(n) for n in longest)
    probe.close()
    return slots, page, pages


def _timed(llm, prompts, params) -> tuple[float, int]:
    started = time.perf_counter()
    outputs = llm.generate(prompts, params)
    return time.perf_counter() - started, sum(len(o.outputs[0].token_ids) for o in outputs)


def compare_engine(folder, prompts, output: int, settings: dict, rounds: int, workdir: Path) -> dict:
    """Untiered and tiered Citadel engines on one workload, interleaved `rounds` times."""
    from inference import LLM, SamplingParams

    slots, page, pages = _needed(folder, prompts, output, settings)
    device_pages = max(int(pages * DEVICE_SHARE), 1)
    untiered_bytes = slots + (pages + settings["max_num_seqs"] + 1) * page  # a page of slack per sequence
    tiered_settings = dict(
        kv_device_bytes=slots + (device_pages + 1) * page,
        kv_host_bytes=(pages // 3 + 1) * page,
        kv_disk_bytes=pages * page,
        kv_disk_path=str(workdir / "kv-disk"),
    )
    params = SamplingParams(temperature=0, max_tokens=output, ignore_eos=True)
    engines = {
        "untiered": LLM(folder, device="cpu", dtype="float32", kv_cache_memory=untiered_bytes, **settings),
        "tiered": LLM(folder, device="cpu", dtype="float32", **tiered_settings, **settings),
    }
    try:
        for llm in engines.values():  # warm up (first-call allocations, thread pools)
            llm.generate(prompts[:2], params)
        seconds = {name: [] for name in engines}
        tokens = {}
        results = {}
        for _ in range(rounds):
            for name, llm in engines.items():
                elapsed, count = _timed(llm, prompts, params)
                seconds[name].append(elapsed)
                tokens[name] = count
        greedy = SamplingParams(temperature=0, max_tokens=output)
        for name, llm in engines.items():
            results[name] = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
        stats = engines["tiered"].stats()
        preemptions = {name: llm.stats()["preemptions"] for name, llm in engines.items()}
    finally:
        for llm in engines.values():
            llm.close()
    throughput = {name: tokens[name] / statistics.median(s) for name, s in seconds.items()}
    tiered_device = tiered_settings["kv_device_bytes"]
    return {
        "model": str(folder),
        "requests": len(prompts),
        "output_tokens": output,
        "settings": settings,
        "untiered_cache_bytes": untiered_bytes,
        "tiered_budgets": {k: v for k, v in tiered_settings.items() if k != "kv_disk_path"},
        "pages_needed": pages,
        "page_bytes": page,
        "slot_bytes": slots,
        "tokens_per_second": {k: round(v, 1) for k, v in throughput.items()},
        "seconds": {k: [round(x, 3) for x in v] for k, v in seconds.items()},
        "preemptions": preemptions,
        "same_greedy_tokens": results["tiered"] == results["untiered"],
        "tier_stats": {k: v for k, v in stats.items() if k.startswith("kv_")},
        "fast_tier_saving": round(1 - tiered_device / untiered_bytes, 4),
        "throughput_ratio": round(throughput["tiered"] / throughput["untiered"], 4),
    }


def compare_transformers_offloaded(folder: Path, prompts, output: int, rounds: int) -> dict:
    """transformers' generate() with its default (dynamic) cache and with cache_implementation="offloaded"."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True).eval()
    seconds = {"default": [], "offloaded": []}

    def run(cache: str | None) -> float:
        started = time.perf_counter()
        for prompt in prompts:  # one unpadded sequence at a time
            ids = torch.tensor([prompt])
            extra = {"cache_implementation": cache} if cache else {}
            with torch.no_grad():
                model.generate(ids, max_new_tokens=output, min_new_tokens=output, do_sample=False, **extra)
        return time.perf_counter() - started

    try:
        run("offloaded")
    except Exception as error:  # noqa: BLE001 (reported as not applicable, with the reason)
        return {"applies": False, "reason": f"{type(error).__name__}: {error}"}
    run(None)
    for _ in range(rounds):
        seconds["default"].append(run(None))
        seconds["offloaded"].append(run("offloaded"))
    tokens = len(prompts) * output
    throughput = {k: tokens / statistics.median(v) for k, v in seconds.items()}
    return {
        "applies": True,
        "tokens_per_second": {k: round(v, 1) for k, v in throughput.items()},
        "seconds": {k: [round(x, 3) for x in v] for k, v in seconds.items()},
        "throughput_ratio": round(throughput["offloaded"] / throughput["default"], 4),
    }


def _without_prefix_cache(settings: dict) -> dict:
    """Prefix caching off for both engines: the rounds repeat the same prompts, and the untiered
    engine would reuse their pages (bench/tiers_prefix.py measures that cache on its own)."""
    from inference.engine import EngineConfig

    if "enable_prefix_caching" in EngineConfig.__dataclass_fields__:
        return {**settings, "enable_prefix_caching": False}
    return settings


def run(quick: bool) -> dict:
    """The KV section's results (keys merged into bench.tiers' JSON line)."""
    rounds = 1 if quick else 3
    with tempfile.TemporaryDirectory(prefix="bench-tiers-kv-") as tmp:
        workdir = Path(tmp)
        v4_prompts = _prompts(8 if quick else 24, (500, 900), 1000)
        v4 = compare_engine(
            DEMO_V4,
            v4_prompts,
            16 if quick else 32,
            _without_prefix_cache(dict(max_num_seqs=8, max_num_batched_tokens=512)),
            rounds,
            workdir,
        )
        qwen_folder = build_qwen3_moe_checkpoint(
            workdir / "qwen3-moe", {**QWEN3_MOE_TIMING, "num_hidden_layers": 2 if quick else 8}
        )
        vocab = json.loads((qwen_folder / "config.json").read_text())["vocab_size"]
        qwen_prompts = _prompts(6 if quick else 16, (200, 400), vocab, seed=1)
        qwen = compare_engine(
            qwen_folder,
            qwen_prompts,
            16 if quick else 32,
            _without_prefix_cache(dict(max_num_seqs=8, max_num_batched_tokens=512)),
            rounds,
            workdir,
        )
        hf = compare_transformers_offloaded(qwen_folder, qwen_prompts[:3], 8 if quick else 16, rounds)
    return {
        "kv_fast_tier_saving": v4["fast_tier_saving"],
        "kv_throughput_ratio": v4["throughput_ratio"],
        "kv_same_greedy_tokens": v4["same_greedy_tokens"] and qwen["same_greedy_tokens"],
        "kv_qwen3_moe_fast_tier_saving": qwen["fast_tier_saving"],
        "kv_qwen3_moe_throughput_ratio": qwen["throughput_ratio"],
        "hf_offloaded_throughput_ratio": hf.get("throughput_ratio"),
        "kv_detail": {"deepseek_v4": v4, "qwen3_moe": qwen, "transformers_offloaded": hf},
    }


def _report_progress(llm, tokens: int, done: threading.Event, lines: list, every: float = 60.0) -> None:
    """A line on stderr every `every` seconds: how far the prefill is, the prefill rate since the last
    line (flat if a chunk costs the same at every depth) and the tiers' bytes; kept in `lines` too."""
    started = time.perf_counter()
    last = (0.0, 0)
    while not done.wait(every):
        stats = llm.stats()
        elapsed, prefilled = time.perf_counter() - started, stats["prefill_tokens"]
        line = {
            "elapsed_s": round(elapsed),
            "prefilled": f"{prefilled}/{tokens}",
            "tokens_per_s_since_last": round((prefilled - last[1]) / max(elapsed - last[0], 1e-9), 1),
            "load_average_1m": round(os.getloadavg()[0], 1),
            **{k: stats[k] for k in ("kv_device_bytes", "kv_host_bytes", "kv_disk_bytes") if k in stats},
        }
        last = (elapsed, prefilled)
        lines.append(line)
        print(json.dumps(line), file=sys.stderr, flush=True)


def long_context(
    tokens: int, output: int = 8, device_fraction: float = 0.1, chunk: int | None = None
) -> dict:
    """One `tokens`-token prompt on the long-context demo variant, device tier at `device_fraction` of its KV."""
    import torch

    from inference import LLM, SamplingParams
    from inference.engine.block_manager import BlockManager

    with tempfile.TemporaryDirectory(prefix="bench-tiers-long-") as tmp:
        folder = long_context_checkpoint(
            Path(tmp) / "demo-v4-long", 1 << max(tokens + output + 64, 1).bit_length()
        )
        chunk = chunk or min(2048, max(256, tokens // 40))  # the device tier must hold a chunk's new pages
        settings = dict(max_num_seqs=1, max_num_batched_tokens=chunk)
        probe = LLM(folder, device="cpu", dtype="float32", kv_cache_memory=1 << 24, **settings)
        runner = probe._loop.engine.runner
        spec, page, slots = runner.spec, runner.cache.page_bytes, runner.cache.slots.numel()
        probe.close()
        pages = BlockManager(spec, 2, 0, runner.block_size).pages_for(tokens + output)
        needed = slots + pages * page
        budgets = dict(
            kv_device_bytes=int(needed * device_fraction),
            kv_host_bytes=int(pages * page * 0.3),
            kv_disk_bytes=pages * page,
            kv_disk_path=str(Path(tmp) / "kv-disk"),
        )
        prompt = torch.randint(7, 1000, (tokens,), generator=torch.Generator().manual_seed(0)).tolist()
        llm = LLM(folder, device="cpu", dtype="float32", **settings, **budgets)
        done = threading.Event()
        progress: list[dict] = []
        threading.Thread(target=_report_progress, args=(llm, tokens, done, progress), daemon=True).start()
        try:
            started = time.perf_counter()
            first = None
            generated = []
            for event in llm.stream(
                prompt, SamplingParams(temperature=0, max_tokens=output, ignore_eos=True)
            ):
                if first is None:
                    first = time.perf_counter() - started
                generated += event.token_ids
            total = time.perf_counter() - started
            stats = llm.stats()
        finally:
            done.set()
            llm.close()
    return {
        "long_context_tokens": tokens,
        "long_context_output_tokens": len(generated),
        "long_context_prefill_seconds": round(first, 1),
        "long_context_prefill_tokens_per_second": round(tokens / first, 1),
        "long_context_chunk_tokens": chunk,
        "long_context_threads": torch.get_num_threads(),
        "long_context_omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default (spinning)"),
        "long_context_decode_seconds_per_token": round((total - first) / max(len(generated) - 1, 1), 3),
        "long_context_wall_seconds": round(total, 1),
        "long_context_kv_needed_bytes": needed,
        "long_context_budgets": {k: v for k, v in budgets.items() if k != "kv_disk_path"},
        "long_context_peak_bytes": {
            "device": slots + stats["kv_device_peak_bytes"],
            "host": stats["kv_host_peak_bytes"],
            "disk": stats["kv_disk_peak_bytes"],
            "process_max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        },
        "long_context_tier_stats": {k: v for k, v in stats.items() if k.startswith("kv_")},
        "long_context_progress": progress,
    }
