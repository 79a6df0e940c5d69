"""Console models and deployments pages (Django test client): the model list with variants, filters
and pages; importing a checkpoint folder from a worker host with checksum verification and progress
(the import task run as a worker runs it); deploying with engine settings, refused settings shown
next to their fields; undeploying behind a confirmation; the live status fragment; every change
audited, and roles without the registry role refused.
"""

import hashlib
import json
import re
import struct
from datetime import timedelta
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from django.utils import timezone

from citadel.accounts.models import Role, Team
from citadel.accounts.services import membership_set
from citadel.audit.models import AuditRecord
from citadel.audit.services import Actor
from citadel.registry.models import Deployment, Model, ModelImport, Worker
from citadel.registry.services import deployment_create, model_register, model_variant_register, pool_create
from citadel.registry.tasks import model_import

pytestmark = pytest.mark.django_db
SYSTEM = Actor.system("test")
MODELS, IMPORT = "/models/", "/models/imports/new/"


def write_checkpoint(folder: Path, *, values=(1.0, 2.0)) -> Path:
    """A minimal checkpoint folder: config.json and one valid safetensors file."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "deepseek_v4"}))
    data = struct.pack(f"<{len(values)}f", *values)
    header = json.dumps({"w": {"dtype": "F32", "shape": [len(values)], "data_offsets": [0, len(data)]}}).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + data)
    return folder


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def world(tmp_path):
    users = get_user_model().objects
    team = Team.objects.create(name="ops")
    found = {"root": users.create_user("root", password="x" * 16, is_staff=True)}
    for name, role in (("otto", Role.OPERATOR), ("erin", Role.ML_ENGINEER), ("audrey", Role.AUDITOR),
                       ("lead", Role.ADMIN)):
        found[name] = users.create_user(name, password="x" * 16)
        membership_set(team=team, user=found[name], role=role, actor=SYSTEM)
    found["pool"] = pool_create(name="gpu-a", site="site-a", actor=SYSTEM)
    found["pool_b"] = pool_create(name="gpu-b", site="site-b", actor=SYSTEM)
    found["folder"] = write_checkpoint(tmp_path / "alpha")
    found["alpha"] = model_register(name="alpha", path=str(found["folder"]), actor=SYSTEM)
    found["variant"] = model_variant_register(base=found["alpha"], name="ft:alpha:sales:abc123",
                                              adapter_path=str(tmp_path / "adapter"), actor=SYSTEM)
    found["deployment"] = deployment_create(model=found["alpha"], pool=found["pool"], actor=SYSTEM,
                                            engine_settings={"device": "cpu"})
    found["tmp"] = tmp_path
    return found


def signed_in(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def text(response) -> str:
    return response.content.decode()


def online_worker(pool, *, loaded=(), age_seconds=0) -> Worker:
    beat = timezone.now() - timedelta(seconds=age_seconds)
    return Worker.objects.create(name=f"w@{pool.name}", pool=pool, hostname="host", pid=1, started_at=beat,
                                 last_heartbeat=beat, loaded_models=list(loaded))


# The list -------------------------------------------------------------------------------------------------

def test_the_list_shows_models_with_their_variants_deployments_and_serving_state(world):
    online_worker(world["pool"], loaded=[str(world["folder"])])
    body = text(signed_in(world["erin"]).get(MODELS))
    row = re.search(r"<tr>\s*<td><a href=\"/models/alpha/\">alpha</a>.*?</tr>", body, re.S).group(0)
    assert "ft:alpha:sales:abc123" in row and "gpu-a (site-a)" in row and "serving" in row
    assert 'id="import-form"' not in body  # an ML engineer reads, but imports nothing


def test_the_list_filters_by_name_and_family_and_paginates(world, tmp_path):
    for n in range(30):
        model_register(name=f"bulk-{n:02d}", path=str(write_checkpoint(tmp_path / f"b{n}")), actor=SYSTEM)
    Model.objects.filter(name="bulk-00").update(family="qwen3_moe")
    client = signed_in(world["erin"])
    first = text(client.get(MODELS))
    assert "Page 1 of 2" in first and first.count('<tr>\n      <td><a href="/models/') == 25
    assert text(client.get(MODELS, {"page": 2})).count('<tr>\n      <td><a href="/models/') == 6
    only = text(client.get(MODELS, {"q": "bulk-1"}))
    assert only.count('<tr>\n      <td><a href="/models/') == 10 and "alpha" not in only.split("<tbody>")[1]
    assert ">bulk-00</a>" in text(client.get(MODELS, {"family": "qwen3_moe"}))
    assert "No models match" in text(client.get(MODELS, {"q": "nothing-like-it"}))
    assert ">alpha</a>" in text(client.get(MODELS, {"q": "sales"}))  # found by its variant's name


def test_a_model_page_shows_its_manifest_variants_and_deployments_and_a_missing_one_is_404(world):
    client = signed_in(world["erin"])
    body = text(client.get("/models/alpha/"))
    assert sha256(world["folder"] / "model.safetensors") in body and "ft:alpha:sales:abc123" in body
    assert f'id="deployment-{world["deployment"].pk}" data-status="active"' in body and "device=cpu" in body
    assert 'id="deploy-form"' not in body and "Undeploy" not in body
    assert client.get("/models/no-such-model/").status_code == 404
    variant = text(client.get("/models/ft:alpha:sales:abc123/"))
    assert "fine-tuned variant of" in variant and 'id="deploy-form"' not in signed_in(world["otto"]).get(
        "/models/ft:alpha:sales:abc123/").content.decode()


# Import ---------------------------------------------------------------------------------------------------

def test_an_operator_imports_a_folder_with_progress_and_checksums_verified_and_audited(world):
    folder = write_checkpoint(world["tmp"] / "beta", values=(3.0, 4.0, 5.0))
    sums = "\n".join(f"{sha256(folder / name)}  {name}" for name in ("config.json", "model.safetensors"))
    operator = signed_in(world["otto"])
    response = operator.post(IMPORT, {"name": "beta", "path": str(folder), "pool": "gpu-b", "checksums": sums})
    started = ModelImport.objects.get(name="beta")
    assert response.status_code == 302 and response["Location"] == f"/models/imports/{started.pk}/"
    assert started.status == "queued" and started.expected["model.safetensors"] == sha256(folder / "model.safetensors")
    assert AuditRecord.objects.get(action="model.import.start").details["pool"] == "gpu-b"
    queued = text(operator.get(response["Location"], headers={"HX-Request": "true"}))
    assert 'hx-trigger="every 2s"' in queued and 'data-status="queued"' in queued

    model_import.apply(args=[started.pk])  # what the pool's worker runs when the message arrives

    started.refresh_from_db()
    assert started.status == "succeeded" and started.percent == 100
    assert started.bytes_done == started.bytes_total == sum(p.stat().st_size for p in folder.iterdir())
    beta = Model.objects.get(name="beta")
    assert beta.manifest == started.manifest and beta.family == "deepseek_v4"
    done = AuditRecord.objects.get(action="model.import")
    assert done.outcome == "success" and done.actor_label == "otto" and done.details["checked_against"] == "expected"
    assert AuditRecord.objects.filter(action="model.register", target_id="beta", actor_label="otto").exists()
    finished = text(operator.get(response["Location"], headers={"HX-Request": "true"}))
    assert "every 2s" not in finished and "Registered" in finished and "against the expected checksums" in finished
    model_import.apply(args=[started.pk])  # a redelivered message does nothing more
    assert AuditRecord.objects.filter(action="model.import").count() == 1


def test_a_checksum_that_does_not_match_fails_the_import_naming_the_file(world):
    folder = write_checkpoint(world["tmp"] / "gamma")
    (folder / "SHA256SUMS").write_text(f"{'0' * 64}  model.safetensors\n{sha256(folder / 'config.json')}  config.json\n")
    signed_in(world["root"]).post(IMPORT, {"name": "gamma", "path": str(folder), "pool": "gpu-a"})
    started = ModelImport.objects.get(name="gamma")
    model_import.apply(args=[started.pk])
    started.refresh_from_db()
    assert started.status == "failed" and "model.safetensors does not match its expected SHA-256" in started.error
    assert not Model.objects.filter(name="gamma").exists()
    record = AuditRecord.objects.get(action="model.import")
    assert record.outcome == "failure" and "model.safetensors" in record.details["reason"]
    page = text(signed_in(world["root"]).get(f"/models/imports/{started.pk}/"))
    assert 'role="alert">model.safetensors does not match' in page


def test_a_folder_with_pickle_weights_is_refused(world):
    folder = write_checkpoint(world["tmp"] / "delta")
    (folder / "pytorch_model.bin").write_bytes(b"not loaded, ever")
    signed_in(world["otto"]).post(IMPORT, {"name": "delta", "path": str(folder), "pool": "gpu-a"})
    started = ModelImport.objects.get(name="delta")
    model_import.apply(args=[started.pk])
    started.refresh_from_db()
    assert started.status == "failed" and "pickle checkpoint" in started.error


def test_import_form_errors_are_shown_next_to_their_fields(world):
    operator = signed_in(world["otto"])
    cases = [({"name": "Not A Slug", "path": "/x", "pool": "gpu-a"}, "name", "must be a slug"),
             ({"name": "alpha", "path": "/x", "pool": "gpu-a"}, "name", "already registered"),
             ({"name": "eps", "path": "relative/path", "pool": "gpu-a"}, "path", "must be absolute"),
             ({"name": "eps", "path": "/x", "pool": ""}, "pool", "Choose the pool"),
             ({"name": "eps", "path": "/x", "pool": "gpu-a", "checksums": "abc  file"}, "checksums",
              "Line 1 is not")]
    for data, field, message in cases:
        response = operator.post(IMPORT, data)
        assert response.status_code == 400, data
        assert re.search(rf'id="error-{field}" role="alert">[^<]*{message}', text(response)), (data, field)
        assert f'value="{data["path"]}"' in text(response)  # what was typed stays in the form
    assert not ModelImport.objects.exists()


# Deploy and undeploy -----------------------------------------------------------------------------------

def test_an_operator_deploys_with_engine_settings_and_it_is_audited(world):
    operator = signed_in(world["otto"])
    assert 'id="deploy-form"' in text(operator.get("/models/alpha/"))
    response = operator.post("/models/alpha/deploy/", {
        "pool": "gpu-b", "quantization": "fp8", "kv_device_bytes": "2G", "kv_host_bytes": "8G",
        "max_num_seqs": "64", "device": "cpu", "extra_settings": '{"max_loras": 4}'})
    assert response.status_code == 302 and response["Location"] == "/models/alpha/"
    deployment = Deployment.objects.get(model__name="alpha", pool__name="gpu-b", status="active")
    assert deployment.engine_settings == {"quantization": "fp8", "kv_device_bytes": 2 * 1024**3,
                                          "kv_host_bytes": 8 * 1024**3, "max_num_seqs": 64, "device": "cpu",
                                          "max_loras": 4}
    record = AuditRecord.objects.get(action="deployment.create", target_id=str(deployment.pk))
    assert record.actor_label == "otto" and record.details["engine_settings"]["quantization"] == "fp8"
    assert "quantization=fp8" in text(operator.get("/models/alpha/"))


def test_refused_engine_settings_and_pools_are_shown_next_to_their_fields(world):
    operator = signed_in(world["otto"])
    cases = [({"pool": "gpu-b", "kv_host_bytes": "8G"}, "kv_host_bytes", "needs kv_device_bytes"),
             ({"pool": "gpu-b", "kv_device_bytes": "lots"}, "kv_device_bytes", "must be a size in bytes"),
             ({"pool": "gpu-b", "max_num_seqs": "0"}, "max_num_seqs", "must be an integer &gt;= 1"),
             ({"pool": "gpu-b", "extra_settings": '{"warp_drive": 9}'}, "extra_settings", "Unknown engine setting"),
             ({"pool": "gpu-b", "extra_settings": "[1]"}, "extra_settings", "must be a JSON object"),
             ({"pool": ""}, "pool", "Choose a worker pool"),
             ({"pool": "gpu-a"}, "pool", "already deployed on pool")]
    for data, field, message in cases:
        response = operator.post("/models/alpha/deploy/", data)
        assert response.status_code == 400, data
        assert re.search(rf'id="error-{field}" role="alert">[^<]*{message}', text(response)), (data, text(response)[-3000:])
    assert Deployment.objects.filter(model__name="alpha").count() == 1


def test_a_deployment_residency_refuses_is_shown_at_the_pool_and_audited_as_denied(world):
    from citadel.accounts.services import api_key_create
    from citadel.residency.models import DataClass, Site
    from citadel.residency.services import policy_create

    ops = Team.objects.get(name="ops")
    api_key_create(user=world["erin"], name="ops-app", team=ops, actor=SYSTEM)  # ops sends internal data
    policy_create(team=ops, data_class=DataClass.objects.get(name="internal"), actor=SYSTEM,
                  processing_sites=[Site.objects.get(name="site-a")])
    world["alpha"].teams.set([ops])
    response = signed_in(world["otto"]).post("/models/alpha/deploy/", {"pool": "gpu-b"})
    assert response.status_code == 400
    assert re.search(r'id="error-pool" role="alert">[^<]*team &#x27;ops&#x27; may process', text(response))
    denied = AuditRecord.objects.get(action="deployment.create", outcome="denied")
    assert denied.details["pool"] == "gpu-b" and denied.actor_label == "otto"
    assert not Deployment.objects.filter(pool__name="gpu-b").exists()


def test_undeploying_asks_first_then_retires_and_audits(world):
    operator = signed_in(world["otto"])
    url = f"/deployments/{world['deployment'].pk}/undeploy/"
    confirm = operator.get(url)
    assert confirm.status_code == 200 and 'id="confirm-undeploy"' in text(confirm) and "gpu-a" in text(confirm)
    assert Deployment.objects.get(pk=world["deployment"].pk).status == "active"
    assert operator.post(url).status_code == 302
    assert Deployment.objects.get(pk=world["deployment"].pk).status == "retired"
    assert AuditRecord.objects.get(action="deployment.retire").target_id == str(world["deployment"].pk)
    again = operator.post(url)
    assert again.status_code == 409 and "already retired" in text(again)


def test_changing_a_deployments_engine_settings_redeploys_it_on_the_same_pool(world):
    operator = signed_in(world["otto"])
    url = f"/deployments/{world['deployment'].pk}/settings/"
    form = text(operator.get(url))
    assert 'id="device" value="cpu"' in form
    refused = operator.post(url, {"device": "cpu", "kv_disk_bytes": "1G"})
    assert refused.status_code == 400
    assert re.search(r'id="error-kv_disk_bytes" role="alert">[^<]*kv_disk_bytes needs kv_device_bytes', text(refused))
    assert Deployment.objects.get(pk=world["deployment"].pk).status == "active"  # nothing retired
    assert operator.post(url, {"device": "cpu", "quantization": "fp8", "max_model_len": "2048"}).status_code == 302
    assert Deployment.objects.get(pk=world["deployment"].pk).status == "retired"
    new = Deployment.objects.get(model__name="alpha", pool__name="gpu-a", status="active")
    assert new.engine_settings == {"device": "cpu", "quantization": "fp8", "max_model_len": 2048}
    assert AuditRecord.objects.filter(action="deployment.retire", target_id=str(world["deployment"].pk)).exists()
    assert AuditRecord.objects.filter(action="deployment.create", target_id=str(new.pk), actor_label="otto").exists()
    assert operator.get(url).status_code == 404  # the retired one has no settings to change
    assert signed_in(world["erin"]).get(f"/deployments/{new.pk}/settings/").status_code == 403


def test_the_live_fragment_follows_the_pools_workers(world):
    client = signed_in(world["erin"])
    url = f"/deployments/{world['deployment'].pk}/live/"
    assert "no live worker" in text(client.get(url))
    worker = online_worker(world["pool"])
    starting = text(client.get(url))
    assert "starting" in starting and 'hx-trigger="every 5s"' in starting
    worker.loaded_models = [str(world["folder"])]
    worker.save()
    assert "serving" in text(client.get(url)) and "1 of 1 live worker loaded it" in text(client.get(url))
    Worker.objects.filter(pk=worker.pk).update(last_heartbeat=timezone.now() - timedelta(minutes=10))
    assert "no live worker" in text(client.get(url))
    assert client.get("/deployments/999999/live/").status_code == 404


# Who may ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["erin", "audrey", "lead"])
def test_roles_without_the_registry_role_read_but_change_nothing(world, name):
    client = signed_in(world[name])
    assert client.get(MODELS).status_code == 200
    assert client.get("/models/alpha/").status_code == 200
    folder = write_checkpoint(world["tmp"] / "zeta")
    assert client.post(IMPORT, {"name": "zeta", "path": str(folder), "pool": "gpu-a"}).status_code == 403
    assert client.post("/models/alpha/deploy/", {"pool": "gpu-b"}).status_code == 403
    assert client.get(f"/deployments/{world['deployment'].pk}/undeploy/").status_code == 403
    assert client.post(f"/deployments/{world['deployment'].pk}/undeploy/").status_code == 403
    assert not ModelImport.objects.exists()
    assert Deployment.objects.get(pk=world["deployment"].pk).status == "active"
    assert Deployment.objects.filter(pool__name="gpu-b").count() == 0


def test_signed_out_visitors_are_sent_to_sign_in(world):
    for url in (MODELS, "/models/alpha/", f"/deployments/{world['deployment'].pk}/live/"):
        response = Client().get(url)
        assert response.status_code == 302 and response["Location"].startswith("/login/"), url
