"""`python -m bench.tiers`: tiered caching (issue 5), each section side by side with its baseline in one run.

Sections (each a module exposing `run(quick: bool) -> dict`, merged when present):
- bench/tiers_kv.py: KV pages in device, host and disk tiers against the untiered engine, and
  transformers' offloaded KV cache (kv_fast_tier_saving, kv_throughput_ratio, ...);
- bench/tiers_experts.py: routed experts in tiers (expert_hit_rate, ...);
- bench/tiers_prefix.py: the prefix cache (prefix_ttft_speedup, ...).
`--long-context [TOKENS]` runs only the long-context benchmark instead (a 1,000,000-token prompt on
a long-context variant of models/demo-v4 with the device tier at a tenth of its KV); it is not part
of the default run: it takes long on a CPU. It sets OMP_WAIT_POLICY=PASSIVE unless the environment
sets it (recorded as long_context_omp_wait_policy): on a shared machine, spinning OpenMP threads
made its prefill several times slower.

Ends with ONE JSON line of every section's keys, also written to bench/results/tiers-cpu.json (or
--out) with the machine and the commit.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

from .machine import ROOT, describe, git_commit

SECTIONS = ("tiers_kv", "tiers_experts", "tiers_prefix")
DEFAULT_OUT = ROOT / "bench" / "results" / "tiers-cpu.json"
LONG_CONTEXT_OUT = ROOT / "bench" / "results" / "tiers-long-context-cpu.json"


def run_sections(quick: bool, only: list[str] | None = None) -> dict:
    """Every present section's results, merged (a failing section reports its error, the others still run)."""
    merged: dict = {}
    for name in only or SECTIONS:
        try:
            module = importlib.import_module(f"bench.{name}")
        except ModuleNotFoundError as error:
            if error.name == f"bench.{name}":
                merged.setdefault("sections_missing", []).append(name)
                continue
            raise
        started = time.perf_counter()
        try:
            merged.update(module.run(quick))
        except Exception as error:  # noqa: BLE001 (one section's failure must not hide the others)
            traceback.print_exc()
            merged.setdefault("sections_failed", {})[name] = f"{type(error).__name__}: {error}"
        merged.setdefault("section_seconds", {})[name] = round(time.perf_counter() - started, 1)
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tiers", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short workloads (a few minutes)")
    parser.add_argument("--out", type=Path, help=f"where the result JSON goes (default {DEFAULT_OUT})")
    parser.add_argument(
        "--section", action="append", choices=SECTIONS, help="run only this section (repeatable)"
    )
    parser.add_argument(
        "--long-context",
        nargs="?",
        type=int,
        const=1_000_000,
        metavar="TOKENS",
        help="run only the long-context benchmark (default 1,000,000 tokens)",
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    commit = git_commit()  # the code this run imports (a long run outlives later edits of the tree)
    if args.long_context is not None and "torch" not in sys.modules:
        # OpenMP's idle threads spin by default: on a machine shared with other jobs (more runnable
        # threads than cores), every parallel region then waits out a preempted spinner, and the
        # long prefill's thousands of small GEMMs per chunk ran ~10x slower at load ~15. Passive
        # waiting sleeps instead (read once, when torch loads OpenMP; an explicit setting wins).
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.long_context is not None:
        from .tiers_kv import long_context

        results = long_context(args.long_context)
        out = args.out or LONG_CONTEXT_OUT
    else:
        results = run_sections(args.quick, args.section)
        out = args.out or DEFAULT_OUT
    document = {
        "benchmark": "tiers",
        "quick": args.quick,
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": describe(),
        "git": commit,
        **results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=2) + "\n")
    summary = {k: v for k, v in document.items() if not isinstance(v, dict) or k in ("sections_failed",)}
    summary.pop("machine", None)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
