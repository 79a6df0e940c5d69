"""`python -m bench.redaction` prints per-type recall and precision for Citadel and the naive
baseline, ends with one JSON line, and writes it with --out."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_redaction_benchmark_prints_a_table_and_one_json_line_and_writes_out(tmp_path):
    out = tmp_path / "redaction.json"
    done = subprocess.run([sys.executable, "-m", "bench.redaction", "--per-type", "60", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0].split()[:2] == ["type", "planted"] and any(line.startswith("IBAN") for line in lines)
    result = json.loads(lines[-1])
    assert result == json.loads(out.read_text())
    assert set(result["systems"]) == {"citadel", "naive_regex"}
    for kind, row in result["systems"]["citadel"].items():
        assert row["recall"] >= 0.95 and row["precision"] is not None, kind
    assert result["meets_target"] is True and result["set"]["per_type"] == 60
