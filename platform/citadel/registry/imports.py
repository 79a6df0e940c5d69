"""Importing a model from a folder on a worker host, with progress (the console's import form).

`model_import_start` (web) checks the request, records a ModelImport, audits it and sends its id to
the chosen pool's queue after the transaction commits. `model_import_run` (the worker's task) reads
the folder on that host: pickle is refused (citadel.registry.manifest), each file the engine loads
is hashed with SHA-256 while `bytes_done` is written to the database about twice a second (the
console polls it), the hashes are compared with the expected ones when there are any (typed into
the form, or a SHA256SUMS file in the folder), and the model is registered with that manifest
(model_register, audited). The import's end is audited as model.import, success or failure.

Idempotent: a redelivered message for a finished import does nothing; one for an import that a dead
worker left half-way hashes again from the start (hashing has no side effects), and of two deliveries
running at once only the first to finish records its outcome.
"""

import fnmatch
import hashlib
import re
import time
from pathlib import Path

from django.db import transaction
from django.utils import timezone
from django.utils.text import slugify

from citadel.audit.services import Actor, audit_record
from citadel.core.exceptions import CitadelError, Conflict, InvalidRequest
from citadel.registry.manifest import LOADED_PATTERNS, pickle_refuse
from citadel.registry.models import Model, ModelImport, WorkerPool

SUMS_FILE = "SHA256SUMS"
_CHUNK = 4 * 1024 * 1024
_PROGRESS_SECONDS = 0.5
_SUM_LINE = re.compile(r"^([0-9a-fA-F]{64})\s+\*?(.+)$")


