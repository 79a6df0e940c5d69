"""What a benchmark phase measures: per-request token times in, throughput and latency percentiles out,
plus the peak memory of the phase.

Every system reports the same thing per request, `RequestTiming`: when the request arrived and when
each of its output tokens became available to the caller (perf_counter seconds). Everything else
is derived here the same way for all of them, so no system gets a friendlier definition:

- output tokens/s: the requested output tokens of all requests over the phase's wall time (first
  arrival to last token);
- time to first token (TTFT): first token minus arrival, so it includes queueing;
- inter-token latency (ITL): the gaps between consecutive tokens of a request, pooled over requests;
- latency: last token minus arrival.

Peak memory on the CPU is the process's peak resident set (VmHWM) minus its resident set before
the model was loaded; Linux resets the peak on request (/proc/self/clear_refs), so each phase gets
its own. On CUDA it is torch.cuda.max_memory_allocated, reset per phase.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class RequestTiming:
    arrival: float
    token_times: list[float] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation, as numpy's default; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(timings: list[RequestTiming]) -> dict:
    """Throughput and latency percentiles of one phase (times in milliseconds)."""
    start = min(t.arrival for t in timings)
    end = max(t.token_times[-1] for t in timings)
    tokens = sum(len(t.token_times) for t in timings)
    ttft = [t.token_times[0] - t.arrival for t in timings]
    itl = [b - a for t in timings for a, b in itertools.pairwise(t.token_times)]
    latency = [t.token_times[-1] - t.arrival for t in timings]
    wall = end - start

    def ms(values, q):
        value = percentile(values, q)
        return None if value is None else round(value * 1000, 3)

    return {
        "requests": len(timings),
        "output_tokens": tokens,
        "wall_s": round(wall, 4),
        "output_tokens_per_s": round(tokens / wall, 3) if wall > 0 else None,
        "ttft_ms_p50": ms(ttft, 50),
        "ttft_ms_p99": ms(ttft, 99),
        "itl_ms_p50": ms(itl, 50),
        "itl_ms_p99": ms(itl, 99),
        "latency_ms_p50": ms(latency, 50),
        "latency_ms_p99": ms(latency, 99),
    }


def decode_rate(token_times: list[float]) -> float:
    """Decode tokens/s of one request: tokens after the first over the time they took (prefill excluded)."""
    assert len(token_times) >= 2, "a decode rate needs at least two tokens"
    return (len(token_times) - 1) / (token_times[-1] - token_times[0])


_STATUS = Path("/proc/self/status")


def _status_kib(key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    assert match, f"/proc/self/status has no {key}"
    return int(match.group(1))


class MemoryMeter:
    """Peak memory of this process per phase, relative to what it held before the model was loaded."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        if not self.cuda and not _STATUS.exists():
            raise RuntimeError("measuring CPU memory needs Linux's /proc/self/status")
        self.baseline = self._current()
        self.overall_peak = 0

    def _current(self) -> int:
        if self.cuda:
            return torch.cuda.memory_allocated(self.device)
        return _status_kib("VmRSS") * 1024

    def reset(self) -> None:
        """Start a phase: forget the peak so far (remembering it for `overall_peak`)."""
        self.peak()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS

    def peak(self) -> int:
        """Peak bytes above the baseline since the last reset."""
        if self.cuda:
            value = torch.cuda.max_memory_allocated(self.device)
        else:
            value = _status_kib("VmHWM") * 1024
        value = max(value - self.baseline, 0)
        self.overall_peak = max(self.overall_peak, value)
        return value
