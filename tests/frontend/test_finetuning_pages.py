"""The console's fine-tuning pages through Django's test client: dataset upload and its report,
the job form's field errors, the job page's loss curve, events and checkpoints, cancel, the link
to the playground, and who may see which job. Jobs' progress is written through the finetuning
services, as a worker would; nothing trains here."""

import io
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from django.contrib.auth import get_user_model
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

from citadel.accounts.models import Membership, Role, Team
from citadel.audit.services import Actor
from citadel.finetuning import services
from citadel.finetuning.models import File, FineTuningJob
from citadel.registry.services import deployment_create, model_register, pool_create
from citadel.residency.models import DataClass
from citadel.residency.services import Subject, policy_create, site_create
from frontend.loss_chart import loss_chart

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "models" / "demo-v4"
SYSTEM = Actor.system("test")
TRAIN_LINES = (DEMO / "finetune" / "train.jsonl").read_text().splitlines()
UPLOAD = "/fine-tuning/datasets/upload"
NEW_JOB = "/fine-tuning/jobs/new/"


def jsonl(lines) -> bytes:
    return ("\n".join(lines) + "\n").encode()


def named(content: bytes, name: str = "train.jsonl"):
    handle = io.BytesIO(content)
    handle.name = name
    return handle


@pytest.fixture
def world(tmp_path, monkeypatch):
    """demo-v4 deployed on pool ft-pool at site ft-site; users without a team may store and
    fine-tune internal data there; team `blue` too. Jobs are recorded, not sent to a broker."""
    site = site_create(name="ft-site", jurisdiction="EU", storage_path=str(tmp_path / "store"), actor=SYSTEM)
    model = model_register(name="demo-v4", path=str(DEMO), actor=SYSTEM)
    pool = pool_create(name="ft-pool", site=site, actor=SYSTEM)
    deployment_create(model=model, pool=pool, actor=SYSTEM)
    internal = DataClass.objects.get(name="internal")
    blue = Team.objects.create(name="blue")
    for team in (None, blue):
        policy_create(team=team, data_class=internal, processing_sites=[site], storage_sites=[site],
                      fine_tuning_allowed=True, actor=SYSTEM)
    users = get_user_model().objects
    ml = users.create_user("ml", password="x" * 16)
    published = []
    from citadel.finetuning import tasks

    monkeypatch.setattr(tasks.run_job, "apply_async", lambda args, queue, **kw: published.append(args[0]))
    client = Client()
    client.force_login(ml)
    return SimpleNamespace(site=site, model=model, pool=pool, internal=internal, blue=blue, ml=ml, client=client,
                           users=users, published=published)


def signed_in(user, **kwargs) -> Client:
    client = Client(**kwargs)
    client.force_login(user)
    return client


def upload(client, content: bytes, **extra):
    return client.post(UPLOAD, {"file": named(content), "model": "demo-v4"}, **extra)


def file_for(world, user=None, team=None, lines=None) -> File:
    """A stored dataset, uploaded through the service as the console does."""
    content = SimpleUploadedFile("train.jsonl", jsonl(lines or TRAIN_LINES[:16]))
    return services.file_upload(upload=content, purpose="fine-tune",
                                subject=Subject(team=team, data_class=world.internal, key_class=world.internal),
                                actor=SYSTEM, user=user or world.ml, model_name="demo-v4")


def job_for(world, user=None, team=None, **citadel) -> FineTuningJob:
    user = user or world.ml
    file = file_for(world, user=user, team=team)
    return services.job_create(model_name="demo-v4", training_file_id=file.openai_id, actor=SYSTEM, user=user,
                               subject=Subject(team=team, data_class=world.internal, key_class=world.internal),
                               citadel={"epochs": 1, "batch_size": 4, **citadel}, seed=1)


