"""Liveness, readiness and Prometheus metrics for load balancers and monitoring."""

from django.db import connection
from django.db.models import Count
from django.http import HttpResponse, JsonResponse
from django.views.decorators.http import require_GET


@require_GET
def healthz(request):
    return JsonResponse({"status": "ok"})


@require_GET
def readyz(request):
    """Ready when the database and the broker answer."""
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
    ready = all(value == "ok" for value in checks.values())
    return JsonResponse({"status": "ok" if ready else "unavailable", "checks": checks}, status=200 if ready else 503)


@require_GET
def metrics(request):
    """A few gauges from the database, in Prometheus' text format."""
    from citadel.jobs.models import InferenceJob
    from citadel.registry.selectors import workers_live

    lines = ["# HELP citadel_inference_jobs Inference jobs by status.", "# TYPE citadel_inference_jobs gauge"]
    for row in InferenceJob.objects.values("status").annotate(n=Count("id")).order_by("status"):
        lines.append(f'citadel_inference_jobs{{status="{row["status"]}"}} {row["n"]}')
    lines += ["# HELP citadel_workers_live Workers with a fresh heartbeat.", "# TYPE citadel_workers_live gauge",
              f"citadel_workers_live {workers_live().count()}"]
    return HttpResponse("\n".join(lines) + "\n", content_type="text/plain; version=0.0.4")
