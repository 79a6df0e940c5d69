"""A worker checks a fine-tuned variant's LoRA adapter against its SHA-256 manifest before serving it.

The manifest is recorded when the variant is registered (model_variant_register: a fine-tune's
adapter, hashed on the worker that wrote it). A changed, missing or added adapter file, or a
pickle in the folder, is refused: audited as `model.adapter.load` denied, and raised as
ModelFileRejected naming the file, so the job fails with that message instead of running the
changed weights.

Hashing on every request would cost a read of the adapter per job, so a folder that passed is
remembered by the size, mtime and inode of its files; any change to them (the same signal
inference.lora's adapter cache uses to reload an adapter) makes the next request hash it again.
A fresh worker process always hashes before its first load.
"""

import os
import socket
import threading
from pathlib import Path

from citadel.audit.services import Actor, audit_record
from citadel.registry.manifest import ADAPTER_PATTERNS, ModelFileRejected, manifest_check
from citadel.registry.models import Model

_verified: dict[tuple[str, str], tuple] = {}
_lock = threading.Lock()


def _signature(folder: Path) -> tuple:
    """The folder's files as the loader would meet them: name, size, mtime and inode of each."""
    try:
        entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    except OSError:
        return ()
    return tuple((e.name, e.stat().st_size, e.stat().st_mtime_ns, e.inode()) for e in entries if e.is_file())


def adapter_files_check(*, name: str, path: str) -> None:
    """Before serving variant `name`'s adapter at `path`: refuse it (audited, ModelFileRejected)
    unless its files match the manifest recorded when the variant was registered."""
    folder, key = Path(path), (name, path)
    signature = _signature(folder)
    with _lock:
        if signature and _verified.get(key) == signature:
            return
    manifest = Model.objects.filter(name=name, base__isnull=False).values_list("manifest", flat=True).first()
    try:
        if manifest is None:
            raise ModelFileRejected(f"No fine-tuned model named '{name}' is registered, so there is no manifest to "
                                    f"check its adapter {path} against.", file=path)
        if not manifest:
            raise ModelFileRejected(
                f"No SHA-256 manifest is recorded for the adapter of '{name}' ({path}), so its files cannot be "
                f"checked. Record it from a host that sees the trusted files: `citadel model_manifest {name}`.",
                file=path)
        manifest_check(folder, manifest, ADAPTER_PATTERNS)
    except ModelFileRejected as error:
        audit_record(actor=Actor.system(f"worker@{socket.gethostname()}"), action="model.adapter.load",
                     outcome="denied", target_type="model", target_id=name,
                     details={"path": path, "file": error.file, "reason": error.message, "pid": os.getpid()})
        error.audited = True
        with _lock:
            _verified.pop(key, None)
        raise
    with _lock:
        _verified[key] = signature