def train(job: FineTuningJob, losses, *, worker="gpu-1@test", valid=None, checkpoint_at=None) -> None:
    """What a worker records while training: metrics per step, a validation loss, a checkpoint."""
    assert services.job_claim(job_id=job.id, worker_name=worker) is not None
    for step, loss in enumerate(losses, start=1):
        services.job_progress(job_id=job.id, worker_name=worker, event={
            "type": "metrics", "step": step, "total_steps": 10, "epoch": 1, "loss": loss,
            "learning_rate": 1e-3, "tokens_per_second": 420.0, "eta_seconds": 12.0})
        if checkpoint_at == step:
            services.job_progress(job_id=job.id, worker_name=worker,
                                  event={"type": "checkpoint", "step": step, "path": f"/tmp/ckpt-{step}"})
    if valid is not None:
        services.job_progress(job_id=job.id, worker_name=worker,
                              event={"type": "eval", "step": len(losses), "valid_loss": valid})


def field_error(html: str, name: str) -> str:
    found = re.search(rf'id="error-{name}"[^>]*>([^<]*)<', html)
    return found.group(1) if found else ""


def polyline(html: str, series: str) -> list[tuple[float, float]]:
    found = re.search(rf'class="series series-{series}"[^>]*points="([^"]*)"', html)
    assert found, f"no {series} polyline in the chart"
    return [tuple(float(v) for v in pair.split(",")) for pair in found.group(1).split()]


# -- datasets ---------------------------------------------------------------------------------------

def test_a_malformed_upload_shows_the_report_with_each_bad_lines_number_and_keeps_nothing(world):
    lines = [TRAIN_LINES[0], "{not json", TRAIN_LINES[1],
             json.dumps({"messages": [{"role": "user", "content": "no reply"}]}), TRAIN_LINES[2]]
    response = upload(world.client, jsonl(lines))
    assert response.status_code == 400
    html = response.content.decode()
    assert "cannot be used for fine-tuning" in html
    rows = re.findall(r"<tr><td>(\d+)</td><td>([^<]+)</td></tr>", html.split('id="report-errors"')[1])
    assert [int(line) for line, _ in rows] == [2, 4]
    assert all(reason.strip() for _, reason in rows)
    assert "2 bad lines" in html and 'id="report-examples">3<' in html
    assert not File.objects.exists()


def test_a_valid_upload_is_stored_and_reports_examples_tokens_and_a_time_estimate(world):
    response = upload(world.client, jsonl(TRAIN_LINES[:12]))
    assert response.status_code == 200
    html = response.content.decode()
    file = File.objects.get()
    assert file.user == world.ml and file.report["examples"] == 12
    assert "Ready for training" in html and f'id="uploaded-id">{file.openai_id}<' in html
    assert 'id="report-examples">12<' in html and f'id="report-tokens">{file.report["total_tokens"]}<' in html
    assert re.search(r'id="report-estimate">(about \d+ (s|min)|under a second)', html)
    assert f'data-file="{file.openai_id}"' in html  # listed with the others
    assert f"?training_file={file.openai_id}" in html
    listed = world.client.get("/fine-tuning/datasets/").content.decode()
    assert f'data-file="{file.openai_id}"' in listed


def test_an_upload_from_htmx_answers_the_report_and_a_fresh_file_list_out_of_band(world):
    response = upload(world.client, jsonl(TRAIN_LINES[:8]), HTTP_HX_REQUEST="true")
    assert response.status_code == 200
    html = response.content.decode()
    assert html.lstrip().startswith('<div id="upload-result"') and "<html" not in html
    assert 'id="files" hx-swap-oob="true"' in html and File.objects.get().openai_id in html
    refused = upload(world.client, b"{broken\n", HTTP_HX_REQUEST="true").content.decode()
    assert 'role="alert"' in refused and "line 1" in refused


def test_an_examples_over_the_length_limit_are_listed_with_their_token_counts(world):
    long_reply = " ".join(["The Mistral Barometer costs 898 euros."] * 80)
    lines = [*TRAIN_LINES[:4], json.dumps({"messages": [{"role": "user", "content": "Price?"},
                                                       {"role": "assistant", "content": long_reply}]})]
    html = upload(world.client, jsonl(lines)).content.decode()
    rows = re.findall(r"<tr><td>(\d+)</td><td>(\d+)</td></tr>", html.split('id="report-too-long"')[1])
    assert rows and rows[0][0] == "5" and int(rows[0][1]) > 256


