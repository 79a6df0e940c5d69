"""`python -m bench.engine`: Citadel's engine against transformers on one model and machine, in one run.

One seeded workload (bench/workload.py) is served by each system in a process of its own
(bench/child.py): Citadel's `LLM`, transformers `generate` with padded static batches, and
transformers' continuous batching where the architecture supports it. Each serves it all at
once (throughput) and as a Poisson stream (latency), plus one request alone (batch-of-one decode
speed). The run prints a table and ends with one JSON line (also written to --out) that holds the
machine, the commit, the workload, every system's metrics and the ratios the issue sets targets
for: ratio_vs_generate, ratio_vs_continuous, batch1_decode_ratio, peak_memory_ratio.

    python -m bench.engine --quick                       # tiny DeepSeek-V4 (or models/demo-v4)
    python -m bench.engine --family qwen3_moe --quick    # a timing-size random Qwen3-MoE
    python -m bench.engine --model PATH --out bench/results/NAME.json
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from . import machine, report, workload
from .checkpoints import FAMILIES, default_checkpoint, family_of, temporary_workdir
from .systems import SYSTEMS

BATCH1_PROMPT = 128
"""Prompt tokens of the batch-of-one request (its decode speed is what is compared)."""

NOTES = [
    "ratios compare the all_at_once phase; the poisson phase is for latency "
    "(its tokens/s follow the arrival rate)",
    "every request generates exactly its output length on every system (greedy, end-of-sequence ignored)",
    "TTFT includes queueing: it runs from the request's arrival to its first token",
    "transformers_generate: a request's tokens count at the step that produced them (streamer stamps), "
    "not when its padded batch returns",
    "transformers_continuous: token times are transformers' own stamps (record_timestamps); Citadel's are "
    "taken when the caller receives the token",
    "peak memory: CPU peak RSS growth over the process before loading the model (one process per system); "
    "CUDA torch.cuda.max_memory_allocated",
]
V4_NOTE = (
    "DeepSeek-V4 in transformers ignores the attention mask of left-padded batches: transformers_generate's "
    "outputs are not comparable with Citadel's, its work per step (the speed baseline) is"
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.engine",
        description="Citadel's engine vs transformers (generate with padded batches, continuous batching) "
        "on one model, one machine, one run.",
    )
    parser.add_argument("--model", type=Path, help="Hugging Face checkpoint folder (default: see --family)")
    parser.add_argument(
        "--family",
        choices=FAMILIES,
        help="without --model: deepseek_v4 (models/demo-v4, else the tiny checkpoint; the "
        "default) or qwen3_moe (a random timing-size checkpoint, built in a temporary folder)",
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dtype", default="auto", help="auto (float32 on CPU), float32, bfloat16 or float16")
    parser.add_argument(
        "--out", type=Path, help="also write the result JSON to this file (bench/results/NAME.json)"
    )
    workload.add_arguments(parser)
    systems = parser.add_argument_group("systems")
    systems.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help=f"comma-separated subset of {','.join(SYSTEMS)} (default: all)",
    )
    systems.add_argument(
        "--batch-size", type=int, default=8, help="transformers generate batch size (default 8)"
    )
    systems.add_argument(
        "--max-num-seqs",
        type=int,
        help="Citadel's (and transformers continuous batching's) batch size (default: --requests)",
    )
    systems.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=512,
        help="tokens per engine step, both continuous batchers (default 512)",
    )
    systems.add_argument("--kv-cache-memory", type=int, help="Citadel's cache bytes (default: the engine's)")
    systems.add_argument(
        "--batch1-output", type=int, help="tokens of the batch-of-one run (default --max-output)"
    )
    systems.add_argument(
        "--threads", type=int, help="torch threads in every system's process (default: torch's)"
    )
    systems.add_argument(
        "--timeout", type=float, default=3600, help="seconds per system before it is stopped"
    )
    args = parser.parse_args(argv)
    if args.model is not None:
        try:
            family = family_of(args.model)
        except FileNotFoundError as error:
            parser.error(str(error))
        if args.family is not None and family != args.family:
            parser.error(f"--model {args.model} is a {family} checkpoint, not --family {args.family}")
    unknown = set(args.systems.split(",")) - set(SYSTEMS)
    if unknown or "citadel" not in args.systems.split(","):
        parser.error(f"--systems must include citadel and name only {', '.join(SYSTEMS)}")
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    try:
        args.settings = workload.settings_from_args(args)
    except ValueError as error:
        parser.error(str(error))
    return args


def _model_facts(path: Path, device: str, dtype: str) -> dict:
    """Family, dtype, token ids to draw prompts from and longest sequence, read from the checkpoint."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from inference.loader import resolve_device, resolve_dtype

    config = AutoConfig.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    resolved = resolve_dtype(dtype, resolve_device(device), config)
    return {
        "family": config.model_type,
        "dtype": str(resolved).removeprefix("torch."),
        "token_ids": workload.ordinary_token_ids(tokenizer, config.vocab_size),
        "max_model_len": int(getattr(config, "max_position_embeddings", 0) or 2**20),
        "cuda": torch.cuda.is_available(),
    }


