"""Throughput and latency are derived from per-token times the same way for every system."""

import pytest
import torch

from bench.metrics import MemoryMeter, RequestTiming, decode_rate, percentile, summarize


def test_percentiles_interpolate_like_numpy():
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile(list(range(101)), 99) == pytest.approx(99.0)


def test_a_phase_summary_counts_queueing_in_ttft_and_pools_inter_token_gaps():
    timings = [
        RequestTiming(arrival=0.0, token_times=[0.1, 0.2, 0.3]),
        RequestTiming(arrival=0.0, token_times=[0.5, 0.7]),
    ]
    summary = summarize(timings)
    assert summary["output_tokens"] == 5
    assert summary["wall_s"] == pytest.approx(0.7)
    assert summary["output_tokens_per_s"] == pytest.approx(5 / 0.7, rel=1e-3)
    assert summary["ttft_ms_p50"] == pytest.approx(300.0)  # 100 ms and 500 ms
    assert summary["itl_ms_p50"] == pytest.approx(100.0)  # gaps 100, 100, 200 ms
    assert summary["latency_ms_p99"] == pytest.approx(696.0)


def test_decode_rate_leaves_the_first_token_prefill_out():
    assert decode_rate([10.0, 10.5, 11.0]) == pytest.approx(2.0)


def test_the_memory_meter_sees_a_phase_peak_and_forgets_it_at_reset():
    meter = MemoryMeter(torch.device("cpu"))
    meter.reset()
    block = torch.ones(64 * 2**20, dtype=torch.uint8)  # 64 MiB, touched
    del block
    assert meter.peak() >= 60 * 2**20
    meter.reset()
    assert meter.peak() < 60 * 2**20
    assert meter.overall_peak >= 60 * 2**20
