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


def _beat(name: str, pool: str) -> None:
    from citadel.jobs.engines import engines
    from citadel.registry.services import worker_heartbeat

    while not _stop.is_set():
        try:
            close_old_connections()
            worker_heartbeat(name=name, pool_name=pool, hostname=socket.gethostname(), pid=os.getpid(),
                             loaded_models=engines.loaded_paths(), engine_stats=engines.stats())
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
