"""`python -m bench.tiers` runs its KV section side by side with the untiered engine and its
long-context benchmark, each ending with the one JSON line the issue asks for."""

import json

from bench import tiers


def test_the_quick_kv_section_reports_saving_throughput_and_the_transformers_comparison(tmp_path, capsys):
    out = tmp_path / "tiers.json"
    assert tiers.main(["--quick", "--section", "tiers_kv", "--threads", "1", "--out", str(out)]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["benchmark"] == "tiers" and "sections_failed" not in line
    assert line["kv_same_greedy_tokens"] is True
    assert line["kv_fast_tier_saving"] >= 0.40  # the device tier holds under 60% of the untiered cache
    assert line["kv_throughput_ratio"] > 0 and line["kv_qwen3_moe_throughput_ratio"] > 0
    result = json.loads(out.read_text())
    detail = result["kv_detail"]
    stats = detail["deepseek_v4"]["tier_stats"]
    assert stats["kv_host_peak_bytes"] > 0 and stats["kv_prefetch_misses"] > 0  # slower tiers were read
    offloaded = detail["transformers_offloaded"]
    assert offloaded["applies"] or "CUDA" in offloaded["reason"]  # transformers offloads only to a GPU
    assert result["machine"]["cpu"]


def test_the_long_context_benchmark_keeps_the_device_tier_at_a_tenth_of_the_kv(tmp_path, capsys):
    out = tmp_path / "long.json"
    assert tiers.main(["--long-context", "10000", "--threads", "1", "--out", str(out)]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["long_context_tokens"] == 10000 and line["long_context_output_tokens"] == 8
    assert line["long_context_prefill_seconds"] > 0
    result = json.loads(out.read_text())
    peaks, needed = result["long_context_peak_bytes"], result["long_context_kv_needed_bytes"]
    assert peaks["device"] <= needed / 10
    assert peaks["host"] > 0 and peaks["disk"] > 0
