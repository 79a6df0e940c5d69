"""A worker announces itself: heartbeats into the Worker table, models loaded ahead of the first request,
and the renewal of the leases on the jobs it runs (citadel.jobs.leases).

Heartbeat and preload run only inside `citadel worker` (it reads the pool from CITADEL_WORKER_POOL,
set by that command); lease renewal runs in any Celery worker of this app, since any of them may
run a job.
"""

import logging
import os
import socket
import threading

from celery.signals import worker_ready, worker_shutdown
from django.conf import settings
from django.db import close_old_connections, connection

logger = logging.getLogger(__name__)
_stop = threading.Event()


class _EngineSnapshot:
    """The loaded models and engine counters, read by a thread of their own.

    Reading them waits for the engine's locks (a model being loaded, an engine step), which a busy
    engine may hold for seconds at a time; the heartbeat must never wait for them, or a worker
    that is working hard looks dead and its jobs are taken from it.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self.loaded: list[str] = []
        self.stats: dict = {}

    def read(self) -> tuple[list[str], dict]:
        with self._lock:
            return list(self.loaded), dict(self.stats)

    def refresh_forever(self) -> None:
        from citadel.jobs.engines import engines

        while not _stop.is_set():
            try:
                loaded, stats = engines.loaded_paths(), engines.stats()
                with self._lock:
                    self.loaded, self.stats = loaded, stats
            except Exception:
                logger.exception("could not read the engine's counters")
            _stop.wait(settings.CITADEL_WORKER_HEARTBEAT_SECONDS)


_snapshot = _EngineSnapshot()


def _beat(name: str, pool: str) -> None:
    from citadel.registry.services import worker_heartbeat

    while not _stop.is_set():
        try:
            close_old_connections()
            loaded, stats = _snapshot.read()
            worker_heartbeat(name=name, pool_name=pool, hostname=socket.gethostname(), pid=os.getpid(),
                             loaded_models=loaded, engine_stats=stats)
        except Exception:  # the database may be restarting; the next beat tries again
            logger.exception("heartbeat failed")
        finally:
            connection.close()
        _stop.wait(settings.CITADEL_WORKER_HEARTBEAT_SECONDS)


def _preload(pool: str) -> None:
    """Load the pool's deployed models now, so the first request does not pay for it."""
    from citadel.jobs.engines import engines
    from citadel.registry.models import Deployment

    try:
        for deployment in Deployment.objects.filter(pool__name=pool, status=Deployment.Status.ACTIVE) \
                .select_related("model"):
            engines.get(path=deployment.model.path, engine_settings=deployment.engine_settings)
            logger.info("loaded %s from %s", deployment.model.name, deployment.model.path)
    except Exception:
        logger.exception("preloading models failed; they load on first use instead")
    finally:
        connection.close()


@worker_ready.connect
def _on_ready(sender, **kwargs):
    from citadel.jobs.leases import keeper

    keeper.start()
    pool = os.environ.get("CITADEL_WORKER_POOL")
    if not pool:
        return
    name = sender.hostname
    threading.Thread(target=_preload, args=(pool,), name="citadel-preload", daemon=True).start()
    threading.Thread(target=_snapshot.refresh_forever, name="citadel-engine-snapshot", daemon=True).start()
    threading.Thread(target=_beat, args=(name, pool), name="citadel-heartbeat", daemon=True).start()


@worker_shutdown.connect
def _on_shutdown(sender, **kwargs):
    _stop.set()
    pool = os.environ.get("CITADEL_WORKER_POOL")
    if not pool:
        return
    from citadel.registry.services import worker_offline

    try:
        worker_offline(name=sender.hostname, reason="shutdown")
    except Exception:
        logger.exception("could not mark the worker offline")
