"""`python -m bench.finetune` runs end to end and ends with the JSON line the issue asks for.

A check of the harness, not of the targets: one epoch without replay and a few eval lines, so
the figures are meaningless; three processes (base, Citadel, Trainer) of a few seconds each.
"""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KEYS = {"heldout_acc_before", "heldout_acc_after", "base_eval_drop_points", "citadel_tokens_per_second",
        "trainer_tokens_per_second", "citadel_peak_memory_bytes", "trainer_peak_memory_bytes",
        "tokens_per_second_ratio", "peak_memory_ratio", "machine", "git", "config", "targets", "systems"}


def test_a_tiny_run_compares_citadel_with_the_trainer_and_ends_with_one_json_line(tmp_path):
    out = tmp_path / "result.json"
    done = subprocess.run([sys.executable, "-m", "bench.finetune", "--quick", "--epochs", "1", "--limit", "2",
                           "--heldout-limit", "4", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert KEYS <= set(result)
    assert result == json.loads(out.read_text())
    assert result["data"]["heldout_lines"] == 4 and result["data"]["base_eval_lines_per_family"] == 2
    for name in ("citadel", "trainer"):
        system = result["systems"][name]
        assert system["steps"] == 38 and system["tokens_per_second"] > 0 and system["peak_memory_bytes"] > 0
        assert 0 <= system["heldout_acc"] <= 1
    assert set(result["targets"]) == {"heldout_acc_after", "base_eval_drop_points"}