# -- the job form ------------------------------------------------------------------------------------

def test_a_bad_hyperparameter_is_shown_next_to_its_field_and_no_job_is_made(world):
    file = file_for(world)
    form = {"model": "demo-v4", "training_file": file.openai_id, "epochs": "1", "rank": "0",
            "target_modules": "attention"}
    response = world.client.post(NEW_JOB, form)
    assert response.status_code == 400
    html = response.content.decode()
    assert field_error(html, "rank") == "must be from 1 to 1024, got 0."
    assert 'name="rank" id="rank" type="number" step="1" value="0" aria-invalid="true"' in html
    assert not field_error(html, "epochs")
    bad_rate = world.client.post(NEW_JOB, {**form, "rank": "8", "learning_rate": "fast"}).content.decode()
    assert "fast" in field_error(bad_rate, "learning_rate") and not field_error(bad_rate, "rank")
    no_file = world.client.post(NEW_JOB, {**form, "rank": "8", "training_file": ""}).content.decode()
    assert "training_file" in field_error(no_file, "training_file")
    bad_suffix = world.client.post(NEW_JOB, {**form, "rank": "8", "suffix": "no spaces!"}).content.decode()
    assert "suffix" in field_error(bad_suffix, "suffix")
    assert not FineTuningJob.objects.exists() and world.published == []


def test_the_form_offers_deployed_base_models_and_the_users_files_with_the_trainers_defaults(world):
    file = file_for(world)
    html = world.client.get(f"{NEW_JOB}?training_file={file.openai_id}").content.decode()
    assert '<option value="demo-v4">demo-v4</option>' in html or 'value="demo-v4"' in html
    assert f'<option value="{file.openai_id}" selected>' in html
    assert 'name="rank" id="rank" type="number" step="1" value="8"' in html
    assert 'value="attention+shared_experts"' in html and 'value="cosine" selected' in html


def test_a_job_submitted_from_the_form_is_queued_and_opens_its_page(world, django_capture_on_commit_callbacks):
    file, held_out = file_for(world), file_for(world, lines=TRAIN_LINES[-8:])
    with django_capture_on_commit_callbacks(execute=True):
        response = world.client.post(NEW_JOB, {
            "model": "demo-v4", "training_file": file.openai_id, "validation_file": held_out.openai_id,
            "epochs": "2", "batch_size": "4",
            "learning_rate": "0.002", "rank": "4", "alpha": "8", "target_modules": "custom",
            "custom_modules": "q_proj, o_proj", "suffix": "prices", "seed": "7"})
    job = FineTuningJob.objects.get()
    assert response.status_code == 302 and response.url == f"/fine-tuning/jobs/{job.openai_id}/"
    assert job.config["epochs"] == 2 and job.config["rank"] == 4 and job.config["alpha"] == 8
    assert job.config["learning_rate"] == 0.002 and job.config["target_modules"] == ["q_proj", "o_proj"]
    assert job.suffix == "prices" and job.seed == 7 and job.user == world.ml and job.validation_file == held_out
    assert world.published == [str(job.id)]
    html = world.client.get(response.url).content.decode()
    assert 'id="job-status" class="status status-queued"' in html and "Fine-tuning job queued" in html
    assert 'hx-trigger="every 2s"' in html and 'id="cancel-job"' in html


# -- the job page ------------------------------------------------------------------------------------

