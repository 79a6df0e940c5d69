"""A whole Citadel on private services, for the fault tests: gunicorn, two workers of pool `chaos`
serving demo-v4, a housekeeping worker and celery beat (which runs the reconciler every 2 s), on
a private PostgreSQL and a private broker (Redis or RabbitMQ) that the tests may kill and restart.

Leases are short here (12 s, renewed every second) so that a killed worker's jobs are taken back
within seconds; RELIABILITY.md gives the production values. Not shorter: on a loaded machine (load
30 on two cores) a live worker's renewals were seen to stall for more than 4 s, so a 4 s lease took
jobs back from workers that were alive, and every round waited for them to bounce between workers. The test process reads the database
with plain SQL (psycopg): it is not the database pytest-django manages.
"""

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg

from tests import live_stack as ls

LEASE_SECONDS = 12.0
WORKERS = ("chaos@a", "chaos@b")
TERMINAL = ("succeeded", "failed", "cancelled")


@dataclass
class ChaosStack:
    root: Path
    database_url: str
    broker_url: str
    broker: object
    postgres: object
    extra_env: dict = field(default_factory=dict)
    processes: dict = field(default_factory=dict)
    base_url: str = ""
    api_key: str = ""
    restarts: list = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stopping: threading.Event = field(default_factory=threading.Event)

    # -- set-up ---------------------------------------------------------------------------------

    @property
    def env(self) -> dict:
        env = ls.process_env(self.database_url, self.root / "data")
        env.update(CELERY_BROKER_URL=self.broker_url, CITADEL_JOB_LEASE_SECONDS=str(LEASE_SECONDS),
                   CITADEL_JOB_LEASE_RENEW_SECONDS="1", CITADEL_RECONCILE_SECONDS="2",
                   CITADEL_JOB_RESEND_SECONDS="15", CITADEL_FINETUNE_DEVICE="cpu", CITADEL_REQUEST_TIMEOUT_SECONDS="240",
                   CITADEL_AUDIT_CHECKPOINT_SECONDS="20",
                   # One torch thread per process: on a shared, loaded machine torch's intra-op threads
                   # spin against each other and a 16-token reply of the tiny model took ~50 s instead of
                   # ~0.5 s, which made a kill round last a minute. Nothing the tests check depends on it.
                   OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        env.update(self.extra_env)
        return env

    def logs(self) -> Path:
        path = self.root / "logs"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def citadel(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "citadel.cli", *args], env=self.env, cwd=ls.ROOT,
                              capture_output=True, text=True, check=check, timeout=timeout)

    def setup(self, tiny_checkpoint) -> None:
        self.citadel("migrate", "--noinput")
        store = self.root / "store"
        store.mkdir(parents=True, exist_ok=True)
        made = subprocess.run([sys.executable, "-m", "tests.chaos.world", str(store),
                               str(tiny_checkpoint)], env=self.env, cwd=ls.ROOT,
                              capture_output=True, text=True, check=True, timeout=300)
        self.api_key = made.stdout.strip().splitlines()[-1]

    def start(self) -> None:
        port = ls.free_port()
        self.base_url = f"http://127.0.0.1:{port}"
        self._spawn("web", [sys.executable, "-m", "gunicorn", "citadel.wsgi:application", f"--bind=127.0.0.1:{port}",
                            "--worker-class=gthread", "--workers=2", "--threads=16", "--timeout=0"])
        self._spawn("housekeeping", [sys.executable, "-m", "citadel.cli", "worker", "--pool", "housekeeping",
                                     "--name", "housekeeping@chaos", "--control", "--concurrency", "2"])
        self._spawn("beat", [sys.executable, "-m", "celery", "-A", "citadel.celery", "beat", "--loglevel", "info",
                             "-s", str(self.root / "beat-schedule")])
        for name in WORKERS:
            self.start_worker(name)
        self.wait(lambda: httpx.get(f"{self.base_url}/healthz", timeout=2).status_code == 200, 90, "gunicorn answering")
        for name in WORKERS:
            self.wait_worker_online(name)
        threading.Thread(target=self._supervise, name="chaos-supervisor", daemon=True).start()

    def _supervise(self) -> None:
        """Restart a worker process that exits by itself, as systemd's Restart=on-failure does in
        production (ansible/roles/citadel_worker): Celery ends a worker whose broker connection
        fails in a way it cannot recover from (seen when Redis restarts under load)."""
        while not self._stopping.wait(1.0):
            with self._lock:
                for key, process in list(self.processes.items()):
                    if key in ("web", "beat") or process.poll() is None:
                        continue
                    self.restarts.append((key, process.returncode))
                    if key == "housekeeping":
                        self._spawn("housekeeping", [sys.executable, "-m", "citadel.cli", "worker", "--pool",
                                                     "housekeeping", "--name", "housekeeping@chaos", "--control",
                                                     "--concurrency", "2"])
                    else:
                        self.start_worker(key)

    def _spawn(self, key: str, cmd: list[str]) -> subprocess.Popen:
        log = self.logs() / f"{key.replace('@', '-')}.log"
        handle = log.open("a")
        process = subprocess.Popen(cmd, env=self.env, cwd=ls.ROOT, stdout=handle, stderr=subprocess.STDOUT)
        self.processes[key] = process
        return process

    def start_worker(self, name: str) -> subprocess.Popen:
        return self._spawn(name, [sys.executable, "-m", "citadel.cli", "worker", "--pool", "chaos", "--name", name,
                                  "--concurrency", "4", "--loglevel", "info"])

    def kill_worker(self, name: str) -> None:
        """SIGKILL the worker and start it again at once, as its supervisor would."""
        with self._lock:
            process = self.processes[name]
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
            self.start_worker(name)

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            ls.stop(list(self.processes.values()))

    # -- reading the truth ----------------------------------------------------------------------

    def sql(self, query: str, params: tuple = ()) -> list[tuple]:
        with psycopg.connect(self.database_url.replace("postgres://", "postgresql://"), connect_timeout=5,
                             autocommit=True) as conn:
            return conn.execute(query, params).fetchall()

    def wait(self, predicate, timeout: float, what: str, interval: float = 0.2):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                value = predicate()
                if value:
                    return value
            except Exception:  # a service is (re)starting
                pass
            time.sleep(interval)
        raise TimeoutError(f"{what} did not happen within {timeout}s\n{self.log_tail()}")

    def wait_worker_online(self, name: str, timeout: float = 300) -> None:
        pid = self.processes[name].pid
        self.wait(lambda: self.sql("SELECT 1 FROM registry_worker WHERE name = %s AND pid = %s AND status = 'online' "
                                   "AND loaded_models::text <> '[]' AND last_heartbeat > now() - interval '5 seconds'",
                                   (name, pid)), timeout, f"worker {name} (pid {pid}) online with its model")

    def log_tail(self, lines: int = 40) -> str:
        out = []
        for path in sorted(self.logs().glob("*.log")):
            out.append(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)

    # -- the API --------------------------------------------------------------------------------

    def chat(self, seed: int, max_tokens: int = 24, timeout: float = 300) -> httpx.Response:
        return httpx.post(f"{self.base_url}/v1/chat/completions", timeout=timeout,
                          headers={"Authorization": f"Bearer {self.api_key}"},
                          json={"model": "tiny", "max_tokens": max_tokens, "temperature": 0.9, "seed": seed,
                                "messages": [{"role": "user", "content": f"Tell me about order {seed}."}]})

    def chats(self, seeds, max_tokens: int = 24) -> list:
        """Send the chats at once; each result is the response or the exception that ended it."""
        def one(seed):
            try:
                return self.chat(seed, max_tokens=max_tokens)
            except Exception as error:  # recorded, asserted on by the caller
                return error

        seeds = list(seeds)
        with ThreadPoolExecutor(max_workers=len(seeds)) as pool:
            return list(pool.map(one, seeds))


