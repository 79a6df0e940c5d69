"""`python -m bench.engine` runs end to end and ends with the JSON line the issue asks for.

A check of the harness, not a timed test: tiny models and a handful of short requests, no
threshold on any speed. Each run starts one process per system, so these take tens of seconds.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.checkpoints import QWEN3_MOE_TOY, build_qwen3_moe_checkpoint

ROOT = Path(__file__).resolve().parents[2]
TINY_RUN = ["--quick", "--requests", "4", "--max-prompt", "24", "--max-output", "8", "--threads", "1"]
REQUIRED = {
    "model",
    "family",
    "device",
    "dtype",
    "machine",
    "git",
    "workload",
    "systems",
    "ratio_vs_generate",
    "ratio_vs_continuous",
    "ratio_vs_continuous_reason",
    "batch1_decode_ratio",
    "peak_memory_ratio",
    "targets",
}


def bench(*args: str) -> tuple[dict, str]:
    done = subprocess.run(
        [sys.executable, "-m", "bench.engine", *TINY_RUN, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    return json.loads(lines[-1]), done.stdout


def assert_served(system: dict, phases=("all_at_once", "poisson")) -> None:
    assert system["supported"] and not system.get("failed"), system.get("reason")
    for phase in phases:
        data = system["phases"][phase]
        assert data["requests"] == 4
        assert data["output_tokens_per_s"] > 0
        assert 0 < data["ttft_ms_p50"] <= data["ttft_ms_p99"]
        assert 0 < data["itl_ms_p50"] <= data["itl_ms_p99"]
    assert system["peak_memory_bytes"] > 0


def test_a_deepseek_v4_run_compares_citadel_with_padded_generate_and_says_why_continuous_is_missing(
    tiny_checkpoint, tmp_path
):
    out = tmp_path / "results" / "v4.json"
    result, stdout = bench("--model", str(tiny_checkpoint), "--out", str(out))

    assert REQUIRED <= result.keys()
    assert result["family"] == "deepseek_v4" and result["device"] == "cpu" and result["dtype"] == "float32"
    assert (
        result["machine"]["cpu"] and result["machine"]["cores"] >= 1 and result["machine"]["memory_bytes"] > 0
    )
    assert result["workload"]["requests"] == 4 and result["workload"]["longest_prompt"] <= 24
    systems = result["systems"]
    assert_served(systems["citadel"])
    assert_served(systems["transformers_generate"])
    # Both sides generate exactly the requested tokens (ignore_eos): same totals.
    expected = result["workload"]["output_tokens"]
    for name in ("citadel", "transformers_generate"):
        assert systems[name]["phases"]["all_at_once"]["output_tokens"] == expected
        assert systems[name]["phases"]["batch1"]["decode_tokens_per_s"] > 0
    assert result["ratio_vs_generate"] > 0 and result["batch1_decode_ratio"] > 0
    assert result["peak_memory_ratio"] > 0
    assert systems["transformers_continuous"]["supported"] is False
    assert result["ratio_vs_continuous"] is None
    assert "Invalid layer type" in result["ratio_vs_continuous_reason"]

    assert json.loads(out.read_text()) == result
    table = stdout.splitlines()[:-1]
    assert any(line.startswith("citadel ") and "all_at_once" in line for line in table)
    assert any(line.startswith("ratio_vs_generate") for line in table)


@pytest.fixture(scope="module")
def toy_qwen3_moe(tiny_checkpoint, tmp_path_factory):
    return build_qwen3_moe_checkpoint(tmp_path_factory.mktemp("toy-qwen3-moe"), QWEN3_MOE_TOY)


def test_a_qwen3_moe_run_compares_citadel_with_transformers_continuous_batching(toy_qwen3_moe):
    result, _ = bench("--model", str(toy_qwen3_moe), "--systems", "citadel,transformers_continuous")

    assert result["family"] == "qwen3_moe"
    assert result["citadel_backend"] == "citadel"
    assert_served(result["systems"]["citadel"])
    assert_served(result["systems"]["transformers_continuous"])
    assert result["ratio_vs_continuous"] > 0 and result["ratio_vs_continuous_reason"] is None
    assert result["ratio_vs_generate"] is None  # not run here
