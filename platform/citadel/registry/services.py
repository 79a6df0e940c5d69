"""Writes for the registry: register models, create pools, deploy, worker heartbeats.

A deployment is refused where the teams that use the model (Model.teams) may not process their
data (citadel.residency.services.deployment_check); the refusal is audited.
"""

import json
import os
import socket
from pathlib import Path

from django.db import transaction
from django.utils import timezone
from django.utils.text import slugify

from citadel.audit.services import Actor, audit_record
from citadel.core.exceptions import Conflict, InvalidRequest
from citadel.registry.engine_settings import engine_settings_check
from citadel.registry.manifest import (
    ADAPTER_PATTERNS,
    LOADED_PATTERNS,
    ModelFileRejected,
    manifest_build,
    manifest_check,
)
from citadel.registry.models import Deployment, Model, Worker, WorkerPool
from citadel.residency.models import Site
from citadel.residency.services import deployment_check, deployment_refusal, site_get_or_create


def _checkpoint_family(path: Path) -> str:
    """config.json's model_type, or a clear error when the folder is not a checkpoint."""
    config = path / "config.json"
    if not config.is_file():
        raise InvalidRequest(f"{path} is not a Hugging Face checkpoint folder: config.json is missing.", param="path")
    try:
        return str(json.loads(config.read_text()).get("model_type", ""))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InvalidRequest(f"{config} is not valid JSON: {error}", param="path") from error


@transaction.atomic
def model_register(*, name: str, path: str, actor: Actor, description: str = "", request=None,
                   manifest: dict[str, str] | None = None) -> Model:
    """Register a checkpoint folder. The path is checked when this host can see it; worker hosts
    that cannot load it fail the job with a clear error instead."""
    if not name or slugify(name) != name:
        raise InvalidRequest(f"name {name!r} must be a slug: lower-case letters, digits, '-' and '_'.", param="name")
    if Model.objects.filter(name=name).exists():
        raise Conflict(f"A model named '{name}' is already registered.", param="name")
    folder = Path(path)
    if not folder.is_absolute():
        raise InvalidRequest(f"path {path!r} must be absolute: workers resolve it on their own hosts.", param="path")
    family = _checkpoint_family(folder) if folder.exists() else ""
    # Pickle is refused and the files' SHA-256 recorded here; a worker checks them before loading.
    # `manifest`: one just built on this host by an import task (citadel.registry.imports), not hashed twice.
    if manifest is None:
        manifest = manifest_build(folder) if folder.exists() else {}
    model = Model.objects.create(name=name, path=str(folder), family=family, description=description,
                                 manifest=manifest)
    audit_record(actor=actor, action="model.register", outcome="success", target_type="model",
                 target_id=name, request=request, details={"path": str(folder), "family": family,
                                                           "manifest": manifest})
    return model


@transaction.atomic
def model_manifest_record(*, model: Model, actor: Actor, request=None) -> Model:
    """Record the SHA-256 manifest of `model`'s folder anew, as it is on this host: for a model
    registered where its folder was not visible, or after a trusted change of its files. A fine-tuned
    variant's manifest is its adapter folder's (checked by citadel.registry.adapter_check)."""
    folder = Path(model.adapter_path if model.base_id else model.path)  # a fine-tuned variant: its adapter's
    if not folder.is_dir():
        raise InvalidRequest(f"{folder} is not a folder on this host: run this where the model's files are.",
                             param="path")
    before, model.manifest = model.manifest, manifest_build(folder, ADAPTER_PATTERNS if model.base_id else
                                                            LOADED_PATTERNS)
    model.save(update_fields=["manifest"])
    audit_record(actor=actor, action="model.manifest.record", outcome="success", target_type="model",
                 target_id=model.name, request=request,
                 details={"path": model.path, "before": before, "after": model.manifest})
    return model