def checksums_parse(text: str, *, param: str = "checksums") -> dict[str, str]:
    """`sha256sum` output ("<64 hex>  <file name>" per line) as {file name: hex}; blank lines and
    lines starting with # are skipped."""
    expected = {}
    for number, line in enumerate((text or "").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _SUM_LINE.match(line)
        if match is None:
            raise InvalidRequest(f"Line {number} is not '<SHA-256 in 64 hex digits>  <file name>' "
                                 "(the output of sha256sum).", param=param)
        expected[Path(match.group(2).strip()).name] = match.group(1).lower()
    return expected


@transaction.atomic
def model_import_start(*, name: str, path: str, pool: WorkerPool, actor: Actor, user=None, description: str = "",
                       checksums: str = "", request=None) -> ModelImport:
    if not name or slugify(name) != name:
        raise InvalidRequest(f"name {name!r} must be a slug: lower-case letters, digits, '-' and '_'.", param="name")
    if Model.objects.filter(name=name).exists():
        raise Conflict(f"A model named '{name}' is already registered.", param="name")
    if ModelImport.objects.filter(name=name).exclude(status__in=ModelImport.TERMINAL).exists():
        raise Conflict(f"A model named '{name}' is being imported already; wait for it to finish.", param="name")
    if not path or not Path(path).is_absolute():
        raise InvalidRequest(f"path {path!r} must be absolute: the pool's workers resolve it on their own hosts.",
                             param="path")
    expected = checksums_parse(checksums)
    started = ModelImport.objects.create(name=name, path=str(Path(path)), pool=pool, description=description,
                                         expected=expected, created_by=user)
    audit_record(actor=actor, action="model.import.start", outcome="success", target_type="model", target_id=name,
                 request=request, details={"import": started.pk, "path": started.path, "pool": pool.name,
                                           "expected_files": sorted(expected)})
    transaction.on_commit(lambda: _publish(started))
    return started


def _publish(started: ModelImport) -> None:
    from citadel.registry.tasks import model_import

    model_import.apply_async(args=[started.pk], queue=started.pool.queue)


def _actor_of(started: ModelImport) -> Actor:
    return Actor.for_user(started.created_by) if started.created_by_id else Actor.system("model-import")


def _claim(import_id: int, worker_name: str) -> ModelImport | None:
    with transaction.atomic():
        started = ModelImport.objects.select_for_update().filter(pk=import_id).first()
        if started is None or started.status in ModelImport.TERMINAL:
            return None
        started.status, started.worker_name, started.attempts = ModelImport.Status.VERIFYING, worker_name, \
            started.attempts + 1
        started.started_at, started.bytes_done, started.files_done = timezone.now(), 0, 0
        started.save()
    return started


def _files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise InvalidRequest(f"{folder} is not a folder on this worker host.", param="path")
    if not (folder / "config.json").is_file():
        raise InvalidRequest(f"{folder} is not a Hugging Face checkpoint folder: config.json is missing.",
                             param="path")
    pickle_refuse(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file()
                   and any(fnmatch.fnmatchcase(p.name, pattern) for pattern in LOADED_PATTERNS))
    if not any(p.name.endswith(".safetensors") for p in files):
        raise InvalidRequest(f"{folder} holds no .safetensors weights.", param="path")
    return files


def _expected(started: ModelImport, folder: Path) -> dict[str, str]:
    if started.expected:
        return started.expected
    sums = folder / SUMS_FILE
    return checksums_parse(sums.read_text(), param="path") if sums.is_file() else {}


def _hash_with_progress(started: ModelImport, files: list[Path]) -> dict[str, str]:
    manifest, done, last = {}, 0, 0.0
    for number, path in enumerate(files):
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
                done += len(chunk)
                if time.monotonic() - last >= _PROGRESS_SECONDS:
                    ModelImport.objects.filter(pk=started.pk).update(bytes_done=done, files_done=number,
                                                                     current_file=path.name)
                    last = time.monotonic()
        manifest[path.name] = digest.hexdigest()
    ModelImport.objects.filter(pk=started.pk).update(bytes_done=done, files_done=len(files), current_file="")
    return manifest


def _compare(manifest: dict[str, str], expected: dict[str, str]) -> None:
    for name, want in sorted(expected.items()):
        if name not in manifest:
            raise InvalidRequest(f"{name} is listed in the expected checksums but is not among the files the "
                                 "engine loads from the folder.", param="checksums")
        if manifest[name] != want:
            raise InvalidRequest(f"{name} does not match its expected SHA-256 (expected {want}, found "
                                 f"{manifest[name]}): the copy is damaged or not the file you meant.",
                                 param="checksums")
    unlisted = sorted(n for n in manifest if n.endswith(".safetensors") and n not in expected)
    if unlisted:
        raise InvalidRequest(f"{unlisted[0]} has no expected checksum: list every weight file, or none.",
                             param="checksums")


def _finished_elsewhere(import_id: int) -> bool:
    """Lock the import; True when another delivery of its message finished it meanwhile (a long hash
    can outlast the broker's redelivery timeout), so this one records nothing."""
    return ModelImport.objects.select_for_update().get(pk=import_id).status in ModelImport.TERMINAL


def model_import_run(*, import_id: int, worker_name: str = "") -> ModelImport | None:
    """The worker's part; returns the finished import (None when there was nothing to do)."""
    from citadel.registry.services import model_register

    started = _claim(import_id, worker_name)
    if started is None:
        return None
    folder = Path(started.path)
    try:
        files = _files(folder)
        ModelImport.objects.filter(pk=started.pk).update(files_total=len(files),
                                                         bytes_total=sum(p.stat().st_size for p in files))
        expected = _expected(started, folder)
        manifest = _hash_with_progress(started, files)
        if expected:
            _compare(manifest, expected)
        with transaction.atomic():
            if _finished_elsewhere(started.pk):
                return None
            model = model_register(name=started.name, path=started.path, actor=_actor_of(started),
                                   description=started.description, manifest=manifest)
            ModelImport.objects.filter(pk=started.pk).update(
                status=ModelImport.Status.SUCCEEDED, manifest=manifest, model=model, finished_at=timezone.now())
            audit_record(actor=_actor_of(started), action="model.import", outcome="success", target_type="model",
                         target_id=started.name, details={"import": started.pk, "path": started.path,
                                                          "pool": started.pool.name, "worker": worker_name,
                                                          "checked_against": "expected" if expected else "none",
                                                          "manifest": manifest})
    except (CitadelError, OSError) as error:
        message = error.message if isinstance(error, CitadelError) else f"{folder}: {error}"
        with transaction.atomic():
            if _finished_elsewhere(started.pk):
                return None
            ModelImport.objects.filter(pk=started.pk).update(status=ModelImport.Status.FAILED, error=message,
                                                             finished_at=timezone.now())
            audit_record(actor=_actor_of(started), action="model.import", outcome="failure", target_type="model",
                         target_id=started.name, details={"import": started.pk, "path": started.path,
                                                          "pool": started.pool.name, "worker": worker_name,
                                                          "reason": message[:1000]})
    return ModelImport.objects.get(pk=started.pk)
