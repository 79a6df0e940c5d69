"""Reads the console's fine-tuning pages need beyond selectors.py: what a signed-in user sees
(through the access module's team scoping, the same rule as the management API), which models
the job form offers, the form's defaults, and the full validation report of a refused upload.

Kept apart from selectors.py so the console can grow without touching the API's reads; nothing
here decides anything the services do not already decide.
"""

import tempfile
from pathlib import Path

from django.db.models import QuerySet

from citadel.accounts.permissions import object_get, scope
from citadel.core.exceptions import CitadelError
from citadel.finetuning import training
from citadel.finetuning.models import File, FineTuningCheckpoint, FineTuningEvent, FineTuningJob
from citadel.finetuning.selectors import parse_id
from citadel.registry.models import Model
from citadel.registry.selectors import models_deployed


def console_files(*, user) -> QuerySet[File]:
    """Fine-tuning files `user` may see (their teams', their own team-less ones; all for admins)."""
    files = File.objects.filter(deleted_at__isnull=True, purpose=File.Purpose.FINE_TUNE)
    return scope(user, files.select_related("site", "data_class", "team", "user")).order_by("-created_at", "-id")


def console_jobs(*, user) -> QuerySet[FineTuningJob]:
    jobs = FineTuningJob.objects.select_related("model", "training_file", "validation_file", "fine_tuned_model",
                                                "pool", "site", "team", "user", "data_class")
    return scope(user, jobs).order_by("-created_at", "-id")


def console_job_get(*, user, job_id: str) -> FineTuningJob:
    """One job by its OpenAI id; NotFound for a malformed id, a missing job and another team's alike."""
    pk = parse_id(job_id, "ftjob", what="fine-tuning job", param="fine_tuning_job_id")
    return object_get(user, console_jobs(user=user), what="fine-tuning job", param="fine_tuning_job_id", pk=pk)


def console_job_events(*, job: FineTuningJob, limit: int = 200) -> list[FineTuningEvent]:
    """The newest events first, as OpenAI lists them."""
    return list(FineTuningEvent.objects.filter(job=job).order_by("-id")[:limit])


def console_job_checkpoints(*, job: FineTuningJob) -> list[FineTuningCheckpoint]:
    return list(FineTuningCheckpoint.objects.filter(job=job).order_by("-step", "-id"))


def finetunable_models() -> QuerySet[Model]:
    """Base models that are deployed: a job on any other would be refused (no pool can train it)."""
    return models_deployed().filter(base__isnull=True).order_by("name")


def job_form_defaults() -> dict:
    """finetune.TrainConfig's defaults and choices, for the job form (the trainer's, not a copy)."""
    from finetune import TrainConfig
    from finetune.config import LR_SCHEDULES, TARGET_PRESETS

    return {"values": TrainConfig().to_dict(), "target_presets": TARGET_PRESETS, "lr_schedules": LR_SCHEDULES}


def upload_report(*, upload, model_name: str) -> dict | None:
    """The validation report of an upload that file_upload refused, so the console can show every
    bad line rather than the first five of the error message. Nothing is kept; None when the file
    cannot be validated at all (unknown model, unreadable tokenizer)."""
    model = Model.objects.filter(name=model_name, base__isnull=True).first()
    if model is None:
        return None
    with tempfile.TemporaryDirectory(prefix="citadel-upload-") as folder:
        path = Path(folder) / "upload.jsonl"
        upload.seek(0)
        with path.open("wb") as out:
            for chunk in upload.chunks():
                out.write(chunk)
        try:
            return training.dataset_validate(path=path, base_path=model.path, param="file").to_dict()
        except CitadelError:  # the refusal's own message already says what is wrong
            return None
