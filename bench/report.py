"""The verdict of an engine benchmark: ratios against the targets, and the table a person reads.

Throughput ratios compare the all-at-once phase (an offline batch: every system is busy from the
first request to the last, so tokens/s measures the system, not the arrival rate). The Poisson
phase is for latency: at a rate a system keeps up with, its tokens/s is the arrival rate's.
"""

from __future__ import annotations

TARGETS = {
    "ratio_vs_generate": (">=", 3.0),
    "ratio_vs_continuous": (">=", 2.0),
    "batch1_decode_ratio": (">=", 1.5),
    "peak_memory_ratio": ("<=", 1.0),
}
"""The issue's targets for a CPU run."""

PHASES = ("all_at_once", "poisson", "batch1")


def _phase(systems: dict, name: str, phase: str) -> dict | None:
    system = systems.get(name) or {}
    if not system.get("supported", False) or system.get("failed"):
        return None
    return system.get("phases", {}).get(phase)


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def ratios(systems: dict) -> dict:
    """ratio_vs_generate, ratio_vs_continuous (+ reason when null), batch1_decode_ratio, peak_memory_ratio."""

    def tps(name: str) -> float | None:
        phase = _phase(systems, name, "all_at_once")
        return phase["output_tokens_per_s"] if phase else None

    def decode(name: str) -> float | None:
        phase = _phase(systems, name, "batch1")
        return phase["decode_tokens_per_s"] if phase else None

    def peak(name: str) -> int | None:
        system = systems.get(name) or {}
        return (
            system.get("peak_memory_bytes") if system.get("supported") and not system.get("failed") else None
        )

    out = {
        "ratio_vs_generate": _ratio(tps("citadel"), tps("transformers_generate")),
        "ratio_vs_continuous": _ratio(tps("citadel"), tps("transformers_continuous")),
        "ratio_vs_continuous_reason": None,
        "batch1_decode_ratio": _ratio(decode("citadel"), decode("transformers_generate")),
        "peak_memory_ratio": _ratio(peak("citadel"), peak("transformers_generate")),
    }
    if out["ratio_vs_continuous"] is None:
        continuous = systems.get("transformers_continuous")
        if continuous is None:
            out["ratio_vs_continuous_reason"] = "not run (--systems)"
        else:
            verdict = "unsupported" if not continuous.get("supported") else "failed"
            out["ratio_vs_continuous_reason"] = (
                f"transformers continuous batching {verdict}: {continuous.get('reason', 'no result')}"
            )
    return out


def targets(values: dict) -> dict:
    """Per target: the target, the value and whether it is met (None when there is no value)."""
    verdicts = {}
    for key, (op, bound) in TARGETS.items():
        value = values.get(key)
        met = None if value is None else (value >= bound if op == ">=" else value <= bound)
        verdicts[key] = {"target": f"{op} {bound}", "value": value, "met": met}
    return verdicts


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def table(result: dict) -> str:
    """A plain-text table of every system and phase, then the ratios."""
    lines = [
        f"model {result['model']} ({result['family']}), {result['device']} {result['dtype']}, "
        f"machine: {result['machine']['cpu']}, {result['machine']['cores']} cores"
        + (f", GPU {result['machine']['gpu']['name']}" if result["machine"].get("gpu") else ""),
        f"workload: {result['workload']['requests']} requests, prompts {result['workload']['min_prompt']}.."
        f"{result['workload']['longest_prompt']} tokens, outputs {result['workload']['min_output']}.."
        f"{result['workload']['longest_output']}, Poisson {result['workload']['rate']} req/s",
        "",
        f"{'system':<24} {'phase':<12} {'out tok/s':>10} {'TTFT p50':>9} {'TTFT p99':>9} "
        f"{'ITL p50':>8} {'ITL p99':>8} {'peak MiB':>9}",
    ]
    for name, system in result["systems"].items():
        if not system.get("supported") or system.get("failed"):
            verdict = "unsupported" if not system.get("supported") else "FAILED"
            lines.append(f"{name:<24} {verdict}: {system.get('reason', '')}"[:160])
            continue
        for phase in PHASES:
            data = system["phases"].get(phase)
            if data is None:
                continue
            peak = f"{data['peak_memory_bytes'] / 2**20:.0f}"
            if phase == "batch1":
                lines.append(
                    f"{name:<24} {phase:<12} {data['decode_tokens_per_s']:>10.1f} {'(decode only)':>19}"
                    f"{'':>18} {peak:>9}"
                )
                continue
            ttft = f"{_ms(data['ttft_ms_p50']):>9} {_ms(data['ttft_ms_p99']):>9}"
            itl = f"{_ms(data['itl_ms_p50']):>8} {_ms(data['itl_ms_p99']):>8}"
            lines.append(
                f"{name:<24} {phase:<12} {data['output_tokens_per_s']:>10.1f} {ttft} {itl} {peak:>9}"
            )
        lines.append(
            f"{'':<24} {'(process)':<12} {'':>10} {'':>9} {'':>9} {'':>8} {'':>8} "
            f"{system['peak_memory_bytes'] / 2**20:>9.0f}"
        )
    lines.append("(latencies in ms; peak MiB above the process before the model was loaded)")
    lines.append("")
    for key, verdict in result["targets"].items():
        mark = {True: "met", False: "NOT met", None: "n/a"}[verdict["met"]]
        value = "-" if verdict["value"] is None else f"{verdict['value']:.2f}"
        lines.append(f"{key:<22} {value:>8}   target {verdict['target']:<7} {mark}")
    if result.get("ratio_vs_continuous_reason"):
        lines.append(f"  ratio_vs_continuous: {result['ratio_vs_continuous_reason']}"[:200])
    return "\n".join(lines)
