"""Reads for the registry: which deployment serves a model and which workers are alive."""

from datetime import timedelta

from django.conf import settings
from django.db.models import Q, QuerySet
from django.utils import timezone

from citadel.core.exceptions import NotFound
from citadel.registry.models import Deployment, Model, Worker, WorkerPool


def model_get(*, name: str) -> Model:
    model = Model.objects.filter(name=name).first()
    if model is None:
        raise NotFound(f"The model '{name}' does not exist. List the available ones at GET /v1/models.",
                       param="model", code="model_not_found")
    return model


def models_deployed() -> QuerySet[Model]:
    """Models with an active deployment, and the fine-tuned variants of those (served by their base's)."""
    active = Deployment.Status.ACTIVE
    return Model.objects.filter(Q(deployments__status=active) | Q(base__deployments__status=active)).distinct()


def deployments_active_for_model(*, model: Model) -> QuerySet[Deployment]:
    """Where `model` runs: its own deployments, or for a fine-tuned variant its base model's."""
    return Deployment.objects.filter(model_id=model.base_id or model.pk, status=Deployment.Status.ACTIVE) \
        .select_related("pool", "model")


def model_adapter(*, name: str) -> dict | None:
    """The adapter a request for model `name` carries to the worker ({name, path}), None for a plain model."""
    variant = Model.objects.filter(name=name, base__isnull=False).values("name", "adapter_path").first()
    return {"name": variant["name"], "path": variant["adapter_path"]} if variant else None


def workers_live(*, pool: WorkerPool | None = None) -> QuerySet[Worker]:
    fresh_since = timezone.now() - timedelta(seconds=settings.CITADEL_WORKER_STALE_SECONDS)
    workers = Worker.objects.filter(status=Worker.Status.ONLINE, last_heartbeat__gte=fresh_since)
    return workers.filter(pool=pool) if pool is not None else workers


def worker_is_live(*, name: str) -> bool:
    return workers_live().filter(name=name).exists()
