"""SHA-256 manifests beyond a model's import (issue 11): a fine-tuning worker checks the base model's
files before training, a fine-tune's adapter gets a manifest when it is registered, and a worker
checks it before serving the adapter. Tampered files are real files changed on disk; each refusal
names the file and is audited."""

import hashlib
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from django.core.management import call_command

from citadel.audit.models import AuditRecord
from citadel.finetuning import tasks
from citadel.finetuning.models import FineTuningJob
from citadel.registry import adapter_check
from citadel.registry.adapter_check import adapter_files_check
from citadel.registry.manifest import ModelFileRejected
from citadel.registry.models import Model
from citadel.registry.services import model_variant_register
from tests.platform import test_finetuning_api as api
from tests.platform import test_finetuning_worker as worker_tests

pytestmark = pytest.mark.django_db
world = api.world
job = worker_tests.job


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tamper(path: Path) -> None:
    """Flip one byte in the middle of the file, keeping its size."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(autouse=True)
def _fresh_worker():
    """Each test is a worker process that has verified nothing yet."""
    adapter_check._verified.clear()
    yield
    adapter_check._verified.clear()


@pytest.fixture
def adapter(tmp_path, world):
    """A fine-tuned variant of demo-v4 registered over an adapter folder on disk."""
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8}')
    (folder / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 64)
    (folder / "README.md").write_text("PEFT's model card: not read by the loader.")
    variant = model_variant_register(base=world.model, name="ft:demo-v4:x:0123456789", adapter_path=str(folder),
                                     actor=tasks.Actor.system("test"))
    return SimpleNamespace(folder=folder, variant=variant)


def _denied(name: str) -> list[dict]:
    return [r.details for r in AuditRecord.objects.filter(action="model.adapter.load", outcome="denied",
                                                          target_id=name)]


def test_a_fine_tune_records_its_adapters_manifest_and_a_worker_refuses_a_tampered_adapter(world, job):
    tasks.run_job(str(job.id))
    job.refresh_from_db()
    assert job.status == "succeeded", (job.error_code, job.error_message)
    variant, folder = job.fine_tuned_model, Path(job.fine_tuned_model.adapter_path)
    assert variant.manifest == {name: sha256(folder / name)
                                for name in ("adapter_config.json", "adapter_model.safetensors")}
    register = AuditRecord.objects.get(action="model.variant.register", target_id=variant.name)
    assert register.details["manifest"] == variant.manifest
    adapter_files_check(name=variant.name, path=variant.adapter_path)  # as written: served
    adapter_check._verified.clear()  # a worker that starts after the file was changed
    tamper(folder / "adapter_model.safetensors")
    with pytest.raises(ModelFileRejected) as refused:
        adapter_files_check(name=variant.name, path=variant.adapter_path)
    assert "adapter_model.safetensors does not match the SHA-256" in refused.value.message
    [details] = _denied(variant.name)
    assert details["file"] == str(folder / "adapter_model.safetensors")


def test_a_changed_adapter_fails_the_inference_job_by_name_and_is_audited(adapter):
    from citadel.jobs.tasks import _events

    class Engine:
        def stream_chat(self, messages, params, **kwargs):
            return kwargs

    payload = {"messages": [], "sampling": {}, "adapter": {"name": adapter.variant.name, "path": str(adapter.folder)}}
    job_ = SimpleNamespace(kind="chat", payload=payload, team_id=None, api_key_id=None)
    assert _events(Engine(), job_)["lora_request"].path == str(adapter.folder)  # unchanged: served
    # Changed after that worker served it: the next request sees the new size/mtime and checks again.
    (adapter.folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 64, "lora_alpha": 8}')
    with pytest.raises(ModelFileRejected, match=r"adapter_config\.json does not match the SHA-256"):
        _events(Engine(), job_)
    assert _denied(adapter.variant.name)[0]["file"] == str(adapter.folder / "adapter_config.json")


@pytest.mark.parametrize("change", ["added pickle", "added weights", "deleted weights"])
def test_an_adapter_folder_changed_otherwise_is_refused(adapter, change):
    if change == "added pickle":
        (adapter.folder / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
        expected = "adapter_model.bin is a pickle checkpoint"
    elif change == "added weights":
        (adapter.folder / "extra.safetensors").write_bytes(b"{}")
        expected = "extra.safetensors was not in the model's manifest"
    else:
        (adapter.folder / "adapter_model.safetensors").unlink()
        expected = "adapter_model.safetensors is missing"
    with pytest.raises(ModelFileRejected, match=expected):
        adapter_files_check(name=adapter.variant.name, path=str(adapter.folder))
    assert len(_denied(adapter.variant.name)) == 1


def test_the_model_card_may_change_and_an_adapter_without_a_manifest_is_refused_until_the_cli_records_it(adapter):
    (adapter.folder / "README.md").write_text("Rewritten by a tool.")
    adapter_files_check(name=adapter.variant.name, path=str(adapter.folder))
    Model.objects.filter(pk=adapter.variant.pk).update(manifest={})  # registered before adapters had manifests
    adapter_check._verified.clear()
    with pytest.raises(ModelFileRejected, match=r"citadel model_manifest ft:demo-v4:x:0123456789"):
        adapter_files_check(name=adapter.variant.name, path=str(adapter.folder))
    call_command("model_manifest", adapter.variant.name)
    assert set(Model.objects.get(pk=adapter.variant.pk).manifest) == {"adapter_config.json",
                                                                     "adapter_model.safetensors"}
    adapter_files_check(name=adapter.variant.name, path=str(adapter.folder))


def test_a_fine_tuning_worker_refuses_a_tampered_base_model_before_training(world, job, tmp_path):
    copy = tmp_path / "demo-v4"
    shutil.copytree(world.model.path, copy)
    Model.objects.filter(pk=world.model.pk).update(path=str(copy))  # same files, same manifest
    tamper(copy / "model.safetensors")
    tasks.run_job(str(job.id))
    job = FineTuningJob.objects.get(pk=job.pk)
    assert job.status == "failed" and job.error_code == "model_file_rejected", (job.status, job.error_code)
    assert "model.safetensors does not match the SHA-256" in job.error_message
    assert job.step == 0 and job.fine_tuned_model is None
    denied = AuditRecord.objects.get(action="model.load", outcome="denied")
    assert denied.details["file"] == str(copy / "model.safetensors")
