"""`python -m bench.audit`: appends per second to Citadel's hash-chained audit log on PostgreSQL,
side by side with the baseline of plain, unchained INSERTs of the same rows, in one run.

Both systems write the same rows through the Django ORM, one transaction per record, the way
the application does: `citadel` calls `audit_record` (one server-side function: advisory lock, head
read, SHA-256 over the canonical encoding, insert; then the commit and, when others were
appending, a WAL flush after it); `baseline_plain_insert` is `Model.objects.create` on a copy
of the table with an auto-increment key and no chain (what the audit log was before). Each runs
in one process, then in several processes at once (a starting gun, so they overlap), the shape
of several web processes. The chain is verified at the end. The run uses a scratch database
created on the server and dropped afterwards, and ends with one JSON line (also written to --out)
holding the machine, the commit and `appends_per_second` (Citadel, several processes).

    python -m bench.audit --quick
    python -m bench.audit --out bench/results/audit-postgresql.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from . import machine

ROOT = Path(__file__).resolve().parents[1]
TARGET = 1000.0
SYSTEMS = ("citadel", "baseline_plain_insert")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.audit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--appends", type=int, default=5000, help="records per system and phase (5000)")
    parser.add_argument("--processes", type=int, default=4, help="writer processes in the concurrent phase (4)")
    parser.add_argument("--quick", action="store_true", help="a few hundred records, for a smoke test")
    parser.add_argument("--server-url", default=os.environ.get("BENCH_POSTGRES_URL",
                                                               "postgres://postgres@127.0.0.1:5432/postgres"),
                        help="a PostgreSQL database where the scratch database can be created")
    parser.add_argument("--out", type=Path, help="also write the result JSON to this file")
    parser.add_argument("--child", choices=SYSTEMS, help=argparse.SUPPRESS)
    parser.add_argument("--database-url", help=argparse.SUPPRESS)
    parser.add_argument("--gate", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--name", default="0", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.appends, args.processes = min(args.appends, 300), min(args.processes, 2)
    return args


def _django(database_url: str) -> None:
    os.environ["DATABASE_URL"] = database_url
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "citadel.settings.test")
    if str(ROOT / "platform") not in sys.path:
        sys.path.insert(0, str(ROOT / "platform"))
    import django

    django.setup()


@functools.cache
def _plain_model():
    """The baseline's table: the audit table's columns and indexes with an auto-increment key, no
    chain, no trigger."""
    from django.db import models

    from citadel.audit.models import AuditRecord

    fields = {f.name: f.clone() for f in AuditRecord._meta.fields if f.name != "sequence"}
    meta = type("Meta", (), {"app_label": "bench_audit", "db_table": "bench_audit_plain", "indexes": [
        models.Index(fields=["actor_type", "actor_id"], name="bench_plain_actor"),
        models.Index(fields=["target_type", "target_id"], name="bench_plain_target")]})
    return type("PlainAuditRecord", (models.Model,), {
        "__module__": __name__, "Meta": meta, "id": models.BigAutoField(primary_key=True), **fields})


def _writer(system: str):
    """A function that writes record number i the way `system` does."""
    from citadel.audit.services import Actor, audit_record

    actor = Actor("api_key", "17", "k3y5 (bench)")

    def row(i: int) -> dict:
        return dict(action="inference.chat", outcome="success", target_type="model", target_id="demo-v4",
                    request_id=f"req_{os.getpid()}_{i:08d}", source_address="10.1.2.3",
                    details={"job": f"{i:032x}", "pool": "gpu-a", "stream": True, "i": i})

    if system == "citadel":
        return lambda i: audit_record(actor=actor, **row(i))
    plain = _plain_model()
    return lambda i: plain.objects.create(actor_type=actor.type, actor_id=actor.id, actor_label=actor.label,
                                          **row(i))


def child(args: argparse.Namespace) -> None:
    """One writer process: set up, say ready, wait for the gun, append, print its start and end."""
    _django(args.database_url)
    write = _writer(args.child)
    write(-1)  # connect and warm up before the clock starts
    (args.gate / f"ready-{args.name}").touch()
    while not (args.gate / "go").exists():
        time.sleep(0.002)
    start = time.time()
    for i in range(args.appends):
        write(i)
    print(json.dumps({"start": start, "end": time.time(), "appends": args.appends}))


def _concurrent(system: str, args: argparse.Namespace, database_url: str, gate_root: Path) -> dict:
    gate = gate_root / system
    gate.mkdir()
    each = args.appends // args.processes
    command = [sys.executable, "-m", "bench.audit", "--child", system, "--database-url", database_url,
               "--gate", str(gate), "--appends", str(each)]
    processes = [subprocess.Popen([*command, "--name", str(n)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
                 for n in range(args.processes)]
    deadline = time.monotonic() + 120
    while len(list(gate.glob("ready-*"))) < args.processes:
        if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in processes):
            raise RuntimeError(f"{system}: the writer processes did not start")
        time.sleep(0.01)
    (gate / "go").touch()
    reports = []
    for process in processes:
        out, _ = process.communicate(timeout=1800)
        if process.returncode != 0:
            raise RuntimeError(f"{system}: a writer process failed")
        reports.append(json.loads(out.strip().splitlines()[-1]))
    total = sum(r["appends"] for r in reports)
    seconds = max(r["end"] for r in reports) - min(r["start"] for r in reports)
    return {"processes": args.processes, "appends": total, "seconds": round(seconds, 3),
            "appends_per_second": round(total / seconds, 1)}


def _single(system: str, args: argparse.Namespace) -> dict:
    write = _writer(system)
    write(-1)
    start = time.perf_counter()
    for i in range(args.appends):
        write(i)
    seconds = time.perf_counter() - start
    return {"processes": 1, "appends": args.appends, "seconds": round(seconds, 3),
            "appends_per_second": round(args.appends / seconds, 1)}


def run(args: argparse.Namespace) -> dict:
    import tempfile

    import psycopg

    name = f"citadel_bench_audit_{os.getpid()}"
    base, _, _ = args.server_url.rpartition("/")
    database_url = f"{base}/{name}"
    with psycopg.connect(args.server_url.replace("postgres://", "postgresql://", 1), autocommit=True) as admin:
        server_version = admin.execute("SHOW server_version").fetchone()[0]
        settings_shown = {key: admin.execute(f"SHOW {key}").fetchone()[0]
                          for key in ("synchronous_commit", "fsync", "shared_buffers")}
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        _django(database_url)
        from django.core.management import call_command
        from django.db import connection

        from citadel.audit.verification import chain_verify

        call_command("migrate", verbosity=0)
        with connection.schema_editor() as editor:
            editor.create_model(_plain_model())
        results = {system: {} for system in SYSTEMS}
        with tempfile.TemporaryDirectory() as gates:
            for system in SYSTEMS:  # one after the other, never at the same time
                results[system]["single_process"] = _single(system, args)
                connection.close()
                results[system]["concurrent"] = _concurrent(system, args, database_url, Path(gates))
        verified = chain_verify(trusted_keys={})
        connection.close()
    finally:
        with psycopg.connect(args.server_url.replace("postgres://", "postgresql://", 1), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", [name])
            admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
    citadel, baseline = results["citadel"], results["baseline_plain_insert"]
    headline = citadel["concurrent"]["appends_per_second"]
    return {
        "benchmark": "audit", "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine.describe(), "code": machine.git_commit(),
        "database": {"engine": "postgresql", "version": server_version, **settings_shown},
        "appends": args.appends, "processes": args.processes, "quick": args.quick,
        "systems": results,
        "chain_verified": verified.ok, "chain_records": verified.records,
        "appends_per_second": headline,
        "appends_per_second_single_process": citadel["single_process"]["appends_per_second"],
        "ratio_vs_baseline": {phase: round(citadel[phase]["appends_per_second"]
                                           / baseline[phase]["appends_per_second"], 3)
                              for phase in ("single_process", "concurrent")},
        "targets": {"appends_per_second": {"target": TARGET, "value": headline, "met": headline >= TARGET},
                    "appends_per_second_single_process": {
                        "target": TARGET, "value": citadel["single_process"]["appends_per_second"],
                        "met": citadel["single_process"]["appends_per_second"] >= TARGET}},
        "notes": ["one transaction per record in every system, on disk before the writer goes on: the baseline "
                  "by a synchronous commit; Citadel by one too when the chain lock was free, else by an "
                  "asynchronous commit and a WAL flush after it, outside the lock",
                  "chain_verified: the chain written by all phases verifies (hashes, links)"],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    result = run(args)
    print(f"{'system':<24}{'phase':<16}{'appends/s':>12}")
    for system, phases in result["systems"].items():
        for phase, numbers in phases.items():
            print(f"{system:<24}{phase:<16}{numbers['appends_per_second']:>12.1f}")
    line = json.dumps(result, separators=(",", ":"))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(line)
    return 0 if result["chain_verified"] else 1


if __name__ == "__main__":
    sys.exit(main())
