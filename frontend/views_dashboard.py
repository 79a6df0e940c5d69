"""The console's first page: is the platform healthy and busy, at a glance.

Sites, worker pools and workers (alive or stale by heartbeat age, and their load: the requests each
is running now), the deployed models, the running jobs (inference, fine-tuning, batches), requests
and tokens over time drawn as a server-rendered SVG (frontend/charts.py) and the audit chain's status
(its newest signed checkpoint, checked on the spot; auditors and platform administrators get the
full Verify button of the audit page). The workers and jobs sections refresh themselves every 10 s
(htmx fetches this page and swaps in just that section).

Everyone signed in sees the platform's shape (as GET /api/v1/pools/ and /models/ show it); job lists
and usage are narrowed to the user's teams by citadel.accounts.permissions.scope and
citadel.usage.selectors.usage_visible, so no other team's work is shown.
"""

from datetime import timedelta

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.db.models import Count, Q, Sum
from django.db.models.functions import Coalesce, TruncDay, TruncHour
from django.shortcuts import render
from django.utils import timezone

from citadel.accounts.permissions import OVERSIGHT_ROLES, has_role, scope
from citadel.audit.models import AuditCheckpoint, AuditRecord
from citadel.audit.services import checkpoint_payload
from citadel.batches.models import Batch
from citadel.finetuning.models import FineTuningJob
from citadel.jobs.models import InferenceJob
from citadel.registry.models import Deployment, Worker, WorkerPool
from citadel.residency.models import Site
from citadel.usage.selectors import usage_visible
from frontend.charts import Bucket, time_chart

WINDOWS = {"24h": (timedelta(hours=24), "hour"), "7d": (timedelta(days=7), "day"),
           "30d": (timedelta(days=30), "day")}
RUNNING_INFERENCE = (InferenceJob.Status.QUEUED, InferenceJob.Status.RUNNING)
RUNNING_FINE_TUNING = (FineTuningJob.Status.VALIDATING_FILES, FineTuningJob.Status.QUEUED,
                       FineTuningJob.Status.RUNNING)
RUNNING_BATCHES = (Batch.Status.VALIDATING, Batch.Status.IN_PROGRESS, Batch.Status.FINALIZING,
                   Batch.Status.CANCELLING)


def _age(then, now) -> str:
    seconds = max(0, int((now - then).total_seconds()))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 172800:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} days"


def worker_rows(now) -> list[dict]:
    """Every worker with its state (alive: online with a fresh heartbeat; stale: online but silent
    longer than CITADEL_WORKER_STALE_SECONDS; offline) and how many requests it runs now."""
    fresh_since = now - timedelta(seconds=settings.CITADEL_WORKER_STALE_SECONDS)
    running = dict(InferenceJob.objects.filter(status=InferenceJob.Status.RUNNING).exclude(worker_name="")
                   .values_list("worker_name").annotate(n=Count("pk")))
    rows = []
    for worker in Worker.objects.select_related("pool__site"):
        if worker.status != Worker.Status.ONLINE:
            state = "offline"
        elif worker.last_heartbeat >= fresh_since:
            state = "alive"
        else:
            state = "stale"
        rows.append({"worker": worker, "state": state, "age": _age(worker.last_heartbeat, now),
                     "running": running.get(worker.name, 0), "loaded": len(worker.loaded_models or [])})
    return rows


def usage_buckets(user, window: str, now) -> list[Bucket]:
    """Requests and tokens of the user's visible usage per hour (24h) or per day (7d, 30d), empty
    buckets included so the time axis is even."""
    span, unit = WINDOWS[window]
    trunc = TruncHour if unit == "hour" else TruncDay
    step = timedelta(hours=1) if unit == "hour" else timedelta(days=1)
    start = now - span
    start = (start.replace(minute=0, second=0, microsecond=0) if unit == "hour"
             else start.replace(hour=0, minute=0, second=0, microsecond=0))
    rows = (usage_visible(user=user).filter(created_at__gte=start).annotate(bucket=trunc("created_at"))
            .values("bucket").annotate(requests=Coalesce(Sum("requests"), 0),
                                       tokens=Coalesce(Sum("prompt_tokens"), 0) + Coalesce(Sum("completion_tokens"), 0))
            .order_by("bucket"))
    found = {row["bucket"]: row for row in rows}
    buckets, at = [], timezone.localtime(start)
    while at <= now:
        row = found.get(at, {})
        buckets.append(Bucket(start=at, requests=int(row.get("requests") or 0), tokens=int(row.get("tokens") or 0)))
        at = timezone.localtime(at + step)
    return buckets


