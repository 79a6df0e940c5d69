"""Liveness, readiness and Prometheus metrics for load balancers and monitoring."""

from django.db import connection
from django.db.models import Count
from django.http import HttpResponse, JsonResponse
from django.views.decorators.http import require_GET


@require_GET
def healthz(request):
    return JsonResponse({"status": "ok"})


def _workers_check() -> str:
    """ok when each deployed model has a live worker in one of its deployments' pools; otherwise which lack one."""
    from citadel.registry.models import Deployment
    from citadel.registry.selectors import workers_live

    live_pools = set(workers_live().values_list("pool_id", flat=True))
    served: dict[str, bool] = {}
    for name, pool_id in Deployment.objects.filter(status=Deployment.Status.ACTIVE) \
            .values_list("model__name", "pool_id"):
        served[name] = served.get(name, False) or pool_id in live_pools
    missing = sorted(name for name, ok in served.items() if not ok)
    return "ok" if not missing else f"error: no live worker for {', '.join(missing)}"


@require_GET
def readyz(request):
    """Ready when the database and the broker answer and every deployed model has a live worker."""
    from citadel.celery import app

    checks = {}
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        checks["database"] = "ok"
    except Exception as error:
        checks["database"] = f"error: {error}"
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        checks["broker"] = "ok"
    except Exception as error:
        checks["broker"] = f"error: {error}"
    if checks["database"] == "ok":
        checks["workers"] = _workers_check()
    ready = all(value == "ok" for value in checks.values())
    return JsonResponse({"status": "ok" if ready else "unavailable", "checks": checks}, status=200 if ready else 503)


ENGINE_GAUGES = {
    "steps": "Engine steps run since the worker started.",
    "max_batch_size": "Largest number of sequences in one engine step.",
    "mean_batch_size": "Mean number of sequences per engine step.",
    "last_batch_size": "Sequences in the latest engine step.",
    "preemptions": "Sequences preempted when KV cache memory ran out.",
    "running": "Sequences in the running batch.",
    "waiting": "Sequences waiting to be scheduled.",
    "kv_pages_free": "Free KV cache pages.",
}


def _engine_lines(workers) -> list[str]:
    """Per worker and loaded model, the engine's batching counters from the last heartbeat."""
    lines = []
    for name, help_text in ENGINE_GAUGES.items():
        lines += [f"# HELP citadel_engine_{name} {help_text}", f"# TYPE citadel_engine_{name} gauge"]
        for worker in workers:
            for path, stats in (worker.engine_stats or {}).items():
                if isinstance(stats, dict) and isinstance(stats.get(name), int | float):
                    lines.append(f'citadel_engine_{name}{{worker="{worker.name}",model_path="{path}"}} {stats[name]}')
    return lines


@require_GET
def metrics(request):
    """Prometheus' text format: these gauges, then citadel.usage.metrics' families."""
    from citadel.jobs.models import InferenceJob
    from citadel.registry.selectors import workers_live

    lines = ["# HELP citadel_inference_jobs Inference jobs by status.", "# TYPE citadel_inference_jobs gauge"]
    for row in InferenceJob.objects.values("status").annotate(n=Count("id")).order_by("status"):
        lines.append(f'citadel_inference_jobs{{status="{row["status"]}"}} {row["n"]}')
    live = list(workers_live())
    lines += ["# HELP citadel_workers_live Workers with a fresh heartbeat.", "# TYPE citadel_workers_live gauge",
              f"citadel_workers_live {len(live)}"]
    lines += _engine_lines(live)
    from citadel.usage.metrics import exposition  # process histograms and database families (METRICS.md)

    body = ("\n".join(lines) + "\n").encode() + exposition()
    return HttpResponse(body, content_type="text/plain; version=0.0.4; charset=utf-8")
