"""Runs one system's phases in a process of its own: `python -m bench.child SPEC.json RESULT.json`.

bench.engine starts one of these per system, so each system's peak memory is its own (two
models in one process would mix their peaks) and nothing one system leaves behind (threads,
caches, allocator state) slows the next. The phases, in order: load, warmup (untimed), batch of
one (BATCH1_REPEATS runs, the fastest reported), all requests at once, Poisson arrivals. The result holds per phase the metrics of
bench.metrics and the peak memory, or, for a system that cannot run the model, the reason.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import torch

from .metrics import MemoryMeter, decode_rate, summarize
from .systems import Unsupported, system_class
from .workload import Request

BATCH1_REPEATS = 3
"""The batch of one runs this many times and reports its fastest: one run of a few seconds on a shared
VM moved by ±20% between two runs of the same build, more than the gap the target asks to show. Every
run's rate is kept in the result beside the best, and both systems are measured the same way."""


def run(spec: dict) -> dict:
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    requests = [Request(**r) for r in spec["requests"]]
    _import_code(spec["model"])
    meter = MemoryMeter(device)
    system = system_class(spec["system"])(spec)
    result: dict = {"system": spec["system"], "supported": True, "phases": {}}
    result["baseline_memory_bytes"] = meter.baseline
    started = time.perf_counter()
    try:
        system.load()
    except Unsupported as error:
        return {**result, "supported": False, "reason": str(error)}
    result["load_s"] = round(time.perf_counter() - started, 3)
    try:
        system.warmup()
        result["load_peak_memory_bytes"] = _reset(meter)

        if spec["batch1"] is not None:
            prompt, output_len = spec["batch1"]["prompt"], spec["batch1"]["output_len"]
            rates = []
            for _ in range(BATCH1_REPEATS):
                times = system.batch1(prompt, output_len)
                if len(times) != output_len:
                    raise RuntimeError(f"batch of one generated {len(times)} tokens, expected {output_len}")
                rates.append(round(decode_rate(times), 3))
            result["phases"]["batch1"] = {
                "prompt_tokens": len(prompt),
                "output_tokens": output_len,
                "decode_tokens_per_s": max(rates),
                "decode_tokens_per_s_runs": rates,
                "peak_memory_bytes": _reset(meter),
                "info": system.info(),
            }
        for phase, poisson in (("all_at_once", False), ("poisson", True)):
            timings = system.serve(requests, time.perf_counter(), poisson=poisson)
            result["phases"][phase] = {
                **summarize(timings),
                "peak_memory_bytes": _reset(meter),
                "info": system.info(),
            }
        result["settings"] = system.settings()
    finally:
        system.close()
    result["peak_memory_bytes"] = meter.overall_peak
    result["elapsed_s"] = round(time.perf_counter() - started, 3)
    return result


def _import_code(model: str) -> None:
    """Import the modules loading the model needs, so the memory baseline holds the code but no weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import inference  # noqa: F401  (Citadel's engine)

    config = AutoConfig.from_pretrained(model)
    AutoModelForCausalLM._model_mapping[type(config)]  # imports the family's transformers module
    try:
        from inference.models import registry

        registry.model_class(config)  # imports Citadel's definition of the family
    except Exception:  # a family Citadel does not define natively: LLM will say so when loading
        pass


def _reset(meter: MemoryMeter) -> int:
    """The peak of the phase that just ended; starts the next one."""
    peak = meter.peak()
    meter.reset()
    return peak


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m bench.child SPEC.json RESULT.json (started by python -m bench.engine)")
        return 2
    spec = json.loads(Path(args[0]).read_text())
    try:
        result = run(spec)
    except Exception as error:
        traceback.print_exc()
        result = {
            "system": spec.get("system"),
            "supported": True,
            "failed": True,
            "reason": f"{type(error).__name__}: {error}",
        }
    Path(args[1]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
