"""Registry: importing a model from a worker host's folder (citadel.registry.imports) and checking a
deployment's engine settings when they are set (citadel.registry.engine_settings), through the
services and the management API; the import task run as the pool's worker runs it.
"""

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from citadel.audit.models import AuditRecord
from citadel.audit.services import Actor
from citadel.core.exceptions import Conflict, InvalidRequest
from citadel.registry.engine_settings import engine_setting_names, engine_settings_check
from citadel.registry.imports import checksums_parse, model_import_run, model_import_start
from citadel.registry.models import Deployment, Model, ModelImport
from citadel.registry.services import deployment_create, model_register, pool_create

pytestmark = pytest.mark.django_db
SYSTEM = Actor.system("test")


def checkpoint(folder, values=(1.0, 2.0)):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    data = struct.pack(f"<{len(values)}f", *values)
    header = json.dumps({"w": {"dtype": "F32", "shape": [len(values)], "data_offsets": [0, len(data)]}}).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + data)
    (folder / "README.md").write_text("not loaded by the engine, so not in the manifest")
    return folder


@pytest.fixture
def pool():
    return pool_create(name="gpu-imp", site="site-imp", actor=SYSTEM)


def test_checksums_parse_reads_sha256sum_output_and_names_a_bad_line():
    digest = "a" * 64
    assert checksums_parse(f"# made by sha256sum\n{digest}  model.safetensors\n{digest.upper()} *sub/config.json\n") \
        == {"model.safetensors": digest, "config.json": digest}
    with pytest.raises(InvalidRequest, match="Line 2 is not") as refused:
        checksums_parse(f"{digest}  a\nnot a checksum\n")
    assert refused.value.param == "checksums"


def test_an_import_hashes_the_loaded_files_registers_the_model_and_audits_both_ends(tmp_path, pool):
    folder = checkpoint(tmp_path / "m")
    started = model_import_start(name="imp", path=str(folder), pool=pool, actor=SYSTEM)
    assert started.status == "queued" and AuditRecord.objects.filter(action="model.import.start").exists()
    finished = model_import_run(import_id=started.pk, worker_name="gpu@host")
    assert finished.status == "succeeded" and finished.worker_name == "gpu@host" and finished.attempts == 1
    expected = {name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
                for name in ("config.json", "model.safetensors")}
    assert finished.manifest == expected and Model.objects.get(name="imp").manifest == expected
    assert finished.bytes_total == finished.bytes_done == sum((folder / n).stat().st_size for n in expected)
    record = AuditRecord.objects.get(action="model.import")
    assert record.outcome == "success" and record.details["checked_against"] == "none"
    assert model_import_run(import_id=started.pk) is None  # redelivered: nothing to do


def test_an_import_refuses_a_name_in_use_a_relative_path_and_a_second_import_of_the_same_name(tmp_path, pool):
    model_register(name="taken", path=str(checkpoint(tmp_path / "t")), actor=SYSTEM)
    with pytest.raises(Conflict):
        model_import_start(name="taken", path=str(tmp_path / "t"), pool=pool, actor=SYSTEM)
    with pytest.raises(InvalidRequest, match="must be absolute"):
        model_import_start(name="fresh", path="models/x", pool=pool, actor=SYSTEM)
    model_import_start(name="fresh", path=str(tmp_path / "t"), pool=pool, actor=SYSTEM)
    with pytest.raises(Conflict, match="being imported already"):
        model_import_start(name="fresh", path=str(tmp_path / "t"), pool=pool, actor=SYSTEM)


def test_an_import_fails_with_the_reason_when_the_folder_is_missing_or_a_weight_is_unlisted(tmp_path, pool):
    missing = model_import_start(name="gone", path=str(tmp_path / "nowhere"), pool=pool, actor=SYSTEM)
    failed = model_import_run(import_id=missing.pk)
    assert failed.status == "failed" and "is not a folder on this worker host" in failed.error
    folder = checkpoint(tmp_path / "u")
    config_sum = hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()
    partial = model_import_start(name="partial", path=str(folder), pool=pool, actor=SYSTEM,
                                 checksums=f"{config_sum}  config.json")
    failed = model_import_run(import_id=partial.pk)
    assert failed.status == "failed" and "model.safetensors has no expected checksum" in failed.error
    assert not Model.objects.filter(name__in=["gone", "partial"]).exists()
    assert AuditRecord.objects.filter(action="model.import", outcome="failure").count() == 2


def test_engine_settings_follow_the_engines_own_rules_without_importing_torch():
    assert "kv_device_bytes" in engine_setting_names() and "quantization" in engine_setting_names()
    assert engine_settings_check({"device": "cpu", "quantization": "fp8", "kv_device_bytes": 1 << 30,
                                  "kv_host_bytes": 1 << 32}) ["quantization"] == "fp8"
    for settings, param in (({"kv_host_bytes": 5}, "engine_settings.kv_host_bytes"),
                            ({"quantization": "int3"}, "engine_settings.quantization"),
                            ({"seed": "x"}, "engine_settings.seed"),
                            ({"warp": 1}, "engine_settings.warp")):
        with pytest.raises(InvalidRequest) as refused:
            engine_settings_check(settings)
        assert refused.value.param == param, settings
    # In a fresh process (a web worker's situation) the rules load without torch or the engine.
    code = ("import sys; from citadel.registry.engine_settings import engine_settings_check as c; "
            "c({'quantization': 'fp8'}); print('torch' in sys.modules, 'inference.llm' in sys.modules)")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "platform"), str(root)])}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


def test_a_deployment_with_settings_the_engine_would_refuse_is_refused_at_the_api(tmp_path, pool):
    model_register(name="dep", path=str(checkpoint(tmp_path / "d")), actor=SYSTEM)
    root = get_user_model().objects.create_user("root", password="x" * 16, is_staff=True)
    client = Client()
    client.force_login(root)
    response = client.post("/api/v1/deployments/", {"model": "dep", "pool": "gpu-imp",
                                                    "engine_settings": {"kv_disk_bytes": 10}},
                           content_type="application/json")
    assert response.status_code == 400 and "kv_disk_bytes" in json.dumps(response.json())
    assert not Deployment.objects.filter(model__name="dep").exists()
    with pytest.raises(InvalidRequest, match="max_num_seqs must be an integer"):
        deployment_create(model=Model.objects.get(name="dep"), pool=pool, actor=SYSTEM,
                          engine_settings={"max_num_seqs": 0})
    ok = client.post("/api/v1/deployments/", {"model": "dep", "pool": "gpu-imp",
                                              "engine_settings": {"device": "cpu", "quantization": "fp8"}},
                     content_type="application/json")
    assert ok.status_code == 201 and ok.json()["engine_settings"]["quantization"] == "fp8"
    assert ModelImport.objects.count() == 0
