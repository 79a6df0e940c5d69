"""`citadel serve`: web, worker and beat on one machine, as `make run` starts them.

Each is a real separate process (gunicorn, a Celery worker, Celery beat), supervised here:
Ctrl-C stops all three, and if one dies the others are stopped too, so nothing half-runs.

The defaults (2 gunicorn workers x 40 threads) hold 64 concurrent token streams (each holds a
thread) with 16 threads left for pages and API calls. Each thread may hold a PostgreSQL connection,
so at start the processes' total is checked against the server's max_connections and a warning
says what to raise when it does not fit (citadel.core.connection_budget).
"""

import os
import signal
import subprocess
import sys
import time

from django.conf import settings
from django.core.management.base import BaseCommand

from citadel.core.connection_budget import (
    SERVE_WEB_THREADS,
    SERVE_WEB_WORKERS,
    SERVE_WORKER_CONCURRENCY,
    budget_check,
    connections_needed,
)
from citadel.core.management.commands.bootstrap import LOCAL_POOL


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(settings.REPO_DIR / "platform"), str(settings.REPO_DIR),
                                                       env.get("PYTHONPATH", "")]))
    env["CITADEL_DATA_DIR"] = str(settings.DATA_DIR)
    return env


class Command(BaseCommand):
    help = "Run web (gunicorn), one worker and beat together on this machine."

    def add_arguments(self, parser):
        parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
        parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
        parser.add_argument("--web-workers", type=int, default=SERVE_WEB_WORKERS)
        parser.add_argument("--web-threads", type=int, default=SERVE_WEB_THREADS,
                            help="Threads per web worker; each token stream holds one.")
        parser.add_argument("--worker-concurrency", type=int, default=SERVE_WORKER_CONCURRENCY)

    def connection_warning(self, *, web_workers: int, web_threads: int, worker_concurrency: int) -> str | None:
        """The warning to print when these processes may hold more connections than PostgreSQL allows."""
        needed = connections_needed(web_workers=web_workers, web_threads=web_threads,
                                    worker_concurrency=[worker_concurrency])
        budget = budget_check(needed=needed)
        return budget.warning(web_workers=web_workers, web_threads=web_threads) if budget else None

    def handle(self, *args, host, port, web_workers, web_threads, worker_concurrency, **options):
        warning = self.connection_warning(web_workers=web_workers, web_threads=web_threads,
                                          worker_concurrency=worker_concurrency)
        if warning:
            self.stderr.write(self.style.WARNING(f"Warning: {warning}"))
        python = sys.executable
        commands = {
            "web": [python, "-m", "gunicorn", "citadel.wsgi:application", f"--bind={host}:{port}",
                    "--worker-class=gthread", f"--workers={web_workers}", f"--threads={web_threads}",
                    "--timeout=0", "--access-logfile=-"],
            "worker": [python, "-m", "citadel.cli", "worker", f"--pool={LOCAL_POOL}", "--control",
                       f"--concurrency={worker_concurrency}"],
            "beat": [python, "-m", "celery", "-A", "citadel", "beat", "--loglevel=info",
                     f"--schedule={settings.DATA_DIR / 'celerybeat-schedule'}"],
        }
        (settings.DATA_DIR / "broker" / "queue").mkdir(parents=True, exist_ok=True)
        (settings.DATA_DIR / "broker" / "processed").mkdir(parents=True, exist_ok=True)
        children = {name: subprocess.Popen(cmd, env=_env()) for name, cmd in commands.items()}
        self.stdout.write(self.style.SUCCESS(f"Citadel is starting on http://{host}:{port}/ (Ctrl-C stops it)"))
        stopping = False

        def stop(signum=None, frame=None):
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        exit_code = 0
        while not stopping:
            for name, child in children.items():
                if child.poll() is not None:
                    self.stderr.write(f"{name} exited with status {child.returncode}; stopping the others")
                    exit_code, stopping = child.returncode or 1, True
            time.sleep(0.5)
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for child in children.values():
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
        sys.exit(exit_code)
