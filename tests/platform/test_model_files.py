"""Model-file safety: pickle checkpoints are refused, and a worker loads only the files recorded at import."""

import hashlib
import shutil
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from citadel.audit.models import AuditRecord
from citadel.audit.services import Actor
from citadel.jobs.engines import EngineCache
from citadel.registry.manifest import ModelFileRejected
from citadel.registry.models import Model
from citadel.registry.services import model_register

pytestmark = pytest.mark.django_db

TINY = Path(__file__).resolve().parents[2] / "models" / "tiny-qwen3-moe"


@pytest.fixture
def folder(tmp_path):
    """A copy of the bundled tiny Qwen3-MoE checkpoint, with a model card the engine never reads."""
    copy = tmp_path / "tiny"
    shutil.copytree(TINY, copy)
    (copy / "README.md").write_text("A model card.")
    return copy


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_importing_a_model_records_the_sha256_of_every_file_the_engine_loads(folder):
    model = model_register(name="tiny", path=str(folder), actor=Actor.system())
    loaded = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
              "tokenizer_config.json"]
    assert model.manifest == {name: sha256(folder / name) for name in loaded}
    assert Model.objects.get(name="tiny").manifest == model.manifest
    record = AuditRecord.objects.get(action="model.register", target_id="tiny")
    assert record.details["manifest"]["model.safetensors"] == sha256(folder / "model.safetensors")


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth", "state.pkl", "sub/last.ckpt"])
def test_a_folder_holding_a_pickle_checkpoint_is_refused_at_import_naming_the_file(folder, name):
    (folder / name).parent.mkdir(exist_ok=True)
    (folder / name).write_bytes(b"\x80\x04pickle")
    with pytest.raises(ModelFileRejected) as refused:
        model_register(name="tiny", path=str(folder), actor=Actor.system())
    assert name in refused.value.message and "safetensors" in refused.value.message
    assert refused.value.param == "path"
    assert not Model.objects.filter(name="tiny").exists()


def test_the_cli_import_refuses_a_pickle_checkpoint_with_the_same_message(folder):
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(CommandError, match=r"pytorch_model\.bin is a pickle checkpoint.*Convert the weights to "
                                           r"safetensors"):
        call_command("models", "register", "tiny", str(folder))
    assert not Model.objects.filter(name="tiny").exists()


def test_a_worker_loads_an_unchanged_model(folder):
    model_register(name="tiny", path=str(folder), actor=Actor.system())
    engine = EngineCache().get(path=str(folder), engine_settings={"device": "cpu"})
    assert engine.generate("Hello")[0].finish_reason in ("stop", "length")
    assert not AuditRecord.objects.filter(action="model.load").exists()


def test_a_tampered_file_is_refused_when_a_worker_loads_the_model_and_the_refusal_is_audited(folder):
    model_register(name="tiny", path=str(folder), actor=Actor.system())
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte inside the tensor data
    weights.write_bytes(bytes(data))
    cache = EngineCache()
    with pytest.raises(ModelFileRejected) as refused:
        cache.get(path=str(folder), engine_settings={"device": "cpu"})
    assert str(weights) in refused.value.message and "SHA-256" in refused.value.message
    assert cache.loaded_paths() == []
    record = AuditRecord.objects.get(action="model.load")
    assert record.outcome == "denied" and record.target_type == "model" and record.target_id == "tiny"
    assert record.details["file"] == str(weights) and record.details["path"] == str(folder)


def test_a_pickle_or_weight_file_added_after_import_is_refused_at_load(folder):
    model_register(name="tiny", path=str(folder), actor=Actor.system())
    (folder / "extra.safetensors").write_bytes(b"{}")
    with pytest.raises(ModelFileRejected, match="extra.safetensors was not in the model's manifest"):
        EngineCache().get(path=str(folder))
    (folder / "extra.safetensors").unlink()
    (folder / "optimizer.pt").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ModelFileRejected, match="optimizer.pt is a pickle checkpoint"):
        EngineCache().get(path=str(folder))
    assert AuditRecord.objects.filter(action="model.load", outcome="denied").count() == 2


def test_a_deleted_file_is_refused_at_load_naming_it(folder):
    model_register(name="tiny", path=str(folder), actor=Actor.system())
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ModelFileRejected, match=r"tokenizer\.json is missing"):
        EngineCache().get(path=str(folder))


def test_a_change_of_the_model_card_does_not_stop_the_model_loading(folder):
    model_register(name="tiny", path=str(folder), actor=Actor.system())
    (folder / "README.md").write_text("Edited later.")
    assert EngineCache().get(path=str(folder), engine_settings={"device": "cpu"}) is not None


def test_a_model_without_a_manifest_is_refused_until_one_is_recorded_by_the_cli(folder, tmp_path):
    missing = tmp_path / "not-yet-here"
    model = model_register(name="later", path=str(missing), actor=Actor.system())  # not visible at import
    assert model.manifest == {}
    shutil.copytree(folder, missing)
    with pytest.raises(ModelFileRejected, match="citadel model_manifest MODEL"):
        EngineCache().get(path=str(missing))
    call_command("model_manifest", "later")
    assert Model.objects.get(name="later").manifest["model.safetensors"] == sha256(missing / "model.safetensors")
    assert AuditRecord.objects.filter(action="model.manifest.record", target_id="later").exists()
    assert EngineCache().get(path=str(missing), engine_settings={"device": "cpu"}) is not None


def test_the_bench_stub_engine_replaces_the_engine_only_when_its_variable_is_set(folder, monkeypatch):
    model_register(name="tiny", path=str(folder), actor=Actor.system())
    monkeypatch.setenv("CITADEL_BENCH_STUB_ENGINE", "1")
    stub = EngineCache().get(path=str(folder))
    events = list(stub.stream_chat([{"role": "user", "content": "hi"}]))
    assert [e.finish_reason for e in events] == ["length"] and events[0].completion_tokens == 1
    monkeypatch.delenv("CITADEL_BENCH_STUB_ENGINE")
    assert type(EngineCache().get(path=str(folder), engine_settings={"device": "cpu"})).__name__ == "LLM"
