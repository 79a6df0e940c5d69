"""The expert section of `python -m bench.tiers`: routed experts in tiers against all resident, in one run.

On models/demo-v4 (trained, so its routing is realistic: a random router spreads tokens evenly
over the experts and no cache or predictor could do better than chance), Citadel's engine
serves the same chat prompts one at a time (a batch of one: the single-user case offloading is
for), interleaved between three engines in one process:

- all resident (the baseline);
- tiered with a quarter of the routed experts per layer in the fast tier (2 of 8), the rest in
  host memory, with prefetch of the next layer's experts;
- the same without prefetch.

It reports, over decode steps (prefill steps are counted apart):

- expert_hit_rate: fast-tier hits over expert uses, with prefetch (target at least 0.80), and
  expert_hit_rate_no_prefetch; expert_prefetch_accuracy (staged experts that were then used);
- expert_bytes_per_token: bytes copied into the fast tier per decoded token, with prefetch;
- on a CPU, projected decode throughput if those bytes crossed PCIe 5 (~64 GB/s) or were read from
  NVMe (~7 GB/s) and the copies did not overlap the computation (the pessimistic case):
  1 / (all-resident compute seconds per token + bytes per token / bandwidth), as
  projected_tokens_per_s_pcie5 and projected_tokens_per_s_nvme, next to the measured all-resident
  decode rate; on a CPU the fast and host tiers are both host memory, so measuring wall time
  there would say nothing about the link;
- on a GPU (device cuda): expert_throughput_ratio, tiered decode tokens/s over all-resident
  (target at least 0.5), where the host tier is pinned memory and copies use a side stream.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from .checkpoints import DEMO_V4

PCIE5_BYTES_PER_S = 64e9
NVME_BYTES_PER_S = 7e9
COUNTERS = ("expert_hits", "expert_misses", "expert_prefetch_hits", "expert_prefetch_misses", "expert_bytes_transferred")


def chat_prompts(model: Path, count: int) -> list[list[dict]]:
    """The first `count` conversations of the model's eval files, taken in turn from each family."""
    from inference.demo.evaluate import eval_files, read_eval_file

    families = [read_eval_file(path) for path in eval_files(model / "eval").values()]
    prompts, index = [], 0
    while len(prompts) < count and any(index < len(f) for f in families):
        prompts += [f[index]["messages"] for f in families if index < len(f)]
        index += 1
    return prompts[:count]


class StepMeter:
    """Wraps a loaded engine's model forward: time and expert counters of each step, decode steps apart."""

    def __init__(self, llm):
        self.model = llm._loop.engine.runner.model
        self.store = getattr(self.model, "expert_store", None)
        self.device = next(self.model.parameters()).device
        self.decode = {"steps": 0, "seconds": 0.0, **dict.fromkeys(COUNTERS, 0)}
        self.prefill = dict(self.decode)
        inner = self.model.forward

        def forward(input_ids, positions, ctx):
            before = self.store.stats() if self.store is not None else {}
            self._sync()
            started = time.perf_counter()
            hidden = inner(input_ids, positions, ctx)
            self._sync()
            elapsed = time.perf_counter() - started
            bucket = self.decode if input_ids.numel() == 1 else self.prefill
            bucket["steps"] += 1
            bucket["seconds"] += elapsed
            if self.store is not None:
                after = self.store.stats()
                for key in COUNTERS:
                    bucket[key] += after[key] - before[key]
            return hidden

        self.model.forward = forward

    def _sync(self) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)


def ratio(numerator: float, denominator: float) -> float | None:
    return round(numerator / denominator, 4) if denominator else None


