"""Concurrent appends from several processes (and threads) leave one unbroken chain: no fork, no gap."""

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from django.db import connection

from citadel.audit.models import AuditRecord
from citadel.audit.services import Actor, audit_record
from citadel.audit.verification import chain_verify
from tests.conftest import require

# Each writer process sets Django up, says it is ready, waits for the starting gun, then appends.
WRITER = """
import sys, time
from pathlib import Path
import django
django.setup()
from citadel.audit.services import Actor, audit_record
writer, count, gate = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
(gate / f"ready-{writer}").touch()
while not (gate / "go").exists():
    time.sleep(0.01)
for i in range(count):
    audit_record(actor=Actor.system(f"writer-{writer}"), action="test.concurrent", outcome="success",
                 target_type="writer", target_id=writer, details={"i": i})
"""


def assert_one_unbroken_chain(expected: int) -> None:
    result = chain_verify()
    assert result.ok, result.summary()
    sequences = list(AuditRecord.objects.order_by("sequence").values_list("sequence", flat=True))
    assert sequences == list(range(1, len(sequences) + 1))
    assert AuditRecord.objects.filter(action="test.concurrent").count() == expected
    hashes = AuditRecord.objects.values_list("prev_hash", flat=True)
    assert len(set(hashes)) == len(sequences)  # no two records claim the same predecessor: no fork


@pytest.mark.django_db(transaction=True)
def test_1000_concurrent_appends_from_several_processes_leave_one_unbroken_chain(cli_env, tmp_path):
    require(connection.vendor == "postgresql", "PostgreSQL on 127.0.0.1:5432")
    writers, each = 4, 250
    gate = tmp_path / "gate"
    gate.mkdir()
    processes = [subprocess.Popen([sys.executable, "-c", WRITER, str(w), str(each), str(gate)], env=cli_env,
                                  cwd=Path(__file__).resolve().parents[2]) for w in range(writers)]
    try:
        deadline = time.monotonic() + 120
        while len(list(gate.glob("ready-*"))) < writers:
            assert time.monotonic() < deadline and all(p.poll() is None for p in processes), "writers did not start"
            time.sleep(0.05)
        (gate / "go").touch()
        for process in processes:
            assert process.wait(timeout=300) == 0
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    assert_one_unbroken_chain(writers * each)
    interleaved = list(AuditRecord.objects.order_by("sequence").values_list("target_id", flat=True))
    switches = sum(a != b for a, b in zip(interleaved, interleaved[1:], strict=False))
    assert switches > writers, "the writers did not actually run at the same time"


@pytest.mark.django_db(transaction=True)
def test_concurrent_appends_from_threads_leave_one_unbroken_chain():
    errors = []

    def write(name: str) -> None:
        try:
            for i in range(25):
                audit_record(actor=Actor.system(name), action="test.concurrent", outcome="success", details={"i": i})
        except Exception as error:  # reported below
            errors.append(error)
        finally:
            from django.db import connection as thread_connection

            thread_connection.close()

    threads = [threading.Thread(target=write, args=(f"thread-{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert_one_unbroken_chain(100)
