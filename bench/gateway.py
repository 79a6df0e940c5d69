"""`python -m bench.gateway`: the control plane's own overhead per request, under an open-loop load.

Citadel runs as in production, on this machine: gunicorn (production settings) in front of
PostgreSQL, Redis as the broker, and real Celery workers. The requests go to a model served by a
worker whose engine is the stub of citadel.jobs.engines (CITADEL_BENCH_STUB_ENGINE=1): it answers
at once, so the end-to-end latency of a request is the control plane's overhead (API key,
quota, residency policy, admission, audit, job row, Celery publish, the worker's claim and
result, the wait for it, the response) plus the stub's own time, which is below a microsecond and
counted as zero. Reported:

- `overhead_p50_ms`, `overhead_p99_ms`, `error_rate` at 100 requests per second with at most
  100 in flight (targets 15 ms, 50 ms, 0.001);
- `max_rps`: the highest rate of the steps tried that is sustained with p99 under 100 ms, no
  errors above 0.001 and at least 95% of the offered rate answered;
- `sse`: 64 concurrent streams from the real demo model (models/demo-v4, a second worker) while
  plain requests keep arriving; their latency beside the same load without streams shows whether
  streams starve other requests.

The load is open-loop: request i is sent at start + i / rate whatever the server does, at most
`--max-in-flight` at once, and its latency counts from that scheduled time, so a slow server
cannot hide its slowness by slowing the load (coordinated omission). That is why this is an
asyncio loop over httpx rather than locust, which is installable here: locust's users wait for
each response before sending the next request (a closed loop), and its load generator would
compete with the server for this machine's two cores through gevent as well.

PostgreSQL is a private cluster made with initdb and run by pg_ctl on a free port (removed at the
end), with room for every web thread's and worker thread's connection (max_connections 500): a
shared server's 100 connections would run out at 100 requests in flight and fail its other users.
Its durability settings are PostgreSQL's defaults (fsync and synchronous commits on), as in
production, since every request appends to the audit log. --server-url uses an existing server
instead (a scratch database on it). The Redis database given by --redis-url is emptied before
and after. Ends with one JSON line (also
written to --out). The numbers of a run on a busy shared machine are provisional.

    python -m bench.gateway --quick
    python -m bench.gateway --out bench/results/gateway-cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from . import machine

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "demo-v4"
TARGETS = {"overhead_p50_ms": 15.0, "overhead_p99_ms": 50.0, "error_rate": 0.001}
MAX_RPS_P99_MS = 100.0
# A request not answered this long after its scheduled time counts as an error, so that a phase on an
# overloaded server ends in bounded time (its queue is dropped, not drained for minutes).
LATE_SECONDS = 10.0
SETTLE_SECONDS = 5.0
STUB_MODEL, DEMO_MODEL = "bench-stub", "demo-v4"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gateway", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short phases (about two minutes in all)")
    parser.add_argument("--out", type=Path, help="also write the result here (JSON)")
    parser.add_argument("--server-url", default=os.environ.get("CITADEL_BENCH_POSTGRES_URL"),
                        help="an existing PostgreSQL server's database to create the scratch database from "
                             "(default: a private cluster made with initdb)")
    parser.add_argument("--redis-url", default=os.environ.get("CITADEL_BENCH_REDIS_URL", "redis://127.0.0.1:6379/4"),
                        help="the broker; this Redis database is emptied before and after the run")
    parser.add_argument("--rate", type=float, default=100.0, help="requests per second of the headline phase")
    parser.add_argument("--max-in-flight", type=int, default=100)
    parser.add_argument("--seconds", type=float, help="length of the headline phase (60; --quick 20)")
    parser.add_argument("--steps", help="comma-separated rates tried for max_rps, rising; stops at the first one not "
                                        "sustained (default 10,20,...,400; --quick fewer)")
    parser.add_argument("--step-seconds", type=float, help="length of each max_rps step (20; --quick 8)")
    parser.add_argument("--streams", type=int, default=64, help="concurrent SSE streams from the demo model")
    parser.add_argument("--stream-tokens", type=int, default=96, help="tokens each stream asks for")
    parser.add_argument("--background-rate", type=float, default=20.0,
                        help="plain requests per second sent while the streams run")
    parser.add_argument("--web-workers", type=int, default=2)
    parser.add_argument("--web-threads", type=int, default=96,
                        help="threads per gunicorn worker: each waiting request or stream holds one")
    parser.add_argument("--worker-concurrency", type=int, default=32, help="stub worker's task threads")
    args = parser.parse_args(argv)
    args.seconds = args.seconds or (20.0 if args.quick else 60.0)
    args.step_seconds = args.step_seconds or (8.0 if args.quick else 20.0)
    # From a rate any machine sustains upwards, so that max_rps is a number even where 100 per second is out of
    # reach (a 2-core machine that also runs the load generator, the database and the workers).
    default_steps = "20,40,60,100,150" if args.quick else "10,20,30,40,50,60,80,100,150,200,250,300,400"
    args.steps = [float(s) for s in (args.steps or default_steps).split(",")]
    return args


# -- the stack ------------------------------------------------------------------------------------

def _env(database_url: str, redis_url: str, data_dir: Path) -> dict:
    from citadel.audit.signing import generate_key_text

    return {
        **os.environ, "DJANGO_SETTINGS_MODULE": "citadel.settings.production", "DATABASE_URL": database_url,
        "CELERY_BROKER_URL": redis_url, "CITADEL_DATA_DIR": str(data_dir),
        "DJANGO_SECRET_KEY": secrets.token_urlsafe(50), "CITADEL_AUDIT_SIGNING_KEY": generate_key_text(),
        "ALLOWED_HOSTS": "127.0.0.1,localhost", "SECURE_SSL_REDIRECT": "false", "CITADEL_MFA_REQUIRED": "false",
        "CITADEL_WORKER_HEARTBEAT_SECONDS": "1",
        # Admission must not refuse the headline load (100 in flight): it is measured, not bounded, here.
        "CITADEL_POOL_QUEUE_LIMIT": "1000",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "platform"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }


def _prepare(env: dict) -> str:
    """Migrate the scratch database and create the key, site, pools, models and policy; the key."""
    os.environ.update({k: env[k] for k in ("DJANGO_SETTINGS_MODULE", "DATABASE_URL", "CELERY_BROKER_URL",
                                           "CITADEL_DATA_DIR", "DJANGO_SECRET_KEY", "CITADEL_AUDIT_SIGNING_KEY",
                                           "ALLOWED_HOSTS", "SECURE_SSL_REDIRECT")})
    sys.path[:0] = [str(ROOT / "platform"), str(ROOT)]
    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.db import connection

    from citadel.accounts.services import api_key_create
    from citadel.audit.services import Actor
    from citadel.registry.services import deployment_create, model_register, pool_create
    from citadel.residency.models import DataClass
    from citadel.residency.services import policy_create

    call_command("migrate", verbosity=0)
    actor = Actor.system("bench")
    user = get_user_model().objects.create_user("bench", password=secrets.token_urlsafe(16))
    key = api_key_create(user=user, name="bench", actor=actor)
    for name, model_name in (("bench-stub", STUB_MODEL), ("bench-demo", DEMO_MODEL)):
        pool = pool_create(name=name, site="bench", actor=actor)
        model = model_register(name=model_name, path=str(DEMO), actor=actor)
        deployment_create(model=model, pool=pool, actor=actor, engine_settings={"device": "cpu"})
    policy_create(team=None, data_class=DataClass.objects.get(name="internal"), actor=actor,
                  processing_sites=[pool.site], storage_sites=[pool.site], prompt_retention="metadata")
    connection.close()
    return key.key


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(env: dict, args: argparse.Namespace, port: int, logs: Path) -> list[subprocess.Popen]:
    def start(cmd, log, extra=None):
        return subprocess.Popen(cmd, cwd=ROOT, env={**env, **(extra or {})}, stdout=(logs / log).open("w"),
                                stderr=subprocess.STDOUT)

    python = sys.executable
    return [
        start([python, "-m", "gunicorn", "citadel.wsgi:application", f"--bind=127.0.0.1:{port}",
               "--worker-class=gthread", f"--workers={args.web_workers}", f"--threads={args.web_threads}",
               # Idle keep-alive connections are kept longer than any lull in the load: gunicorn's default (2 s)
               # closed some just as the client reused them, which counted as failed requests (ReadError).
               "--timeout=0", "--backlog=2048", "--keep-alive=75"], "web.log"),
        start([python, "-m", "citadel.cli", "worker", "--pool", "bench-stub", "--name", "bench-stub@bench",
               "--concurrency", str(args.worker_concurrency), "--loglevel", "warning"], "stub-worker.log",
              {"CITADEL_BENCH_STUB_ENGINE": "1"}),
        start([python, "-m", "citadel.cli", "worker", "--pool", "bench-demo", "--name", "bench-demo@bench",
               "--concurrency", str(max(args.streams, 1)), "--loglevel", "warning"], "demo-worker.log"),
    ]


def _wait_ready(base_url: str, processes, logs: Path, timeout: float = 180, workers: int = 2) -> None:
    """Until /healthz answers and `workers` workers are online with their model loaded."""
    import httpx
    from django.db import connection

    from citadel.registry.models import Worker

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for process in processes:
            if process.poll() is not None:
                raise RuntimeError(f"a process exited with {process.returncode}:\n" + _tail(logs))
        try:
            web = httpx.get(f"{base_url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            web = False
        loaded = Worker.objects.filter(status="online").exclude(loaded_models=[]).count()
        connection.close()
        if web and loaded >= workers:
            return
        time.sleep(0.5)
    raise TimeoutError("the stack did not come up:\n" + _tail(logs))


def _tail(logs: Path) -> str:
    return "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-30:])
                     for p in sorted(logs.glob("*.log")))


def _stop(processes) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


# -- the load -------------------------------------------------------------------------------------

def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _summary(samples: list[tuple[float, str | None]], offered: float, seconds: float) -> dict:
    latencies = [latency * 1000 for latency, error in samples if error is None]
    kinds: dict[str, int] = {}
    for _, error in samples:
        if error is not None:
            kinds[error] = kinds.get(error, 0) + 1
    errors = sum(kinds.values())
    return {"offered_rps": offered, "seconds": round(seconds, 2), "requests": len(samples), "errors": errors,
            "error_kinds": kinds,
            "error_rate": round(errors / len(samples), 5) if samples else None,
            "answered_rps": round(len(latencies) / seconds, 1) if seconds else None,
            "p50_ms": _round(_percentile(latencies, 0.50)), "p90_ms": _round(_percentile(latencies, 0.90)),
            "p99_ms": _round(_percentile(latencies, 0.99)), "max_ms": _round(max(latencies, default=None))}


def _round(value):
    return None if value is None else round(value, 2)


class Load:
    def __init__(self, client, key: str):
        self.client, self.headers = client, {"Authorization": f"Bearer {key}"}

    async def plain(self) -> str | None:
        """None when answered as expected, else what went wrong (the status code)."""
        body = {"model": STUB_MODEL, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}
        response = await self.client.post("/v1/chat/completions", json=body, headers=self.headers)
        if response.status_code == 200 and response.json()["choices"][0]["finish_reason"] == "length":
            return None
        return str(response.status_code)

    async def open_loop(self, *, rate: float, seconds: float, max_in_flight: int, stop: asyncio.Event | None = None
                        ) -> dict:
        """Plain requests at `rate` per second on a fixed schedule (until `seconds` or `stop`)."""
        loop = asyncio.get_running_loop()
        in_flight = asyncio.Semaphore(max_in_flight)
        samples: list[tuple[float, str | None]] = []

        async def one(scheduled: float) -> None:
            async with in_flight:
                if loop.time() - scheduled > LATE_SECONDS:  # the server fell this far behind: not sent at all
                    error = "not_sent"
                else:
                    try:
                        error = await asyncio.wait_for(self.plain(), timeout=LATE_SECONDS)
                    except Exception as failure:  # refused, timed out: an error like a 5xx
                        error = type(failure).__name__
            samples.append((loop.time() - scheduled, error))

        start, tasks, i = loop.time() + 0.05, [], 0
        while True:
            scheduled = start + i / rate
            if scheduled - start >= seconds or (stop is not None and stop.is_set()):
                break
            delay = scheduled - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(scheduled)))
            i += 1
        await asyncio.gather(*tasks)
        return _summary(samples, rate, loop.time() - start)

    async def stream(self, tokens: int) -> dict:
        body = {"model": DEMO_MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}],
                "max_tokens": tokens, "temperature": 0.8, "stream": True}
        started = time.perf_counter()
        first, chunks, done = None, 0, False
        try:
            async with self.client.stream("POST", "/v1/chat/completions", json=body, headers=self.headers) as reply:
                if reply.status_code != 200:
                    return {"ok": False, "status": reply.status_code}
                async for line in reply.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        break
                    if '"error"' in line[:20]:
                        break
                    chunks += 1
                    if first is None and chunks > 1:  # the first chunk is the role; the second carries text
                        first = time.perf_counter() - started
        except Exception as error:  # noqa: BLE001 - recorded as a failed stream
            return {"ok": False, "error": type(error).__name__}
        return {"ok": done, "ttft_s": first, "seconds": time.perf_counter() - started, "chunks": chunks}

    async def streams_with_background(self, *, streams: int, tokens: int, rate: float, max_in_flight: int) -> dict:
        stop = asyncio.Event()
        background = asyncio.create_task(self.open_loop(rate=rate, seconds=3600, max_in_flight=max_in_flight,
                                                        stop=stop))
        await asyncio.sleep(0.5)
        started = time.perf_counter()
        results = await asyncio.gather(*(self.stream(tokens) for _ in range(streams)))
        seconds = time.perf_counter() - started
        stop.set()
        plain = await background
        ttfts = [r["ttft_s"] * 1000 for r in results if r.get("ttft_s") is not None]
        return {"streams": streams, "completed": sum(1 for r in results if r["ok"]),
                "seconds": round(seconds, 2), "ttft_p50_ms": _round(_percentile(ttfts, 0.5)),
                "ttft_max_ms": _round(max(ttfts, default=None)),
                "chunks": sum(r.get("chunks", 0) for r in results), "plain_during_streams": plain}


async def _measure(base_url: str, key: str, args: argparse.Namespace) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=args.max_in_flight + args.streams + 16,
                          max_keepalive_connections=args.max_in_flight + args.streams + 16)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=120) as client:
        load = Load(client, key)
        await load.open_loop(rate=20, seconds=3, max_in_flight=args.max_in_flight)  # warm-up: connections, caches
        headline = await load.open_loop(rate=args.rate, seconds=args.seconds, max_in_flight=args.max_in_flight)
        steps = []
        for rate in args.steps:
            # An overloaded phase leaves jobs queued behind it (the worker still runs what the client gave up
            # on): let them drain, or the next phase measures the last one's backlog.
            await asyncio.sleep(SETTLE_SECONDS)
            step = await load.open_loop(rate=rate, seconds=args.step_seconds, max_in_flight=args.max_in_flight)
            step["sustained"] = bool(step["error_rate"] is not None and step["error_rate"] < TARGETS["error_rate"]
                                     and step["p99_ms"] is not None and step["p99_ms"] < MAX_RPS_P99_MS
                                     and step["answered_rps"] >= 0.95 * rate)
            steps.append(step)
            if not step["sustained"]:
                break
        await asyncio.sleep(SETTLE_SECONDS)
        alone = await load.open_loop(rate=args.background_rate, seconds=min(10.0, args.seconds),
                                     max_in_flight=args.max_in_flight)
        sse = await load.streams_with_background(streams=args.streams, tokens=args.stream_tokens,
                                                 rate=args.background_rate, max_in_flight=args.max_in_flight)
        sse["plain_alone"] = alone
    return {"headline": headline, "steps": steps, "sse": sse}


class PrivatePostgres:
    """A PostgreSQL cluster of the benchmark's own: initdb in a temporary folder, pg_ctl on a free port."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.data = root / "data"

    @staticmethod
    def _binary(name: str) -> str:
        import glob
        import shutil

        found = shutil.which(name) or (sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [None])[-1]
        if found is None:
            raise RuntimeError(f"{name} not found: install PostgreSQL's server package, or pass --server-url")
        return found

    def _run(self, *cmd: str) -> None:
        if os.geteuid() == 0:  # PostgreSQL will not run as root
            cmd = ("runuser", "-u", "postgres", "--", *cmd)
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)

    def start(self) -> str:
        import shutil

        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        self._run(self._binary("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = "
                       f"'{self.root}'\nmax_connections = 500\n")
        self._run(self._binary("pg_ctl"), "-D", str(self.data), "-l", str(self.root / "postgres.log"), "start",
                  "-w", "-t", "60")
        return f"postgres://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        try:
            self._run(self._binary("pg_ctl"), "-D", str(self.data), "stop", "-m", "immediate", "-w", "-t", "60")
        except (subprocess.SubprocessError, RuntimeError):
            pass


def run(args: argparse.Namespace) -> dict:
    import psycopg
    import redis

    name = f"citadel_bench_gateway_{os.getpid()}"
    processes, private = [], None
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as scratch:
        scratch = Path(scratch)
        scratch.chmod(0o755)  # the private cluster's user (postgres, when this runs as root) goes inside
        (scratch / "logs").mkdir()
        if args.server_url:
            server_url = args.server_url
        else:
            private = PrivatePostgres(scratch / "postgres")
            server_url = private.start()
        base, _, _ = server_url.rpartition("/")
        database_url = f"{base}/{name}"
        admin_url = server_url.replace("postgres://", "postgresql://", 1)
        env = _env(database_url, args.redis_url, scratch / "data")
        try:
            with psycopg.connect(admin_url, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
                admin.execute(f'CREATE DATABASE "{name}"')
            redis.Redis.from_url(args.redis_url).flushdb()
            key = _prepare(env)
            port = free_port()
            base_url = f"http://127.0.0.1:{port}"
            processes = _launch(env, args, port, scratch / "logs")
            _wait_ready(base_url, processes, scratch / "logs")
            measured = asyncio.run(_measure(base_url, key, args))
        finally:
            _stop(processes)
            from django.db import connection

            connection.close()
            if private is not None:
                private.stop()
            else:
                with psycopg.connect(admin_url, autocommit=True) as admin:
                    admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                                  [name])
                    admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
            redis.Redis.from_url(args.redis_url).flushdb()
    headline, steps, sse = measured["headline"], measured["steps"], measured["sse"]
    sustained = [step["offered_rps"] for step in steps if step["sustained"]]
    during = sse["plain_during_streams"]
    sse["starved"] = not (sse["completed"] == sse["streams"] and during["error_rate"] == 0
                          and during["p99_ms"] is not None and during["p99_ms"] < MAX_RPS_P99_MS)
    values = {"overhead_p50_ms": headline["p50_ms"], "overhead_p99_ms": headline["p99_ms"],
              "error_rate": headline["error_rate"]}
    return {
        "benchmark": "gateway", "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine.describe(), "code": machine.git_commit(), "quick": args.quick,
        "config": {"rate": args.rate, "max_in_flight": args.max_in_flight, "seconds": args.seconds,
                   "steps": args.steps, "step_seconds": args.step_seconds, "streams": args.streams,
                   "stream_tokens": args.stream_tokens, "background_rate": args.background_rate,
                   "web": f"gunicorn gthread {args.web_workers}x{args.web_threads}",
                   "stub_worker_concurrency": args.worker_concurrency, "broker": "redis",
                   "settings": "citadel.settings.production",
                   "postgres": "private cluster (initdb), default durability" if private else "given server"},
        **values,
        "max_rps": max(sustained, default=None),
        "headline": headline, "max_rps_steps": steps, "sse": sse,
        "targets": {name: {"target": target, "value": values[name],
                           "met": values[name] is not None and (values[name] < target if name == "error_rate"
                                                                else values[name] <= target)}
                    for name, target in TARGETS.items()},
        "notes": ["overhead = end-to-end latency with the stub engine, whose own time (under a microsecond) "
                  "counts as zero; latency counts from each request's scheduled send time (open loop)",
                  "the load generator runs on the same machine as the server and takes part of its CPU",
                  "provisional when the machine was shared: see machine.load_average_1m"],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM (a timeout, a kill) unwinds like Ctrl-C, so the processes, the database and the cluster go too.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    result = run(args)
    print(f"{'phase':<22}{'offered':>9}{'answered':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
    rows = [("headline", result["headline"])] + [("max_rps step", s) for s in result["max_rps_steps"]] + [
        ("plain, no streams", result["sse"]["plain_alone"]),
        (f"plain, {result['sse']['streams']} streams", result["sse"]["plain_during_streams"])]
    for label, row in rows:
        print(f"{label:<22}{row['offered_rps']:>9.0f}{row['answered_rps'] or 0:>10.1f}{row['p50_ms'] or 0:>9.1f}"
              f"{row['p99_ms'] or 0:>9.1f}{row['errors']:>8}")
    line = json.dumps(result, separators=(",", ":"))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