@transaction.atomic
def model_variant_register(*, base: Model, name: str, adapter_path: str, actor: Actor, description: str = "",
                           request=None) -> Model:
    """Register a fine-tuned variant of `base`: its PEFT adapter folder, served on the base's deployments.

    The name is the OpenAI-style `ft:<base>:<suffix>:<id>`, so not a slug; callers build it."""
    if base.base_id:
        raise InvalidRequest(f"'{base.name}' is itself a fine-tuned variant; a variant's base must be a "
                             "checkpoint.", param="model")
    if Model.objects.filter(name=name).exists():
        raise Conflict(f"A model named '{name}' is already registered.", param="name")
    # The adapter's SHA-256 manifest, from the files just written here; workers check it before serving.
    adapter = Path(adapter_path)
    manifest = manifest_build(adapter, ADAPTER_PATTERNS) if adapter.is_dir() else {}
    model = Model.objects.create(name=name, path=base.path, family=base.family, base=base,
                                 adapter_path=adapter_path, description=description, manifest=manifest)
    model.teams.set(base.teams.all())
    audit_record(actor=actor, action="model.variant.register", outcome="success", target_type="model",
                 target_id=name, request=request,
                 details={"base": base.name, "adapter_path": adapter_path, "manifest": manifest})
    return model


@transaction.atomic
def pool_create(*, name: str, site: str | Site, actor: Actor, description: str = "", request=None) -> WorkerPool:
    """A pool at `site` (a Site or its name; an unknown name makes a site of unspecified
    jurisdiction, which only a policy naming it allows)."""
    if not name or slugify(name) != name:
        raise InvalidRequest(f"name {name!r} must be a slug: lower-case letters, digits, '-' and '_'.", param="name")
    if WorkerPool.objects.filter(name=name).exists():
        raise Conflict(f"A worker pool named '{name}' already exists.", param="name")
    if not isinstance(site, Site):
        if not (site or "").strip():
            raise InvalidRequest("site must name the site the pool's hardware is at.", param="site")
        site = site_get_or_create(name=site, actor=actor, request=request)
    pool = WorkerPool.objects.create(name=name, site=site, description=description)
    audit_record(actor=actor, action="pool.create", outcome="success", target_type="pool",
                 target_id=name, request=request, details={"site": site.name, "jurisdiction": site.jurisdiction})
    return pool


def deployment_create(*, model: Model, pool: WorkerPool, actor: Actor, engine_settings: dict | None = None,
                      request=None) -> Deployment:
    engine_settings = engine_settings_check(engine_settings)  # refused here, not when a worker loads
    if model.base_id:
        raise InvalidRequest(f"'{model.name}' is a fine-tuned variant: it runs wherever its base model "
                             f"'{model.base.name}' is deployed. Deploy the base model instead.", param="model")
    refusal = deployment_refusal(model=model, pool=pool)
    if refusal is not None:  # audited outside the transaction that would roll it back with the refusal
        audit_record(actor=actor, action="deployment.create", outcome="denied", target_type="model",
                     target_id=model.name, request=request,
                     details={"model": model.name, "pool": pool.name, "site": pool.site.name,
                              "jurisdiction": pool.site.jurisdiction, "reason": refusal.message})
        refusal.audited = True
        raise refusal
    return _deployment_create(model=model, pool=pool, actor=actor, engine_settings=engine_settings, request=request)


@transaction.atomic
def _deployment_create(*, model: Model, pool: WorkerPool, actor: Actor, engine_settings: dict | None,
                       request) -> Deployment:
    if Deployment.objects.filter(model=model, pool=pool, status=Deployment.Status.ACTIVE).exists():
        raise Conflict(f"'{model.name}' is already deployed on pool '{pool.name}'.")
    deployment = Deployment.objects.create(model=model, pool=pool, engine_settings=engine_settings or {})
    audit_record(actor=actor, action="deployment.create", outcome="success", target_type="deployment",
                 target_id=str(deployment.pk), request=request,
                 details={"model": model.name, "pool": pool.name, "site": pool.site.name,
                          "engine_settings": deployment.engine_settings})
    return deployment


