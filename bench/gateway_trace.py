"""`python -m bench.gateway_trace`: where one inference request's time goes, statement by statement.

bench.gateway measures the control plane's overhead under load; this explains it. It brings up the
same stack (production settings, gunicorn, a stub-engine Celery worker, a private PostgreSQL cluster
that logs every statement with its millisecond timestamp, process and application name), sends
`--requests` plain requests one after another, and prints:

- the CPU time the web process, the worker and PostgreSQL spent per request (the server's capacity
  on this machine is about cores / that sum, whatever the load generator does);
- the statements per request, by process (web, worker);
- the last request's statements on one time line from its send, so the waits (a commit's flush, the
  broker, the wake-up of the waiting web thread) show between them.

Run it on a quiet machine for absolute numbers; the counts and the CPU per request hold on a busy one.

    python -m bench.gateway_trace --requests 40
    python -m bench.gateway_trace --path /v1/completions
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from . import gateway

LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) UTC \[(\d+)\] (\S*) (.*)$")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.gateway_trace", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--path", default="/v1/chat/completions", choices=["/v1/chat/completions", "/v1/completions"])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/13", help="emptied before and after")
    return parser.parse_args(argv)


def _cpu_seconds(processes) -> float:
    import psutil

    total = 0.0
    for process in processes:
        for each in [process, *process.children(recursive=True)]:
            try:
                times = each.cpu_times()
                total += times.user + times.system
            except psutil.Error:
                pass
    return total


def _statements(log: Path) -> list[tuple[float, str, str, str]]:
    entries = []
    for line in log.read_text(errors="replace").splitlines():
        match = LINE.match(line)
        if match and "duration:" in match.group(4):
            when = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=UTC).timestamp()
            entries.append((when, match.group(2), match.group(3), match.group(4)))
    return entries


def trace(args) -> None:
    import httpx
    import psutil
    import psycopg
    import redis

    with tempfile.TemporaryDirectory(prefix="bench-gateway-trace-") as scratch:
        scratch = Path(scratch)
        scratch.chmod(0o755)
        (scratch / "logs").mkdir()
        cluster = gateway.PrivatePostgres(scratch / "postgres")
        server_url = cluster.start()
        processes = []
        try:
            with (cluster.data / "postgresql.conf").open("a") as conf:
                conf.write("\nlog_min_duration_statement = 0\nlog_line_prefix = '%m [%p] %a '\n")
            cluster._run(cluster._binary("pg_ctl"), "-D", str(cluster.data), "reload")
            with psycopg.connect(server_url.replace("postgres://", "postgresql://", 1), autocommit=True) as admin:
                admin.execute('CREATE DATABASE "trace"')
            redis.Redis.from_url(args.redis_url).flushdb()
            env = gateway._env(server_url.rpartition("/")[0] + "/trace", args.redis_url, scratch / "data")
            key = gateway._prepare(env)
            port = gateway.free_port()
            logs = scratch / "logs"
            python = sys.executable
            processes = [
                subprocess.Popen([python, "-m", "gunicorn", "citadel.wsgi:application", f"--bind=127.0.0.1:{port}",
                                  "--worker-class=gthread", "--workers=1", "--threads=8", "--timeout=0"],
                                 cwd=gateway.ROOT, env={**env, "PGAPPNAME": "web"},
                                 stdout=(logs / "web.log").open("w"), stderr=subprocess.STDOUT),
                subprocess.Popen([python, "-m", "citadel.cli", "worker", "--pool", "bench-stub", "--name",
                                  "bench-stub@trace", "--concurrency", "4", "--loglevel", "warning"],
                                 cwd=gateway.ROOT, env={**env, "PGAPPNAME": "worker", "CITADEL_BENCH_STUB_ENGINE": "1"},
                                 stdout=(logs / "worker.log").open("w"), stderr=subprocess.STDOUT),
            ]
            gateway._wait_ready(f"http://127.0.0.1:{port}", processes, logs, workers=1)
            body = ({"model": gateway.STUB_MODEL, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}
                    if "chat" in args.path else {"model": gateway.STUB_MODEL, "prompt": "ping", "max_tokens": 1})
            postmaster = psutil.Process(int((cluster.data / "postmaster.pid").read_text().split()[0]))
            watched = [psutil.Process(p.pid) for p in processes]
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30,
                              headers={"Authorization": f"Bearer {key}"}) as client:
                for _ in range(5):  # warm-up: connections, caches
                    client.post(args.path, json=body).raise_for_status()
                before = [_cpu_seconds(watched[:1]), _cpu_seconds(watched[1:]), _cpu_seconds([postmaster])]
                windows = []
                for _ in range(args.requests):
                    sent = time.time()
                    client.post(args.path, json=body).raise_for_status()
                    windows.append((sent, time.time()))
                    time.sleep(0.05)
                after = [_cpu_seconds(watched[:1]), _cpu_seconds(watched[1:]), _cpu_seconds([postmaster])]
            time.sleep(1.0)  # the log catches up
            _report(args, windows, before, after, _statements(cluster.root / "postgres.log"))
        finally:
            gateway._stop(processes)
            from django.db import connection

            connection.close()
            cluster.stop()
            redis.Redis.from_url(args.redis_url).flushdb()


def _report(args, windows, before, after, entries) -> None:
    n = len(windows)
    latencies = sorted((end - sent) * 1000 for sent, end in windows)
    cpu = [(b - a) * 1000 / n for a, b in zip(before, after, strict=True)]
    cores = os.cpu_count() or 1
    print(f"{n} requests to {args.path}, one at a time; load average {machine_load():.1f}")
    print(f"latency ms: min {latencies[0]:.1f}  p50 {latencies[n // 2]:.1f}  max {latencies[-1]:.1f}")
    print(f"CPU ms per request: web {cpu[0]:.1f}  worker {cpu[1]:.1f}  PostgreSQL {cpu[2]:.1f}  "
          f"(sum {sum(cpu):.1f}: at most about {cores * 1000 / max(sum(cpu), 0.001):.0f} requests/s on {cores} cores)")
    counts = []
    for sent, end in windows[-10:]:
        by_app: dict[str, int] = {}
        for when, _, app, _ in entries:
            if sent - 0.001 <= when <= end + 0.01:
                by_app[app] = by_app.get(app, 0) + 1
        counts.append(by_app)
    print("statements per request (last 10):", counts)
    sent, end = windows[-1]
    print(f"--- the last request ({(end - sent) * 1000:.1f} ms), ms from its send; a statement is logged as it ends")
    for when, pid, app, text in entries:
        if sent - 0.001 <= when <= end + 0.01:
            statement = text.split("statement: ", 1)[-1]
            duration = text.split("duration: ", 1)[-1].split(" ms", 1)[0]
            print(f"{(when - sent) * 1000:8.1f}  {app:<7}{pid:>8}  {duration:>7} ms  {statement[:150]}")


def machine_load() -> float:
    return os.getloadavg()[0]


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    trace(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
