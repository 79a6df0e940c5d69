"""`citadel worker --nice`: a worker sharing its machine with the control plane runs at a lower CPU
priority (issue 11: 64 token streams from a model decoding on the CPU starved other API requests).

The priority is checked on a real worker process: the command runs in a child Python whose Celery
entry point is replaced by one that reports the priority every thread then inherits, so no broker
is needed and this test's own process keeps its priority.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from citadel.core.management.commands.serve import SERVE_WORKER_NICE
from citadel.core.management.commands.serve import Command as Serve

ROOT = Path(__file__).resolve().parents[2]

CHILD = """
import json, os, sys, threading
import django
django.setup()
from citadel.celery import app
from citadel.core.management.commands import worker
from citadel.registry.models import WorkerPool

WorkerPool.objects.filter = lambda **kwargs: type("Rows", (), {"exists": lambda self: True})()  # no database here
def report(argv):
    seen = {}
    thread = threading.Thread(target=lambda: seen.update(thread=os.getpriority(os.PRIO_PROCESS, 0)))
    thread.start(); thread.join()
    print(json.dumps({"process": os.getpriority(os.PRIO_PROCESS, 0), **seen, "argv": argv}))
app.worker_main = report
worker.Command().run_from_argv(["citadel", "worker", "--pool", "cpu-pool", *sys.argv[1:]])
"""


def _worker(*args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "platform"), str(ROOT)])}
    done = subprocess.run([sys.executable, "-c", CHILD, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_worker_started_with_nice_runs_and_starts_its_threads_at_that_lower_priority():
    base = os.getpriority(os.PRIO_PROCESS, 0)
    if base + 7 > 19:
        pytest.skip("this process already runs at the lowest priority")
    report = _worker("--nice", "7")
    assert report["process"] == base + 7 and report["thread"] == base + 7
    assert "--pool=threads" in report["argv"]
    assert _worker()["process"] == base  # the default leaves the priority alone


@pytest.mark.django_db
@pytest.mark.parametrize("nice", [-1, 20])
def test_a_nice_value_outside_0_to_19_is_refused_naming_the_option(nice):
    with pytest.raises(CommandError, match="--nice must be from 0 to 19"):
        call_command("worker", pool="anything", nice=nice)


def test_citadel_serve_starts_its_worker_at_a_lower_priority_than_the_web_process():
    options = vars(Serve().create_parser("citadel", "serve").parse_args([]))
    assert options["worker_nice"] == SERVE_WORKER_NICE > 0
