"""Console pages for models and deployments: the registry's models with their fine-tuned variants and
where they are deployed, importing a checkpoint folder from a worker host (with progress), deploying
to a pool with engine settings, undeploying behind a confirmation, live status by htmx polling.

Reads are open to every signed-in user, as GET /api/v1/models/ is; changes need a registry role
(operators) or a platform administrator, as the API's write_roles say (REGISTRY_ROLES). Every change
goes through citadel.registry (imports.model_import_start, services.deployment_create and
deployment_retire), which validates, applies residency to placements and audits.
"""

import json
from datetime import timedelta

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.db import transaction
from django.db.models import Q
from django.http import Http404
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone

from citadel.accounts.permissions import REGISTRY_ROLES, has_role, role_required
from citadel.audit.services import Actor
from citadel.core.exceptions import CitadelError
from citadel.jobs.models import InferenceJob
from citadel.registry import services
from citadel.registry.engine_settings import engine_settings_check
from citadel.registry.imports import model_import_start
from citadel.registry.models import Deployment, Model, ModelImport, Worker, WorkerPool
from citadel.registry.selectors import workers_live

PAGE_SIZE = 25
BYTE_SETTINGS = ("kv_device_bytes", "kv_host_bytes", "kv_disk_bytes", "kv_cache_memory")
INT_SETTINGS = ("max_num_seqs", "max_model_len")
TEXT_SETTINGS = ("device", "kv_disk_path")
CHOICE_SETTINGS = ("quantization", "kv_cache_dtype")  # selects; empty: the engine's default, EngineConfig checks the rest
FORM_SETTINGS = (*BYTE_SETTINGS, *INT_SETTINGS, *TEXT_SETTINGS, *CHOICE_SETTINGS)
_UNITS = {"k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def can_change(user) -> bool:
    return has_role(user, REGISTRY_ROLES)


def _model(name: str) -> Model:
    model = Model.objects.select_related("base").filter(name=name).first()
    if model is None:
        raise Http404(f"No model named {name!r}.")
    return model


def _live_pool_ids() -> set[int]:
    return set(workers_live().values_list("pool_id", flat=True))


@login_required
def models_page(request):
    """Base models (variants listed under theirs), filtered by name and family, with deployments,
    whether a live worker serves them, the import form and recent imports."""
    query, family = request.GET.get("q", "").strip(), request.GET.get("family", "").strip()
    models = Model.objects.filter(base__isnull=True).prefetch_related("deployments__pool__site", "variants")
    if query:
        models = models.filter(Q(name__icontains=query) | Q(variants__name__icontains=query)).distinct()
    if family:
        models = models.filter(family=family)
    page = Paginator(models, PAGE_SIZE).get_page(request.GET.get("page"))
    live = _live_pool_ids()
    rows = []
    for model in page:
        deployments = [d for d in model.deployments.all() if d.status == Deployment.Status.ACTIVE]
        rows.append({"model": model, "deployments": deployments, "variants": list(model.variants.all()),
                     "serving": any(d.pool_id in live for d in deployments)})
    context = {"rows": rows, "page": page, "filter": {"q": query, "family": family},
               "families": Model.objects.exclude(family="").values_list("family", flat=True).distinct()
               .order_by("family"), "can_change": can_change(request.user)}
    if context["can_change"]:
        context.update(_import_context(request))
    return render(request, "frontend/models/list.html", context)


def _import_context(request, values=None, errors=None) -> dict:
    imports = ModelImport.objects.select_related("pool", "model")[:10]
    return {"pools": WorkerPool.objects.select_related("site"), "imports": imports,
            "importing": any(i.status not in ModelImport.TERMINAL for i in imports),
            "import_values": values or {}, "import_errors": errors or {}}


@role_required(REGISTRY_ROLES)
def model_import(request):
    """POST: start an import on the chosen pool's worker (audited); field errors come back in the form."""
    if request.method != "POST":
        return redirect("frontend:models")
    values = {key: request.POST.get(key, "").strip() for key in ("name", "path", "pool", "checksums", "description")}
    errors = {}
    pool = WorkerPool.objects.filter(name=values["pool"]).first()
    if pool is None:
        errors["pool"] = "Choose the pool whose worker hosts hold the folder."
    else:
        try:
            started = model_import_start(name=values["name"], path=values["path"], pool=pool,
                                         actor=Actor.for_user(request.user), user=request.user,
                                         description=values["description"], checksums=values["checksums"],
                                         request=request)
            return redirect("frontend:model-import", pk=started.pk)
        except CitadelError as error:
            errors[error.param or "name"] = error.message
    context = {"rows": [], "page": None, "filter": {}, "families": [], "can_change": True,
               **_import_context(request, values, errors)}
    return render(request, "frontend/models/list.html", context, status=400)


@role_required(REGISTRY_ROLES)
def model_import_page(request, pk: int):
    """One import's progress; the progress block polls itself while the import runs."""
    started = ModelImport.objects.select_related("pool", "model").filter(pk=pk).first()
    if started is None:
        raise Http404(f"No model import {pk}.")
    template = "frontend/models/_import_progress.html" if request.htmx else "frontend/models/import.html"
    return render(request, template, {"item": started})


def _deployment_rows(model: Model) -> list[dict]:
    rows = []
    fresh_since = timezone.now() - timedelta(seconds=settings.CITADEL_WORKER_STALE_SECONDS)
    for deployment in model.deployments.select_related("pool__site").order_by("-status", "-created_at"):
        workers = list(deployment.pool.workers.all())
        rows.append({"deployment": deployment, "workers": workers, **_live_state(deployment, workers, fresh_since)})
    return rows


def _live_state(deployment: Deployment, workers: list[Worker], fresh_since) -> dict:
    alive = [w for w in workers if w.status == Worker.Status.ONLINE and w.last_heartbeat >= fresh_since]
    loaded = [w for w in alive if deployment.model.path in (w.loaded_models or [])]
    if deployment.status == Deployment.Status.RETIRED:
        state = "retired"
    elif loaded:
        state = "serving"
    elif alive:
        state = "starting"  # a live worker has not loaded it yet (it loads on the first request)
    else:
        state = "no live worker"
    return {"state": state, "alive": len(alive), "loaded": len(loaded)}


@login_required
def model_page(request, name: str):
    model = _model(name)
    context = {"model": model, "variants": model.variants.all(), "rows": _deployment_rows(model),
               "can_change": can_change(request.user) and not model.base_id,
               "pools": WorkerPool.objects.select_related("site"), "values": {}, "errors": {},
               "manifest": sorted((model.manifest or {}).items())}
    return render(request, "frontend/models/detail.html", context)


def _parse_bytes(text: str) -> int:
    """"8G", "512M", "1024" (bytes; K, M, G, T are powers of 1024)."""
    cleaned = text.strip().lower().removesuffix("ib").removesuffix("b")
    if cleaned and cleaned[-1] in _UNITS:
        return int(float(cleaned[:-1]) * _UNITS[cleaned[-1]])
    return int(cleaned)


def engine_settings_from_form(post) -> tuple[dict, dict]:
    """(settings, field errors) from the deploy form: typed fields plus a JSON object for the rest."""
    settings_, errors = {}, {}
    for name in BYTE_SETTINGS:
        if post.get(name, "").strip():
            try:
                settings_[name] = _parse_bytes(post[name])
            except ValueError:
                errors[name] = f"{name} must be a size in bytes, e.g. 8G, 512M or 1048576."
    for name in INT_SETTINGS:
        if post.get(name, "").strip():
            try:
                settings_[name] = int(post[name])
            except ValueError:
                errors[name] = f"{name} must be a whole number."
    for name in TEXT_SETTINGS:
        if post.get(name, "").strip():
            settings_[name] = post[name].strip()
    for name in CHOICE_SETTINGS:
        if post.get(name, "").strip():
            settings_[name] = post[name].strip()
    extra = post.get("extra_settings", "").strip()
    if extra:
        try:
            more = json.loads(extra)
            if not isinstance(more, dict):
                raise ValueError("not an object")
            settings_.update(more)
        except ValueError:
            errors["extra_settings"] = 'Other settings must be a JSON object, e.g. {"max_loras": 4}.'
    return settings_, errors


@role_required(REGISTRY_ROLES)
def model_deploy(request, name: str):
    model = _model(name)
    if request.method != "POST":
        return redirect("frontend:model", name=model.name)
    values = {key: request.POST.get(key, "") for key in ("pool", "extra_settings", *FORM_SETTINGS)}
    engine_settings, errors = engine_settings_from_form(request.POST)
    pool = WorkerPool.objects.select_related("site").filter(name=values["pool"]).first()
    if pool is None:
        errors["pool"] = "Choose a worker pool."
    if not errors:
        try:
            services.deployment_create(model=model, pool=pool, actor=Actor.for_user(request.user),
                                       engine_settings=engine_settings, request=request)
            return redirect("frontend:model", name=model.name)
        except CitadelError as error:
            field = (error.param or "").removeprefix("engine_settings.")
            if field not in (*FORM_SETTINGS, "pool"):
                field = "extra_settings" if (error.param or "").startswith("engine_settings") else "pool"
            errors[field] = error.message
    context = {"model": model, "variants": model.variants.all(), "rows": _deployment_rows(model),
               "can_change": True, "pools": WorkerPool.objects.select_related("site"), "values": values,
               "errors": errors, "manifest": sorted((model.manifest or {}).items())}
    return render(request, "frontend/models/detail.html", context, status=400)


def _deployment(pk: int) -> Deployment:
    deployment = Deployment.objects.select_related("model", "pool__site").filter(pk=pk).first()
    if deployment is None:
        raise Http404(f"No deployment {pk}.")
    return deployment


@role_required(REGISTRY_ROLES)
def deployment_undeploy(request, pk: int):
    """GET asks, naming what stops; POST retires the deployment (audited) and goes back to the model."""
    deployment = _deployment(pk)
    error = None
    if request.method == "POST":
        try:
            services.deployment_retire(deployment=deployment, actor=Actor.for_user(request.user), request=request)
            return redirect("frontend:model", name=deployment.model.name)
        except CitadelError as failure:
            error = failure.message
    running = InferenceJob.objects.filter(deployment=deployment, status__in=["queued", "running"]).count()
    return render(request, "frontend/models/undeploy.html", {"deployment": deployment, "running": running,
                                                            "error": error}, status=409 if error else 200)


@login_required
def deployment_live(request, pk: int):
    """The live status cell of one deployment (htmx polls it every few seconds)."""
    deployment = _deployment(pk)
    fresh_since = timezone.now() - timedelta(seconds=settings.CITADEL_WORKER_STALE_SECONDS)
    workers = list(deployment.pool.workers.all())
    return render(request, "frontend/models/_live.html", {
        "row": {"deployment": deployment, "workers": workers, **_live_state(deployment, workers, fresh_since)},
        "live_url": reverse("frontend:deployment-live", args=[deployment.pk])})


def _form_values_of(engine_settings: dict) -> dict:
    """The deploy form's fields filled from stored settings (the rest as a JSON object)."""
    values = {name: "" if engine_settings.get(name) is None else str(engine_settings[name]) for name in FORM_SETTINGS}
    extra = {k: v for k, v in engine_settings.items() if k not in FORM_SETTINGS}
    values["extra_settings"] = json.dumps(extra) if extra else ""
    return values


@role_required(REGISTRY_ROLES)
def deployment_settings(request, pk: int):
    """Change a deployment's engine settings: the deployment is retired and the model deployed again on
    the same pool with the new settings, in one transaction (both audited); workers load the engine
    with the new settings on the next request."""
    deployment = _deployment(pk)
    if deployment.status != Deployment.Status.ACTIVE:
        raise Http404(f"Deployment {pk} is retired; deploy the model again instead.")
    values, errors, status = _form_values_of(deployment.engine_settings or {}), {}, 200
    if request.method == "POST":
        values = {key: request.POST.get(key, "") for key in ("extra_settings", *FORM_SETTINGS)}
        engine_settings, errors = engine_settings_from_form(request.POST)
        if not errors:
            try:
                engine_settings_check(engine_settings)  # refused before anything is retired
                actor = Actor.for_user(request.user)
                with transaction.atomic():
                    services.deployment_retire(deployment=deployment, actor=actor, request=request)
                    services.deployment_create(model=deployment.model, pool=deployment.pool, actor=actor,
                                               engine_settings=engine_settings, request=request)
                return redirect("frontend:model", name=deployment.model.name)
            except CitadelError as error:
                field = (error.param or "").removeprefix("engine_settings.")
                errors[field if field in FORM_SETTINGS else "extra_settings"] = error.message
        status = 400
    return render(request, "frontend/models/settings.html", {"deployment": deployment, "values": values,
                                                            "errors": errors}, status=status)
