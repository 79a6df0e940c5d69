"""OpenAI's objects (openai.types.FileObject, fine_tuning.FineTuningJob, ...Event, ...Checkpoint)
built from the rows, so the official client parses them unchanged.

Citadel's additions ride in extra keys the client keeps but does not need: a file's
`citadel_validation` report, a job's `citadel` block (LoRA settings, progress, pool).
"""

from citadel.finetuning.models import File, FineTuningCheckpoint, FineTuningEvent, FineTuningJob
from citadel.finetuning.selectors import Page


def _ts(value) -> int | None:
    return int(value.timestamp()) if value is not None else None


def file_body(file: File) -> dict:
    return {"id": file.openai_id, "object": "file", "bytes": file.bytes, "created_at": _ts(file.created_at),
            "filename": file.filename, "purpose": file.purpose, "status": file.status, "status_details": None,
            "expires_at": None, "citadel_validation": {"base_model": file.validated_with, **(file.report or {})},
            "citadel_site": file.site.name}


def job_body(job: FineTuningJob) -> dict:
    error = None
    if job.status == FineTuningJob.Status.FAILED:
        error = {"code": job.error_code or "failed", "message": job.error_message, "param": job.error_param or None}
    hyperparameters = dict(job.hyperparameters)
    return {
        "id": job.openai_id, "object": "fine_tuning.job", "created_at": _ts(job.created_at),
        "error": error, "fine_tuned_model": job.fine_tuned_model.name if job.fine_tuned_model_id else None,
        "finished_at": _ts(job.finished_at), "hyperparameters": hyperparameters, "model": job.model.name,
        "organization_id": f"team-{job.team.name}" if job.team_id else "citadel",
        "result_files": [job.result_file.openai_id] if job.result_file_id else [],
        "seed": job.seed, "status": job.status, "trained_tokens": job.trained_tokens,
        "training_file": job.training_file.openai_id,
        "validation_file": job.validation_file.openai_id if job.validation_file_id else None,
        "estimated_finish": _ts(job.estimated_finish) if job.status == FineTuningJob.Status.RUNNING else None,
        "integrations": [], "metadata": job.metadata,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
        "user_provided_suffix": job.suffix or None,
        "citadel": {"config": job.config, "step": job.step, "total_steps": job.total_steps,
                    "train_loss": job.train_loss, "valid_loss": job.valid_loss, "attempts": job.attempts,
                    "pool": job.pool.name if job.pool_id else None, "site": job.site.name if job.site_id else None,
                    "worker": job.worker_name or None, "data_class": job.data_class.name,
                    "estimated_tokens": job.estimated_tokens},
    }


def event_body(event: FineTuningEvent) -> dict:
    return {"id": event.openai_id, "object": "fine_tuning.job.event", "created_at": _ts(event.created_at),
            "level": event.level, "message": event.message, "data": event.data, "type": event.type}


def checkpoint_body(checkpoint: FineTuningCheckpoint, job: FineTuningJob) -> dict:
    from citadel.finetuning.services import fine_tuned_model_name

    metrics = checkpoint.metrics or {}
    return {"id": checkpoint.openai_id, "object": "fine_tuning.job.checkpoint",
            "created_at": _ts(checkpoint.created_at),
            "fine_tuned_model_checkpoint": f"{fine_tuned_model_name(job)}:ckpt-step-{checkpoint.step}",
            "fine_tuning_job_id": job.openai_id, "step_number": checkpoint.step,
            "metrics": {"step": float(checkpoint.step), "train_loss": metrics.get("train_loss"),
                        "valid_loss": metrics.get("valid_loss")}}


def list_body(page: Page, render) -> dict:
    data = [render(item) for item in page.items]
    return {"object": "list", "data": data, "has_more": page.has_more,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}
