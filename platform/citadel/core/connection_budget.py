"""How many PostgreSQL connections Citadel's processes may hold at once, against max_connections.

Every gunicorn thread can hold a connection: a token stream (SSE) keeps its thread, and so its
connection, for the whole generation, and with CONN_MAX_AGE > 0 (production: 60 s) an idle thread
keeps the connection it last used. A Celery worker's thread pool does the same, plus a few threads
of its own (heartbeat, lease renewal, the main thread). When the sum exceeds what PostgreSQL
allows, requests beyond it are refused by the database ("too many clients") and answer 503, so the
numbers are chosen together:

    needed = web_workers x web_threads                      (per web host)
           + sum over Celery workers of (concurrency + WORKER_OWN_CONNECTIONS)
           + BEAT_CONNECTIONS
    needed <= max_connections - superuser_reserved_connections - headroom (psql, migrations, backups)

The production numbers (ansible/, RELIABILITY.md "Connection budget") follow this formula;
`citadel serve` checks its own processes against the server it is given and warns when they do not fit.
"""

from dataclasses import dataclass

WORKER_OWN_CONNECTIONS = 4
"""A Celery worker's threads beside its pool that use the database: heartbeat, lease renewal, main, control."""
BEAT_CONNECTIONS = 1
HEADROOM = 10
"""Kept free for an operator's psql, migrations and backups."""

# `citadel serve`'s defaults: 2 x 40 threads, 64 concurrent token streams and 16 threads for other requests.
SERVE_WEB_WORKERS = 2
SERVE_WEB_THREADS = 40
SERVE_WORKER_CONCURRENCY = 16
STREAMS_TARGET = 64


@dataclass(frozen=True)
class Budget:
    needed: int
    max_connections: int
    reserved: int

    @property
    def available(self) -> int:
        return self.max_connections - self.reserved - HEADROOM

    @property
    def fits(self) -> bool:
        return self.needed <= self.available

    def warning(self, *, web_workers: int, web_threads: int) -> str | None:
        if self.fits:
            return None
        return (f"PostgreSQL allows {self.max_connections} connections ({self.reserved} reserved for superusers, "
                f"{HEADROOM} kept for operators) but these processes may hold {self.needed} at once "
                f"({web_workers} web workers x {web_threads} threads, the worker's pool and beat): requests beyond "
                f"that will answer 503. Raise max_connections in postgresql.conf to at least "
                f"{self.needed + self.reserved + HEADROOM}, or lower --web-threads / --web-workers.")


def connections_needed(*, web_workers: int, web_threads: int, worker_concurrency: list[int], beats: int = 1) -> int:
    """The most connections these processes may hold at once (the formula in the module docstring)."""
    return (web_workers * web_threads + sum(c + WORKER_OWN_CONNECTIONS for c in worker_concurrency)
            + beats * BEAT_CONNECTIONS)


def budget_check(*, needed: int, using: str = "default") -> Budget | None:
    """`needed` against the configured PostgreSQL's max_connections; None for SQLite, or when the
    server cannot be asked (it is not up yet: the processes report that themselves)."""
    from django.db import DatabaseError, connections

    connection = connections[using]
    if connection.vendor != "postgresql":
        return None
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT current_setting('max_connections')::int, "
                           "current_setting('superuser_reserved_connections')::int")
            max_connections, reserved = cursor.fetchone()
    except DatabaseError:
        return None
    finally:
        if not connection.in_atomic_block:  # `citadel serve` keeps no connection of its own open
            connection.close()
    return Budget(needed=needed, max_connections=max_connections, reserved=reserved)