def _run_child(spec: dict, workdir: Path, timeout: float) -> dict:
    name = spec["system"]
    spec_path, result_path = workdir / f"{name}.spec.json", workdir / f"{name}.result.json"
    spec_path.write_text(json.dumps(spec))
    print(f"[bench] {name}: running in its own process ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "bench.child", str(spec_path), str(result_path)],
            cwd=machine.ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {
            "system": name,
            "supported": True,
            "failed": True,
            "reason": f"timed out after {timeout:.0f}s",
        }
    elapsed = time.perf_counter() - started
    if not result_path.exists():
        tail = (done.stderr or "")[-2000:]
        return {
            "system": name,
            "supported": True,
            "failed": True,
            "reason": f"the process exited with {done.returncode} and no result: {tail}",
        }
    result = json.loads(result_path.read_text())
    verdict = "unsupported" if not result.get("supported") else "FAILED" if result.get("failed") else "done"
    print(f"[bench] {name}: {verdict} in {elapsed:.1f}s", file=sys.stderr, flush=True)
    if result.get("failed"):
        print((done.stderr or "")[-4000:], file=sys.stderr)
    return result


def run(args: argparse.Namespace, workdir: Path) -> dict:
    settings = args.settings
    if args.model is not None:
        model, source = args.model.resolve(), "--model"
    else:
        model, source = default_checkpoint(args.family or "deepseek_v4", workdir)
    facts = _model_facts(model, args.device, args.dtype)
    if args.device.startswith("cuda") and not facts["cuda"]:
        raise SystemExit("--device cuda but torch sees no CUDA GPU")
    requests = workload.build_workload(settings, facts["token_ids"], facts["max_model_len"])
    rng = random.Random(settings.seed + 1)
    batch1_output = min(args.batch1_output or settings.max_output, facts["max_model_len"] - 16)
    batch1_prompt = [
        rng.choice(facts["token_ids"])
        for _ in range(min(BATCH1_PROMPT, settings.max_prompt, facts["max_model_len"] - batch1_output))
    ]
    sequence_tokens = [len(r.prompt_token_ids) + r.output_len for r in requests]
    engine_settings = {
        "max_num_seqs": args.max_num_seqs or settings.requests,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "max_model_len": max(*sequence_tokens, len(batch1_prompt) + batch1_output),
    }
    if args.kv_cache_memory:
        engine_settings["kv_cache_memory"] = args.kv_cache_memory
    base_spec = {
        "model": str(model),
        "device": args.device,
        "dtype": facts["dtype"],
        "threads": args.threads,
        "requests": [r.__dict__ for r in requests],
        "sequence_tokens": sequence_tokens,
        "max_sequence_tokens": engine_settings["max_model_len"],
        "warmup_prompt": facts["token_ids"][:16],
        "batch1": {"prompt": batch1_prompt, "output_len": batch1_output},
        "batch_size": args.batch_size,
        "engine_settings": engine_settings,
    }
    systems = {}
    for name in [s for s in SYSTEMS if s in args.systems.split(",")]:
        spec = {**base_spec, "system": name}
        if name == "transformers_continuous":
            spec["batch1"] = None  # batch of one is compared with plain generate
        systems[name] = _run_child(spec, workdir, args.timeout)

    citadel = systems["citadel"]
    backend = citadel.get("settings", {}).get("backend")
    values = report.ratios(systems)
    notes = list(NOTES) + ([V4_NOTE] if facts["family"] == "deepseek_v4" else [])
    return {
        "benchmark": "engine",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": str(model) if source == "--model" else source,
        "model_path": str(model),
        "family": facts["family"],
        "citadel_backend": backend,
        "device": args.device,
        "dtype": facts["dtype"],
        "machine": {**machine.describe(), **({"torch_threads": args.threads} if args.threads else {})},
        "git": machine.git_commit(),
        "workload": {
            **workload.summary(settings, requests),
            "quick": bool(args.quick),
            "batch1_prompt_tokens": len(batch1_prompt),
            "batch1_output_tokens": batch1_output,
        },
        "systems": systems,
        **values,
        "targets": report.targets(values),
        "notes": notes,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with temporary_workdir() as tmp:
            result = run(args, Path(tmp))
    except (ValueError, FileNotFoundError) as error:  # a bad model folder, device or workload for it
        print(f"python -m bench.engine: error: {error}", file=sys.stderr)
        return 2
    print(report.table(result))
    line = json.dumps(result, separators=(",", ":"))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"[bench] written to {args.out}", file=sys.stderr)
    print(line, flush=True)
    failed = [name for name, s in result["systems"].items() if s.get("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