def test_the_job_page_draws_the_loss_curve_and_lists_events_and_checkpoints(world):
    job = job_for(world)
    train(job, [2.4, 1.9, 1.5, 1.2, 1.0], valid=1.3, checkpoint_at=4)
    html = world.client.get(f"/fine-tuning/jobs/{job.openai_id}/").content.decode()
    assert 'id="job-status" class="status status-running"' in html and 'id="job-step">5 of 10<' in html
    points = polyline(html, "train")
    assert len(points) == 5
    xs, ys = [x for x, _ in points], [y for _, y in points]
    assert xs == sorted(xs) and ys == sorted(ys)  # later steps to the right, lower loss lower down (larger y)
    assert len(polyline(html, "validation")) == 1
    assert "Step 5/10: training loss=1.0000" in html and "Checkpoint saved at step 4" in html
    assert "Fine-tuning started on worker gpu-1@test" in html
    assert re.search(r"<td><code>ftckpt-\d+</code></td><td>4</td>", html)
    assert 'hx-get="/fine-tuning/jobs/' in html and 'hx-trigger="every 2s"' in html


def test_the_live_part_answers_newer_progress_and_stops_polling_once_the_job_ends(world):
    job = job_for(world)
    train(job, [2.0, 1.6])
    live = f"/fine-tuning/jobs/{job.openai_id}/live"
    first = world.client.get(live).content.decode()
    assert first.lstrip().startswith("<div id=\"job-live\"") and "<html" not in first
    assert len(polyline(first, "train")) == 2
    services.job_progress(job_id=job.id, worker_name="gpu-1@test", event={
        "type": "metrics", "step": 3, "total_steps": 10, "loss": 1.1})
    assert len(polyline(world.client.get(live).content.decode(), "train")) == 3
    services.job_fail(job_id=job.id, code="training_error", message="RuntimeError: out of memory", actor=SYSTEM)
    ended = world.client.get(live).content.decode()
    assert 'data-status="failed"' in ended and "hx-trigger" not in ended and 'id="cancel-job"' not in ended
    assert "out of memory" in ended
    polled_after_logout = Client().get(live, HTTP_HX_REQUEST="true")
    assert polled_after_logout.status_code == 200 and polled_after_logout["HX-Redirect"].startswith("/login/?next=")


def test_a_job_without_progress_yet_shows_an_empty_chart_that_says_so(world):
    html = world.client.get(f"/fine-tuning/jobs/{job_for(world).openai_id}/").content.decode()
    assert 'id="loss-chart"' in html and "No loss reported yet" in html


def test_a_succeeded_job_links_to_the_playground_with_its_model_preselected(world, tmp_path):
    job = job_for(world)
    train(job, [2.0, 1.0])
    result = SimpleNamespace(adapter_dir=tmp_path / "adapter", trained_tokens=1234, steps=2, train_loss=1.0,
                             valid_loss=None)
    job = services.job_succeed(job_id=job.id, worker_name="gpu-1@test", result=result)
    name = job.fine_tuned_model.name
    html = world.client.get(f"/fine-tuning/jobs/{job.openai_id}/").content.decode()
    link = re.search(r'id="try-in-playground" href="([^"]+)"', html).group(1)
    assert link.startswith("/playground/?model=") and "hx-trigger" not in html
    playground = world.client.get(link.replace("&amp;", "&")).content.decode()
    assert f'<option value="{name}" selected>{name}</option>' in playground
    listing = world.client.get("/fine-tuning/").content.decode()
    assert job.openai_id in listing and name in listing


# -- cancel and who may see what ------------------------------------------------------------------------

def test_cancel_needs_a_signed_in_user_and_csrf_and_then_cancels_the_job(world):
    job = job_for(world)
    cancel = f"/fine-tuning/jobs/{job.openai_id}/cancel"
    anonymous = Client().post(cancel)
    assert anonymous.status_code == 302 and "/login/" in anonymous.url
    strict = signed_in(world.ml, enforce_csrf_checks=True)
    assert strict.post(cancel).status_code == 403
    page = strict.get(f"/fine-tuning/jobs/{job.openai_id}/")
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.content.decode()).group(1)
    assert strict.get(cancel).status_code == 405
    job.refresh_from_db()
    assert job.status == "queued"
    response = strict.post(cancel, {"csrfmiddlewaretoken": token})
    assert response.status_code == 302 and response.url == f"/fine-tuning/jobs/{job.openai_id}/"
    job.refresh_from_db()
    assert job.status == "cancelled"
    html = strict.get(response.url).content.decode()
    assert "Job cancelled" in html and 'id="cancel-job"' not in html
    again = strict.post(cancel, {"csrfmiddlewaretoken": token})
    assert again.status_code == 400 and "already cancelled" in again.content.decode()