def check_no_duplicate_side_effects(stack: ChaosStack) -> dict:
    """Every inference job is finished, and each has exactly the side effects of one run: one usage
    row and one audit completion record when it succeeded, one audit completion when it failed."""
    jobs = stack.sql("SELECT id, status, attempts, error_code FROM jobs_inferencejob")
    usage = dict(stack.sql("SELECT source, count(*) FROM usage_usagerecord WHERE source LIKE 'job:%%' GROUP BY source"))
    completions = dict(stack.sql("SELECT details->>'job', count(*) FROM audit_auditrecord "
                                 "WHERE action LIKE 'inference.%%.complete' GROUP BY 1"))
    counts = {"jobs": len(jobs), "succeeded": 0, "failed": 0, "requeued": 0}
    for job_id, status, attempts, error_code in jobs:
        assert status in TERMINAL, f"job {job_id} is {status}"
        counts[status] += 1
        counts["requeued"] += attempts > 1
        # A request refused at submit (no live worker) is recorded by its request's own audit record.
        expected = 0 if error_code == "no_worker" else 1
        assert completions.get(str(job_id), 0) == expected, \
            f"job {job_id} ({status} {error_code}): {completions.get(str(job_id), 0)} completions"
        assert usage.get(f"job:{job_id.hex}", 0) == (1 if status == "succeeded" else 0), \
            f"job {job_id} ({status}): {usage.get(f'job:{job_id.hex}', 0)} usage rows"
    return counts