def run(quick: bool, model: Path = DEMO_V4, device: str | None = None) -> dict:
    import torch

    from inference import LLM, SamplingParams

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    prompts = chat_prompts(model, 6 if quick else 24)
    max_tokens = 32 if quick else 64
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    settings = {
        "resident": {},
        "tiered": {"expert_cache_experts": 2},
        "tiered_no_prefetch": {"expert_cache_experts": 2, "expert_prefetch": False},
    }
    engines = {name: LLM(model, device=device, dtype="auto", seed=0, **s) for name, s in settings.items()}
    try:
        num_experts = engines["resident"]._loop.engine.runner.model.config.n_routed_experts
        meters = {name: StepMeter(llm) for name, llm in engines.items()}
        engines["resident"].chat(prompts[:1], SamplingParams(temperature=0, max_tokens=4))  # warm up
        for meter in meters.values():  # only what follows counts
            for bucket in (meter.decode, meter.prefill):
                bucket.update({"steps": 0, "seconds": 0.0, **dict.fromkeys(COUNTERS, 0)})
        walls = {name: [] for name in engines}
        texts = {name: [] for name in engines}
        for messages in prompts:  # one request at a time, the engines in turn
            for name, llm in engines.items():
                started = time.perf_counter()
                out = llm.chat([messages], params)[0]
                walls[name].append((len(out.token_ids), time.perf_counter() - started))
                texts[name].append(out.token_ids)
        fast_per_layer = engines["tiered"].stats()["expert_fast_experts_per_layer"]
    finally:
        for llm in engines.values():
            llm.close()

    def decode_figures(name: str) -> dict:
        d = meters[name].decode
        tokens = d["steps"]
        uses = d["expert_hits"] + d["expert_misses"]
        staged = d["expert_prefetch_hits"] + d["expert_prefetch_misses"]
        return {
            "decode_steps": tokens,
            "decode_forward_ms_per_token": round(1000 * d["seconds"] / tokens, 3) if tokens else None,
            "hit_rate": ratio(d["expert_hits"], uses),
            "prefetch_accuracy": ratio(d["expert_prefetch_hits"], staged),
            "bytes_per_token": round(d["expert_bytes_transferred"] / tokens) if tokens else None,
            "tokens_per_s": round(sum(n for n, _ in walls[name]) / sum(s for _, s in walls[name]), 2),
            "prefill": {k: round(v, 4) if isinstance(v, float) else v for k, v in meters[name].prefill.items()},
        }

    systems = {name: decode_figures(name) for name in engines}
    resident, tiered, plain = systems["resident"], systems["tiered"], systems["tiered_no_prefetch"]
    compute = resident["decode_forward_ms_per_token"] / 1000
    moved = tiered["bytes_per_token"]
    result = {
        "expert_model": str(model),
        "expert_device": device,
        "expert_requests": len(prompts),
        "expert_max_tokens": max_tokens,
        "expert_fast_share": round(fast_per_layer / num_experts, 4),
        "expert_hit_rate": tiered["hit_rate"],
        "expert_hit_rate_no_prefetch": plain["hit_rate"],
        "expert_prefetch_accuracy": tiered["prefetch_accuracy"],
        "expert_bytes_per_token": moved,
        "expert_bytes_per_token_no_prefetch": plain["bytes_per_token"],
        "expert_outputs_identical": texts["tiered"] == texts["resident"] == texts["tiered_no_prefetch"],
        "expert_resident_tokens_per_s": resident["tokens_per_s"],
        "expert_systems": systems,
    }
    if device == "cpu":
        for name, bandwidth in (("pcie5", PCIE5_BYTES_PER_S), ("nvme", NVME_BYTES_PER_S)):
            projected = 1 / (compute + moved / bandwidth)
            result[f"projected_tokens_per_s_{name}"] = round(projected, 2)
            result[f"projected_throughput_ratio_{name}"] = round(projected * compute, 4)
        result["expert_throughput_ratio"] = None
        result["expert_notes"] = [
            "demo-v4 is trained, so its routing is realistic; 2 of its 8 routed experts per layer are resident",
            "projections: 1 / (all-resident decode forward seconds per token + measured bytes per token / "
            "bandwidth), copies not overlapped with compute (pessimistic); compute measured on this CPU",
            "expert_throughput_ratio needs a GPU (device cuda) and was not run",
        ]
    else:
        medians = {
            name: statistics.median(n / s for n, s in walls[name]) for name in ("resident", "tiered")
        }
        result["expert_throughput_ratio"] = round(medians["tiered"] / medians["resident"], 4)
        result["expert_notes"] = [
            "demo-v4 is trained, so its routing is realistic; 2 of its 8 routed experts per layer are resident",
            "expert_throughput_ratio: median per-request decode tokens/s, tiered over all resident, interleaved",
        ]
    return result