def chain_status() -> dict:
    """The newest checkpoint, whether its signature verifies with a trusted key and whether the record
    it signed still has the signed hash (a quick check; the audit page's Verify walks the whole chain),
    and how many records came after it."""
    from citadel.audit.signing import signature_valid, trusted_public_keys

    head = AuditRecord.objects.order_by("-sequence").values_list("sequence", flat=True).first()
    checkpoint = AuditCheckpoint.objects.order_by("-sequence", "-id").first()
    if checkpoint is None:
        return {"head": head, "checkpoint": None, "ok": None, "unsigned": head or 0}
    problem = ""
    try:
        trusted = trusted_public_keys()
    except Exception as error:  # no signing key configured on this host: say so instead of failing the page
        trusted, problem = {}, f"the trusted keys cannot be read here ({error.__class__.__name__})"
    payload = checkpoint_payload(sequence=checkpoint.sequence, record_hash=checkpoint.record_hash,
                                 created_at=checkpoint.created_at)
    signed = AuditRecord.objects.filter(sequence=checkpoint.sequence).values_list("record_hash", flat=True).first()
    if not problem and trusted.get(checkpoint.key_id) != checkpoint.public_key:
        problem = f"it is signed by key {checkpoint.key_id}, which is not trusted"
    elif not problem and not signature_valid(checkpoint.public_key, payload, checkpoint.signature):
        problem = "its signature does not verify"
    elif not problem and signed is not None and signed != checkpoint.record_hash:
        problem = f"record {checkpoint.sequence} no longer has the hash it signed"
    return {"head": head, "checkpoint": checkpoint, "ok": not problem, "problem": problem,
            "unsigned": (head or 0) - checkpoint.sequence, "age": _age(checkpoint.created_at, timezone.now())}


@login_required
def dashboard_page(request):
    now = timezone.now()
    window = request.GET.get("window", "24h")
    window_error = None
    if window not in WINDOWS:
        window_error, window = f"window must be one of {', '.join(WINDOWS)}; showing 24h.", "24h"
    buckets = usage_buckets(request.user, window, now)
    label_every = {"24h": 3, "7d": 1, "30d": 5}[window]
    chart = time_chart(buckets, label_format="%H:%M" if window == "24h" else "%m-%d", label_every=label_every)
    workers = worker_rows(now)
    user = request.user
    inference = scope(user, InferenceJob.objects.filter(status__in=RUNNING_INFERENCE)).select_related("model", "pool")
    fine_tuning = scope(user, FineTuningJob.objects.filter(status__in=RUNNING_FINE_TUNING)).select_related("model")
    batches = scope(user, Batch.objects.filter(status__in=RUNNING_BATCHES)).select_related("model")
    deployments = (Deployment.objects.filter(status=Deployment.Status.ACTIVE).select_related("model", "pool__site")
                   .order_by("model__name", "pool__name"))
    alive_pools = {row["worker"].pool_id for row in workers if row["state"] == "alive"}
    return render(request, "frontend/dashboard/dashboard.html", {
        "sites": Site.objects.prefetch_related("pools").annotate(
            pool_count=Count("pools", distinct=True)),
        "pools": WorkerPool.objects.select_related("site").annotate(
            workers_online=Count("workers", filter=Q(workers__status=Worker.Status.ONLINE), distinct=True),
            deployed=Count("deployments", filter=Q(deployments__status=Deployment.Status.ACTIVE), distinct=True)),
        "workers": workers, "alive": sum(1 for w in workers if w["state"] == "alive"),
        "stale": sum(1 for w in workers if w["state"] == "stale"),
        "deployments": deployments, "alive_pools": alive_pools,
        "inference": inference.order_by("-created_at")[:10], "inference_count": inference.count(),
        "fine_tuning": fine_tuning.order_by("-created_at")[:10], "fine_tuning_count": fine_tuning.count(),
        "batches": batches.order_by("-created_at")[:10], "batch_count": batches.count(),
        "chart": chart, "window": window, "windows": list(WINDOWS), "window_error": window_error,
        "chain": chain_status(), "can_verify": has_role(user, OVERSIGHT_ROLES),
        "stale_seconds": settings.CITADEL_WORKER_STALE_SECONDS,
    })