@transaction.atomic
def model_teams_set(*, model: Model, teams: list, actor: Actor, request=None) -> Model:
    """Declare which teams use `model`; refused while an active deployment sits where one of them
    may not process its data."""
    before = sorted(model.teams.values_list("name", flat=True))
    model.teams.set(teams)
    problems = []
    for deployment in Deployment.objects.filter(model=model, status=Deployment.Status.ACTIVE).select_related(
            "pool__site"):
        problems += [f"pool '{deployment.pool.name}' at site '{deployment.pool.site.name}': {p}"
                     for p in deployment_check(model=model, pool=deployment.pool)]
    if problems:  # raising rolls the new teams back with the transaction
        raise InvalidRequest(f"Model '{model.name}' is deployed where these teams may not process their data: "
                             + "; ".join(problems) + ". Retire those deployments first.", param="teams")
    audit_record(actor=actor, action="model.teams.set", outcome="success", target_type="model", target_id=model.name,
                 request=request, details={"before": before, "after": sorted(t.name for t in teams)})
    return model


@transaction.atomic
def deployment_retire(*, deployment: Deployment, actor: Actor, request=None) -> Deployment:
    deployment = Deployment.objects.select_for_update().get(pk=deployment.pk)
    if deployment.status == Deployment.Status.RETIRED:
        raise Conflict(f"Deployment {deployment.pk} is already retired.")
    deployment.status = Deployment.Status.RETIRED
    deployment.save(update_fields=["status"])
    audit_record(actor=actor, action="deployment.retire", outcome="success", target_type="deployment",
                 target_id=str(deployment.pk), request=request)
    return deployment


def worker_heartbeat(*, name: str, pool_name: str, hostname: str, pid: int, loaded_models: list[str],
                     engine_stats: dict | None = None) -> Worker:
    """Called by a worker every few seconds. The first beat of a process is audited."""
    now = timezone.now()
    with transaction.atomic():
        pool = WorkerPool.objects.get(name=pool_name)
        worker = Worker.objects.select_for_update().filter(name=name).first()
        came_online = worker is None or worker.status != Worker.Status.ONLINE or worker.pid != pid
        if worker is None:
            worker = Worker(name=name, started_at=now)
        if came_online:
            worker.started_at = now
        worker.pool, worker.hostname, worker.pid = pool, hostname, pid
        worker.status, worker.last_heartbeat, worker.loaded_models = Worker.Status.ONLINE, now, loaded_models
        worker.engine_stats = engine_stats or {}
        worker.save()
        if came_online:
            audit_record(actor=Actor.system(name), action="worker.online", outcome="success", target_type="worker",
                         target_id=name, details={"pool": pool_name, "hostname": hostname, "pid": pid})
    return worker


@transaction.atomic
def worker_offline(*, name: str, reason: str) -> None:
    updated = Worker.objects.filter(name=name, status=Worker.Status.ONLINE).update(status=Worker.Status.OFFLINE)
    if updated:
        audit_record(actor=Actor.system(name), action="worker.offline", outcome="success", target_type="worker",
                     target_id=name, details={"reason": reason})


def model_files_check(*, path: str) -> None:
    """A worker, before it loads the checkpoint at `path`: refuse pickle and any file that differs from
    the manifest recorded at import (of every registered model at that path). A refusal is audited and
    raised as ModelFileRejected, naming the file."""
    folder = Path(path)
    manifests = list(Model.objects.filter(path=path, base__isnull=True).values_list("name", "manifest"))
    try:
        if not manifests:
            raise ModelFileRejected(f"No registered model has the path {path}, so there is no manifest to check "
                                    "its files against. Register it first: `citadel models register NAME PATH`.",
                                    file=path)
        for _name, manifest in manifests:
            manifest_check(folder, manifest)
    except ModelFileRejected as error:
        audit_record(actor=Actor.system(f"worker@{socket.gethostname()}"), action="model.load", outcome="denied",
                     target_type="model", target_id=",".join(name for name, _ in manifests) or path,
                     details={"path": path, "file": error.file, "reason": error.message, "pid": os.getpid()})
        error.audited = True
        raise
