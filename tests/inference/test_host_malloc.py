"""The CPU engine keeps the memory its steps free (inference/engine/host_malloc.py).

Each case runs in a fresh interpreter: malloc's thresholds are process-wide and, once set by an engine
built in this test process, cannot be compared against glibc's defaults here."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

CHURN = """
import json, os, resource, threading
import torch
from inference.engine.host_malloc import keep_freed_memory
took = keep_freed_memory()
def churn():  # a step's pattern: many MB-sized buffers live at once, all freed, in a thread of its own
    for _ in range(50):
        buffers = [torch.empty(250_000).fill_(1.0) for _ in range(30)]
        del buffers
thread = threading.Thread(target=churn); thread.start(); thread.join()  # first pass maps the pages
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
thread = threading.Thread(target=churn); thread.start(); thread.join()
print(json.dumps({"took": took, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _churn(keep: str) -> dict:
    env = {"CITADEL_ENGINE_KEEP_FREED_MEMORY": keep, "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", CHURN], env=env, capture_output=True, text=True, timeout=120,
                         check=True, cwd=Path(__file__).resolve().parents[2])
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_step_buffers_are_not_faulted_back_in():
    default, kept = _churn("0"), _churn("1")
    assert default["took"] is False and kept["took"] is True
    # glibc's defaults hand the freed buffers back and fault them in again on the next allocation.
    assert default["faults"] > 10_000, default  # ~240,000 on the CI VM
    assert kept["faults"] < default["faults"] / 20, (default, kept)
