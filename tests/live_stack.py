"""A running Citadel for end-to-end tests: gunicorn and a real Celery worker as separate processes,
on the test PostgreSQL database and Redis as the broker.

Used as a module-scoped fixture (see tests/conftest.py): rows it creates are committed so the
processes see them, and the database is flushed when the module is done.
"""

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
# Several test runs at once (e.g. two developers' sessions) each need their own broker database.
REDIS_URL = os.environ.get("CITADEL_TEST_BROKER_URL", "redis://127.0.0.1:6379/15")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LiveStack:
    base_url: str
    api_key: str
    env: dict
    pool: str
    logs: Path

    @property
    def v1(self) -> str:
        return f"{self.base_url}/v1"

    def log_tail(self, lines: int = 60) -> str:
        out = []
        for path in sorted(self.logs.glob("*.log")):
            out.append(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)


def process_env(database_url: str, data_dir: Path) -> dict:
    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE="citadel.settings.test", DATABASE_URL=database_url, CELERY_BROKER_URL=REDIS_URL,
        CITADEL_DATA_DIR=str(data_dir), CITADEL_WORKER_HEARTBEAT_SECONDS="1", CITADEL_REQUEST_TIMEOUT_SECONDS="120",
        # The browser tests sign in as a staff user; the second factor has its own tests (test_login.py).
        CITADEL_MFA_REQUIRED="false",
        PYTHONPATH=os.pathsep.join([str(ROOT / "platform"), str(ROOT), env.get("PYTHONPATH", "")]),
    )
    return env


def start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    handle = log.open("w")
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)


def wait_until(predicate, timeout: float, what: str, stack: "LiveStack | None" = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:  # not up yet
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{what} did not happen within {timeout}s\n{stack.log_tail() if stack else ''}")


def stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def launch(*, env: dict, pool: str, api_key: str, logs: Path) -> tuple[LiveStack, list[subprocess.Popen]]:
    port = free_port()
    processes = [
        start([sys.executable, "-m", "citadel.cli", "worker", "--pool", pool, "--name", f"{pool}@e2e",
               "--concurrency", "4", "--loglevel", "info"], env, logs / "worker.log"),
        start([sys.executable, "-m", "gunicorn", "citadel.wsgi:application", f"--bind=127.0.0.1:{port}",
               "--worker-class=gthread", "--workers=2", "--threads=8", "--timeout=0"], env, logs / "web.log"),
    ]
    stack = LiveStack(base_url=f"http://127.0.0.1:{port}", api_key=api_key, env=env, pool=pool, logs=logs)
    try:
        wait_until(lambda: httpx.get(f"{stack.base_url}/healthz").status_code == 200, 60, "gunicorn answering", stack)
    except BaseException:
        stop(processes)
        raise
    return stack, processes
