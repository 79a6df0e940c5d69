"""Wake the web threads that wait for a job when its worker commits something (PostgreSQL LISTEN/NOTIFY).

A web thread answering a request follows its job by reading the job row and its chunk rows
(citadel.jobs.selectors.job_follow). Polling them on a fixed interval added half an interval to
every request on average, and cost two queries per interval per waiting request. Now the worker
sends `NOTIFY citadel_jobs, '<job id>'` in the transaction that writes a chunk or the outcome
(PostgreSQL delivers it at commit, so the row is visible when the waiter wakes), and one listener
thread per web process, on a connection of its own, wakes the threads waiting for that job. The
rows stay the only source of truth: a waiter always reads them again after waking, and still
wakes every CITADEL_JOB_WAKEUP_CHECK_SECONDS without a notification (a dead worker, a listener
reconnecting after a database restart). On SQLite (the embedded `make run`), or while the listener
is not connected, waiters poll every CITADEL_STREAM_POLL_SECONDS as before.

The waiter table is process state shared by the web threads, as the engine cache is on workers.
"""

import logging
import threading
import time
import uuid
from contextlib import contextmanager

from django.conf import settings
from django.db import connection

logger = logging.getLogger(__name__)

CHANNEL = "citadel_jobs"
IDLE_SECONDS = 2.0  # a listener with no waiter for this long closes its connection (test databases can be dropped)


def job_notify(job_id) -> None:
    """Tell waiting web threads that job `job_id` changed (delivered when the current transaction commits)."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_notify(%s, %s)", [CHANNEL, notify_payload(job_id)])


def notify_payload(job_id) -> str:
    """The notification payload naming job `job_id` (its UUID as text)."""
    return str(job_id if isinstance(job_id, uuid.UUID) else uuid.UUID(str(job_id)))


class _Listener:
    def __init__(self):
        self._waiters: dict[str, set[threading.Event]] = {}
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_wait = time.monotonic()

    def _start(self) -> None:
        with self._lock:
            self._last_wait = time.monotonic()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="citadel-job-wakeups", daemon=True)
                self._thread.start()

    def _conninfo(self) -> dict:
        db = settings.DATABASES["default"]
        info = {"dbname": db["NAME"], "user": db.get("USER") or None, "password": db.get("PASSWORD") or None,
                "host": db.get("HOST") or None, "port": db.get("PORT") or None}
        return {key: value for key, value in info.items() if value is not None}

    def _run(self) -> None:
        import psycopg

        while self._wanted():
            try:
                with psycopg.connect(**self._conninfo(), autocommit=True) as listening:
                    listening.execute(f"LISTEN {CHANNEL}")
                    self._connected.set()
                    while self._wanted():
                        for notice in listening.notifies(timeout=IDLE_SECONDS):
                            with self._lock:
                                events = list(self._waiters.get(notice.payload, ()))
                            for event in events:
                                event.set()
            except Exception:  # the database restarted or refused us: waiters poll until we are back
                logger.warning("job wake-up listener disconnected; retrying", exc_info=True)
                self._connected.clear()
                time.sleep(1.0)
            self._connected.clear()

    def _wanted(self) -> bool:
        """Whether anyone waits; the thread ends (and its connection closes) after IDLE_SECONDS without."""
        with self._lock:
            if self._waiters or time.monotonic() - self._last_wait < IDLE_SECONDS:
                return True
            self._thread = None
            return False

    @contextmanager
    def waiter(self, job_id):
        """An Event set whenever job `job_id` is notified, for as long as the block runs."""
        key, event = notify_payload(job_id), threading.Event()
        if connection.vendor == "postgresql":
            self._start()
        with self._lock:
            self._waiters.setdefault(key, set()).add(event)
            self._last_wait = time.monotonic()
        try:
            yield event
        finally:
            with self._lock:
                waiting = self._waiters.get(key)
                if waiting is not None:
                    waiting.discard(event)
                    if not waiting:
                        del self._waiters[key]

    def timeout(self) -> float:
        """How long a waiter sleeps without a notification."""
        if self._connected.is_set():
            return max(settings.CITADEL_STREAM_POLL_SECONDS, settings.CITADEL_JOB_WAKEUP_CHECK_SECONDS)
        return settings.CITADEL_STREAM_POLL_SECONDS


listener = _Listener()
