"""Graceful overload: admit a request to a pool only while the pool can answer it in time.

A pool runs `live workers x CITADEL_POOL_WORKER_SLOTS` jobs at once and queues up to its
`queue_limit` (CITADEL_POOL_QUEUE_LIMIT) more. Past that, a new request is refused at once with
429 and Retry-After instead of waiting in the queue until it times out; when no worker of any
allowed pool is alive it gets 503 with Retry-After (a restarted worker is back within a few
heartbeats).

The count comes from the database, the system of record (DESIGN.md), in one query for all
candidate pools: live workers per pool, and the pool's queued and running jobs. Those are few
rows reached through the job status index however long the job table grows. Jobs older than the
request timeout are left out: no client waits for them any more, and a row a dead worker left
running must not hold a slot for ever (the reconciler fails it). Two requests admitted at the
same moment may both take the last place, so the bound can be passed by the number of requests
arriving at once: a soft bound, bought for not taking a lock on every request.
"""

from datetime import timedelta

from django.conf import settings
from django.db import connection
from django.db.models import Count, IntegerField, OuterRef, Subquery
from django.db.models.functions import Coalesce
from django.utils import timezone

from citadel.core.exceptions import RateLimited
from citadel.jobs.models import InferenceJob
from citadel.registry.models import Deployment, Worker, WorkerPool


def _count(queryset) -> Coalesce:
    counted = queryset.order_by().values("pool").annotate(n=Count("pk")).values("n")
    return Coalesce(Subquery(counted, output_field=IntegerField()), 0)


def _loads_sql() -> str:
    """pool_loads's query written out: it runs on every inference request, and building it through
    the ORM cost the web process more CPU than PostgreSQL spends running it."""
    pools, workers, jobs = WorkerPool._meta.db_table, Worker._meta.db_table, InferenceJob._meta.db_table
    return (f'SELECT p.id, (SELECT count(*) FROM "{workers}" w WHERE w.pool_id = p.id AND w.status = %s '
            f'AND w.last_heartbeat >= %s), (SELECT count(*) FROM "{jobs}" j WHERE j.pool_id = p.id '
            f'AND j.status IN (%s, %s) AND j.created_at >= %s), p.queue_limit FROM "{pools}" p WHERE p.id = ANY(%s)')


def pool_loads(pool_ids: list[int]) -> dict[int, tuple[int, int, int]]:
    """{pool id: (live workers, queued and running jobs, queue limit)}, in one query."""
    now = timezone.now()
    live_since = now - timedelta(seconds=settings.CITADEL_WORKER_STALE_SECONDS)
    active_since = now - timedelta(seconds=settings.CITADEL_REQUEST_TIMEOUT_SECONDS)
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(_loads_sql(), [str(Worker.Status.ONLINE), live_since, str(InferenceJob.Status.QUEUED),
                                          str(InferenceJob.Status.RUNNING), active_since, list(pool_ids)])
            rows = cursor.fetchall()
    else:
        live = Worker.objects.filter(pool=OuterRef("pk"), status=Worker.Status.ONLINE, last_heartbeat__gte=live_since)
        active = InferenceJob.objects.filter(
            pool=OuterRef("pk"), status__in=(InferenceJob.Status.QUEUED, InferenceJob.Status.RUNNING),
            created_at__gte=active_since)
        rows = WorkerPool.objects.filter(pk__in=pool_ids).annotate(live=_count(live), active=_count(active)) \
            .values_list("pk", "live", "active", "queue_limit")
    return {pk: (live, active, settings.CITADEL_POOL_QUEUE_LIMIT if limit is None else limit)
            for pk, live, active, limit in rows}


class PoolSaturated(RateLimited):
    """Every live pool that may run the request is running and queueing all it can."""

    code = "pool_saturated"


def deployment_admit(*, candidates: list[Deployment]) -> Deployment | None:
    """The first of `candidates` (in preference order) whose pool has a live worker and room.

    None when no candidate's pool has a live worker (the caller answers 503); PoolSaturated
    (429, Retry-After) when those that have one are all full.
    """
    if not candidates:
        return None
    loads = pool_loads([d.pool_id for d in candidates])
    full = []
    for deployment in candidates:
        live, active, limit = loads.get(deployment.pool_id, (0, 0, 0))
        if not live:
            continue
        capacity = live * settings.CITADEL_POOL_WORKER_SLOTS + limit
        if active < capacity:
            return deployment
        full.append(f"'{deployment.pool.name}' ({active} running or queued, room for {capacity})")
    if not full:
        return None
    raise PoolSaturated(
        f"Every worker pool that may serve model '{candidates[0].model.name}' is saturated: "
        f"{', '.join(full)}. Retry after the time in the Retry-After header, or slow down.",
        retry_after=settings.CITADEL_POOL_RETRY_AFTER_SECONDS, code="pool_saturated")


def no_worker_retry_after() -> int:
    """Seconds a client should wait after a 503 for want of a live worker: a restarted worker
    counts as live after its first heartbeat."""
    return max(1, 2 * settings.CITADEL_WORKER_HEARTBEAT_SECONDS)
