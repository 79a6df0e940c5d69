"""`python -m bench.audit --quick` runs both systems on PostgreSQL and ends with its JSON line."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import port_open, require

ROOT = Path(__file__).resolve().parents[2]


def test_the_audit_benchmark_reports_appends_per_second_beside_the_baseline(tmp_path):
    require(port_open("127.0.0.1", 5432), "PostgreSQL on 127.0.0.1:5432")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "platform"), str(ROOT)]),
               CITADEL_DATA_DIR=str(tmp_path / "data"))
    env.pop("DATABASE_URL", None)
    out = tmp_path / "audit.json"
    done = subprocess.run([sys.executable, "-m", "bench.audit", "--quick", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == json.loads(out.read_text())
    assert result["chain_verified"] and result["chain_records"] == 2 * result["appends"] + 1 + result["processes"]
    assert result["appends_per_second"] > 0 and result["machine"]["cores"]
    for system in ("citadel", "baseline_plain_insert"):
        assert set(result["systems"][system]) == {"single_process", "concurrent"}
    assert result["targets"]["appends_per_second"]["target"] == 1000