def test_another_users_or_teams_job_is_not_found_and_cannot_be_cancelled(world):
    alone = job_for(world)
    blue1, blue2, red = (world.users.create_user(n, password="x" * 16) for n in ("blue1", "blue2", "red"))
    Membership.objects.create(team=world.blue, user=blue1, role=Role.ML_ENGINEER)
    Membership.objects.create(team=world.blue, user=blue2, role=Role.ML_ENGINEER)
    red_team = Team.objects.create(name="red")
    Membership.objects.create(team=red_team, user=red, role=Role.ML_ENGINEER)
    team_job = job_for(world, user=blue1, team=world.blue)
    teammate, outsider = signed_in(blue2), signed_in(red)
    assert teammate.get(f"/fine-tuning/jobs/{team_job.openai_id}/").status_code == 200
    for job in (alone, team_job):
        for path in ("", "live"):
            assert outsider.get(f"/fine-tuning/jobs/{job.openai_id}/{path}").status_code == 404
        assert outsider.post(f"/fine-tuning/jobs/{job.openai_id}/cancel").status_code == 404
    assert teammate.get(f"/fine-tuning/jobs/{alone.openai_id}/").status_code == 404
    assert outsider.get("/fine-tuning/jobs/ftjob-nonsense/").status_code == 404
    assert alone.openai_id not in outsider.get("/fine-tuning/").content.decode()
    assert team_job.training_file.openai_id in teammate.get("/fine-tuning/datasets/").content.decode()
    assert team_job.training_file.openai_id not in outsider.get("/fine-tuning/datasets/").content.decode()
    assert FineTuningJob.objects.filter(status="cancelled").count() == 0


def test_an_auditor_reads_the_pages_but_cannot_upload_or_submit(world):
    auditor = world.users.create_user("auditor", password="x" * 16)
    Membership.objects.create(team=world.blue, user=auditor, role=Role.AUDITOR)
    client = signed_in(auditor)
    assert client.get("/fine-tuning/datasets/").status_code == 200
    assert upload(client, jsonl(TRAIN_LINES[:4])).status_code == 403
    assert client.get(NEW_JOB).status_code == 403
    assert not File.objects.exists()


def test_the_console_nav_links_to_fine_tuning(world):
    assert '<a href="/fine-tuning/">Fine-tuning</a>' in world.client.get("/fine-tuning/").content.decode()


# -- the chart's geometry ------------------------------------------------------------------------------

def test_the_loss_chart_maps_steps_left_to_right_and_loss_bottom_to_top_with_round_ticks():
    points = [{"step": s, "train_loss": 3.0 - 0.25 * s, "valid_loss": None} for s in range(1, 9)]
    points.append({"step": 8, "train_loss": None, "valid_loss": 1.5})
    chart = loss_chart(points)
    train, valid = chart.series
    coords = [tuple(map(float, p.split(","))) for p in train.points.split()]
    assert train.count == 8 and valid.count == 1 and not chart.empty
    assert coords[0][0] < coords[-1][0] and coords[0][1] < coords[-1][1]
    assert all(chart.left <= x <= chart.right and chart.top <= y <= chart.bottom for x, y in coords)
    assert [label for _, label in chart.y_ticks] == ["1.0", "1.5", "2.0", "2.5", "3.0"]
    assert loss_chart([]).empty and loss_chart([{"step": 1, "train_loss": float("nan")}]).empty
    flat = loss_chart([{"step": 1, "train_loss": 2.0}])
    assert flat.series[0].count == 1 and flat.y_ticks
