"""Writes for fine-tuning: uploads and jobs (web side), claim, progress and outcome (worker side),
and recovery of jobs whose worker died or whose message was lost (beat).

Everything a user could get wrong is checked before a job row exists and long before any GPU
time: the file (finetune.validate_dataset, with line numbers), the base model, the
hyperparameters (finetune.TrainConfig), the quotas, and the residency policy (where the file
may be stored, whether fine-tuning is allowed and on which pools). Each refusal is audited and
raised as a CitadelError naming the field; every state change of a file or job is audited.
"""

import csv
import hashlib
import io
import logging
import os
import re
import uuid
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.db.models import F, Sum
from django.utils import timezone

from citadel.audit.services import Actor, audit_record
from citadel.core.exceptions import CitadelError, InvalidRequest
from citadel.finetuning import training
from citadel.finetuning.models import File, FineTuningCheckpoint, FineTuningEvent, FineTuningJob
from citadel.quotas.limiter import quota_gpu_hours_admit
from citadel.registry.models import Model
from citadel.registry.selectors import workers_live
from citadel.registry.services import model_variant_register
from citadel.residency.models import DataClass
from citadel.residency.services import ResidencyDenied, Subject, decide, storage_site_for

logger = logging.getLogger(__name__)

SUFFIX_RE = re.compile(r"^[A-Za-z0-9_-]{1,40}$")


def _refuse(error: CitadelError, *, actor: Actor, action: str, target_type: str, target_id: str, request,
            details: dict | None = None):
    """Audit a refused request (denied by policy, or invalid) and raise its error."""
    outcome = "denied" if isinstance(error, ResidencyDenied) else "failure"
    audit_record(actor=actor, action=action, outcome=outcome, target_type=target_type, target_id=target_id[:200],
                 request=request, details={**(details or {}), "error": error.code, "param": error.param,
                                           "message": error.message[:1000]})
    error.audited = True
    raise error


def _event(job: FineTuningJob, message: str, *, level: str = "info", type: str = "message",
           data: dict | None = None) -> FineTuningEvent:
    return FineTuningEvent.objects.create(job=job, level=level, type=type, message=message, data=data)


# -- files --------------------------------------------------------------------------------------

def _validation_base(model_name: str | None) -> Model:
    """The base model whose tokenizer counts an upload's tokens: the one named, else the first
    deployed checkpoint (uploads do not say which model they are for)."""
    from citadel.registry.selectors import models_deployed

    if model_name:
        model = Model.objects.filter(name=model_name, base__isnull=True).first()
        if model is None:
            raise InvalidRequest(f"model '{model_name}' is not a registered base model to validate the file "
                                 "against.", param="model", code="model_not_available")
        return model
    model = models_deployed().filter(base__isnull=True).order_by("name").first() \
        or Model.objects.filter(base__isnull=True).order_by("name").first()
    if model is None:
        raise InvalidRequest("No base model is registered, so the file cannot be validated; register one first.",
                             param="file", code="model_not_available")
    return model


def file_upload(*, upload, purpose: str, subject: Subject, actor: Actor, user=None, api_key=None,
                model_name: str | None = None, request=None) -> File:
    """Store an uploaded fine-tuning dataset at a site its policy allows, after validating it.

    `upload` is a Django UploadedFile. Refused (and audited) with a 400 naming `purpose` or `file`
    when it is not a fine-tuning file, too large, or malformed (the first bad lines with their
    numbers), and with a 403 when the residency policy allows storing the data nowhere.
    """
    action = "finetuning.file.upload"
    name = getattr(upload, "name", "") or "upload.jsonl"
    refuse = {"actor": actor, "action": action, "target_type": "file", "target_id": name, "request": request}
    if purpose not in (File.Purpose.FINE_TUNE, File.Purpose.BATCH):
        _refuse(InvalidRequest(f"purpose '{purpose}' is not supported by Citadel: upload fine-tuning datasets with "
                               "purpose 'fine-tune' and batch input files with purpose 'batch'.", param="purpose",
                               code="invalid_purpose"), **refuse)
    batch = purpose == File.Purpose.BATCH
    limit = settings.CITADEL_BATCH_MAX_FILE_BYTES if batch else settings.CITADEL_FINETUNE_MAX_FILE_BYTES
    if upload.size > limit:
        _refuse(InvalidRequest(f"The file is {upload.size:,} bytes, more than the limit of {limit:,} bytes "
                               "(CITADEL_FINETUNE_MAX_FILE_BYTES): split it or ask for a larger quota.",
                               param="file", code="file_too_large"), **refuse, details={"bytes": upload.size})
    try:
        site = storage_site_for(team=subject.team, data_class=subject.data_class)
    except ResidencyDenied as error:
        _refuse(error, **refuse, details={"team": subject.team_name, "data_class": subject.data_class.name})
    base = None if batch else _validation_base(model_name)
    file_id = uuid.uuid4()
    folder = training.storage_dir(site) / "files"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"file-{file_id.hex}.jsonl"
    digest = hashlib.sha256()
    with path.open("wb") as out:
        for chunk in upload.chunks():
            digest.update(chunk)
            out.write(chunk)
    try:
        if batch:  # its lines are checked one by one when a batch is created from it (citadel.batches)
            return _file_create(file_id=file_id, path=path, name=name, size=upload.size, sha256=digest.hexdigest(),
                                site=site, subject=subject, user=user, api_key=api_key, base=None, report={},
                                actor=actor, request=request, purpose=purpose)
        report = training.dataset_validate(path=path, base_path=base.path, param="file")
        problem = training.report_problem(report, what=f"file '{name}'")
        if problem:
            _refuse(InvalidRequest(problem, param="file", code="invalid_file"), **refuse,
                    details={"errors": report.errors[:20], "error_count": report.error_count})
        return _file_create(file_id=file_id, path=path, name=name, size=upload.size, sha256=digest.hexdigest(),
                            site=site, subject=subject, user=user, api_key=api_key, base=base,
                            report=report.to_dict(), actor=actor, request=request)
    except BaseException:
        path.unlink(missing_ok=True)  # nothing refused or unaudited stays on disk
        raise


@transaction.atomic
def _file_create(*, file_id, path: Path, name: str, size: int, sha256: str, site, subject: Subject, user, api_key,
                 base: Model | None, report: dict, actor: Actor, request,
                 purpose: str = File.Purpose.FINE_TUNE) -> File:
    file = File.objects.create(id=file_id, purpose=purpose, filename=name[:255], bytes=size,
                               sha256=sha256, site=site, path=str(path), data_class=subject.data_class,
                               team=subject.team, user=user, api_key=api_key,
                               validated_with=base.name if base else "", report=report)
    audit_record(actor=actor, action="finetuning.file.upload", outcome="success", target_type="file",
                 target_id=file.openai_id, request=request,
                 details={"filename": file.filename, "purpose": purpose, "bytes": size, "sha256": sha256,
                          "site": site.name,
                          "jurisdiction": site.jurisdiction, "team": subject.team_name,
                          "data_class": subject.data_class.name, "examples": report.get("examples"),
                          "total_tokens": report.get("total_tokens")})
    return file


@transaction.atomic
def file_delete(*, file: File, actor: Actor, request=None) -> File:
    """Remove a file's bytes; the row stays (deleted) for the jobs and audit records naming it.
    Refused while a queued or running job still needs it."""
    file = File.objects.select_for_update().get(pk=file.pk)
    busy = FineTuningJob.objects.filter(training_file=file).exclude(status__in=FineTuningJob.TERMINAL) \
        | FineTuningJob.objects.filter(validation_file=file).exclude(status__in=FineTuningJob.TERMINAL)
    if busy.exists():
        raise InvalidRequest(f"File {file.openai_id} is used by fine-tuning job {busy.first().openai_id}, which has "
                             "not finished; cancel the job first.", param="file_id", code="file_in_use")
    file.deleted_at = timezone.now()
    file.save(update_fields=["deleted_at"])
    audit_record(actor=actor, action="finetuning.file.delete", outcome="success", target_type="file",
                 target_id=file.openai_id, request=request, details={"site": file.site.name, "path": file.path})
    transaction.on_commit(lambda: Path(file.path).unlink(missing_ok=True))
    return file


# -- jobs: creation and cancel (web) --------------------------------------------------------------

def _usable_file(file: File | None, *, param: str, file_id: str) -> File:
    if file is None or file.deleted_at is not None:
        raise InvalidRequest(f"{param} '{file_id}' is not a file you uploaded (or it was deleted). Upload it with "
                             "POST /v1/files (purpose 'fine-tune').", param=param, code="invalid_file")
    if file.purpose != File.Purpose.FINE_TUNE:
        raise InvalidRequest(f"{param} '{file_id}' has purpose '{file.purpose}', not 'fine-tune'.", param=param,
                             code="invalid_file")
    return file


def _more_sensitive(a: DataClass, b: DataClass) -> DataClass:
    return a if a.rank >= b.rank else b


def _check_quota(*, tokens: int, subject: Subject) -> None:
    """Per-job and per-team (30 days) limits on trained tokens, before the job exists."""
    job_limit = settings.CITADEL_FINETUNE_MAX_JOB_TOKENS
    if job_limit and tokens > job_limit:
        raise InvalidRequest(f"The job would train on {tokens:,} tokens (file tokens x epochs), more than the "
                             f"limit of {job_limit:,} per job (CITADEL_FINETUNE_MAX_JOB_TOKENS): use a smaller "
                             "file or fewer epochs.", param="training_file", code="quota_exceeded")
    team_limit = settings.CITADEL_FINETUNE_TEAM_TOKENS_30D
    if team_limit:
        since = timezone.now() - timedelta(days=30)
        used = FineTuningJob.objects.filter(team=subject.team, created_at__gte=since).exclude(
            status=FineTuningJob.Status.FAILED, started_at__isnull=True).aggregate(n=Sum("estimated_tokens"))["n"] or 0
        if used + tokens > team_limit:
            who = f"team '{subject.team_name}'" if subject.team else "keys without a team"
            raise InvalidRequest(f"The job would train on {tokens:,} tokens, but {who} has used {used:,} of its "
                                 f"{team_limit:,} tokens in the last 30 days (CITADEL_FINETUNE_TEAM_TOKENS_30D).",
                                 param="training_file", code="quota_exceeded")


def job_create(*, model_name: str, training_file_id: str, subject: Subject, actor: Actor,
               validation_file_id: str | None = None, hyperparameters: dict | None = None,
               method: dict | None = None, citadel: dict | None = None, suffix: str | None = None,
               seed: int | None = None, metadata: dict | None = None, user=None, api_key=None,
               request=None) -> FineTuningJob:
    """Validate a fine-tuning request completely, then record the job and send it to an allowed pool.

    Refused with a 400 naming the field (unknown base model, file missing or malformed, bad
    hyperparameter, over quota) or a 403 when the residency policy does not allow fine-tuning on
    this data on any pool serving the base model; each refusal is audited and no job row is left.
    """
    from citadel.finetuning.selectors import file_get_for_subject

    refuse = {"actor": actor, "action": "finetuning.job.create", "target_type": "model",
              "target_id": str(model_name or ""), "request": request}
    try:
        base = Model.objects.filter(name=model_name or "").first()
        if base is None or base.base_id:
            why = "is a fine-tuned model; fine-tune its base model instead" if base else "is not a registered model"
            raise InvalidRequest(f"model '{model_name}' {why}. List the models at GET /v1/models.",
                                 param="model", code="model_not_available")
        if suffix is not None and suffix != "" and not SUFFIX_RE.match(suffix):
            raise InvalidRequest("suffix must be 1 to 40 letters, digits, '-' or '_'.", param="suffix",
                                 code="invalid_suffix")
        if metadata is not None and not isinstance(metadata, dict):
            raise InvalidRequest("metadata must be an object of strings.", param="metadata")
        train_file = _usable_file(file_get_for_subject(file_id=training_file_id, user=user, subject=subject),
                                  param="training_file", file_id=training_file_id)
        valid_file = None
        if validation_file_id:
            valid_file = _usable_file(file_get_for_subject(file_id=validation_file_id, user=user, subject=subject),
                                      param="validation_file", file_id=validation_file_id)
        resolved = training.job_config(hyperparameters=hyperparameters, method=method, citadel=citadel, seed=seed)
        report = training.dataset_validate(path=Path(train_file.path), base_path=base.path, config=resolved.config,
                                           param="training_file")
        problem = training.report_problem(report, what=f"training_file '{training_file_id}'")
        if problem:
            raise InvalidRequest(problem, param="training_file", code="invalid_file")
        if valid_file is not None:
            valid_report = training.dataset_validate(path=Path(valid_file.path), base_path=base.path,
                                                     config=resolved.config, param="validation_file")
            problem = training.report_problem(valid_report, what=f"validation_file '{validation_file_id}'")
            if problem:
                raise InvalidRequest(problem, param="validation_file", code="invalid_file")
        tokens = report.total_tokens * resolved.config.epochs
        _check_quota(tokens=tokens, subject=subject)
        quota_gpu_hours_admit(api_key=api_key, team=subject.team)  # citadel.quotas: GPU-hours this month
    except CitadelError as error:
        _refuse(error, **refuse)
    data_class = _more_sensitive(subject.data_class, train_file.data_class)
    if valid_file is not None:
        data_class = _more_sensitive(data_class, valid_file.data_class)
    decision = decide(team=subject.team, data_class=data_class, model=base, purpose="fine_tuning")
    residency = {**decision.details(), "key_data_class": subject.key_class.name}
    if not decision.allowed:
        _refuse(ResidencyDenied(decision.reason), **refuse, details={"residency": residency})
    with transaction.atomic():
        job = FineTuningJob(
            model=base, training_file=train_file, validation_file=valid_file, suffix=suffix or "",
            seed=resolved.seed, hyperparameters=resolved.hyperparameters, config=resolved.config.to_dict(),
            metadata=metadata, team=subject.team, data_class=data_class, user=user, api_key=api_key,
            request_id=getattr(request, "request_id", ""), pool=decision.pool, site=decision.pool.site,
            estimated_tokens=tokens, status=FineTuningJob.Status.QUEUED)
        job.output_dir = str(training.storage_dir(train_file.site) / "jobs" / job.openai_id)
        job.save()
        estimate = f", about {report.estimated_seconds:.0f} s of training" if report.estimated_seconds else ""
        _event(job, f"Validated the training file: {report.examples} examples, {report.total_tokens:,} tokens "
                    f"per epoch{estimate}.", data={"report": report.to_dict()})
        if report.too_long_count:
            _event(job, f"{report.too_long_count} examples are longer than max_seq_len {report.max_seq_len} and are "
                        "left out of training.", level="warn")
        _event(job, f"Fine-tuning job queued on pool '{decision.pool.name}' at site '{decision.pool.site.name}'.")
        audit_record(actor=actor, action="finetuning.job.create", outcome="success", target_type="fine_tuning_job",
                     target_id=job.openai_id, request=request,
                     details={"model": base.name, "training_file": train_file.openai_id,
                              "validation_file": valid_file.openai_id if valid_file else None,
                              "config": job.config, "estimated_tokens": tokens, "residency": residency})
        transaction.on_commit(lambda: _publish(job))
    return job


def _publish(job: FineTuningJob) -> None:
    """Send the job id to its pool's queue. A broker failure leaves the job queued: beat sends it
    again (jobs_recover), so the client's request still succeeds."""
    from citadel.finetuning.tasks import run_job

    try:
        run_job.apply_async(args=[str(job.id)], queue=job.pool.queue)
    except Exception:  # the broker is down or refused the message
        logger.exception("could not publish fine-tuning job %s; beat will send it again", job.id)
        return
    FineTuningJob.objects.filter(pk=job.pk).update(dispatch_count=F("dispatch_count") + 1,
                                                   dispatched_at=timezone.now())


@transaction.atomic
def job_cancel(*, job: FineTuningJob, actor: Actor, request=None) -> FineTuningJob:
    """Cancel a job that has not finished. A queued one never starts; a running one's worker sees
    the cancel within a second (the trainer's should_stop) and stops, confirming with an event."""
    job = FineTuningJob.objects.select_for_update().get(pk=job.pk)
    if job.is_terminal:
        raise InvalidRequest(f"Job {job.openai_id} has already {job.status}; only queued or running jobs can be "
                             "cancelled.", param="fine_tuning_job_id", code="job_not_cancellable")
    was = job.status
    job.status, job.finished_at = FineTuningJob.Status.CANCELLED, timezone.now()
    job.estimated_finish = None
    if was != FineTuningJob.Status.RUNNING:
        job.stopped_at = job.finished_at
    job.save(update_fields=["status", "finished_at", "estimated_finish", "stopped_at"])
    _event(job, "Job cancelled" + (f"; stopping training at step {job.step}." if was == "running" else "."))
    audit_record(actor=actor, action="finetuning.job.cancel", outcome="success", target_type="fine_tuning_job",
                 target_id=job.openai_id, request=request, details={"status_before": was, "step": job.step})
    return job


# -- jobs: worker side ------------------------------------------------------------------------------

@transaction.atomic
def job_claim(*, job_id, worker_name: str, pid: int | None = None) -> FineTuningJob | None:
    """Move a queued job to running on this worker (process `pid`, default this one); None when it is
    not queued any more (finished, cancelled, or running elsewhere), so a redelivered or duplicate
    message does no harm."""
    job = (FineTuningJob.objects.select_for_update(of=("self",))
           .select_related("model", "training_file", "validation_file", "pool", "team", "data_class")
           .filter(pk=job_id).first())
    if job is None or job.status != FineTuningJob.Status.QUEUED:
        return None
    # The policy may have changed since the job was queued: it runs only where it allows now.
    decision = decide(team=job.team, data_class=job.data_class, model=job.model, purpose="fine_tuning")
    if not decision.allowed or job.pool_id not in {pool.pk for pool in decision.pools}:
        why = decision.reason if not decision.allowed else (
            f"Pool '{job.pool.name}' is no longer among the pools its residency policy allows.")
        job_fail(job_id=job.id, code="residency_denied", message=f"Not started: {why}",
                 actor=Actor.system(worker_name))
        return None
    now = timezone.now()
    job.status, job.worker_name, job.attempts = FineTuningJob.Status.RUNNING, worker_name, job.attempts + 1
    job.worker_pid = pid if pid is not None else os.getpid()
    job.started_at, job.last_progress_at = job.started_at or now, now
    job.save(update_fields=["status", "worker_name", "worker_pid", "attempts", "started_at", "last_progress_at"])
    checkpoint = job.checkpoints.order_by("-step").first()
    if checkpoint is not None:
        message = f"Resuming from the checkpoint at step {checkpoint.step} on worker {worker_name} " \
                  f"(attempt {job.attempts})."
    else:
        message = f"Fine-tuning started on worker {worker_name}" + \
                  (f" (attempt {job.attempts})." if job.attempts > 1 else ".")
    _event(job, message)
    audit_record(actor=Actor.system(worker_name), action="finetuning.job.start", outcome="success",
                 target_type="fine_tuning_job", target_id=job.openai_id, request_id=job.request_id,
                 details={"attempt": job.attempts, "resume_step": checkpoint.step if checkpoint else None,
                          "pool": job.pool.name if job.pool_id else None})
    return job


def job_queue(*, job_id) -> str | None:
    """The pool queue of a job still waiting for a worker; None once it started or ended."""
    job = FineTuningJob.objects.filter(pk=job_id, status=FineTuningJob.Status.QUEUED).select_related("pool").first()
    return job.pool.queue if job is not None and job.pool_id else None


def job_owned_by(*, job_id, worker_name: str) -> bool:
    """Is the job still running on this worker? False once cancelled, failed, or handed to another
    worker after this one was thought dead: the trainer then stops."""
    return FineTuningJob.objects.filter(pk=job_id, status=FineTuningJob.Status.RUNNING,
                                        worker_name=worker_name).exists()


@transaction.atomic
def job_progress(*, job_id, worker_name: str, event: dict) -> bool:
    """Record one event of finetune.train (metrics, eval, checkpoint, message) as it happens.

    Returns False when the job is no longer this worker's (see job_owned_by), so the caller stops.
    The row update and the event row commit together, so a cancel (which locks the row) is ordered
    before or after both: no step is logged after its job's cancel event.
    """
    kind = event.get("type")
    now = timezone.now()
    mine = FineTuningJob.objects.filter(pk=job_id, status=FineTuningJob.Status.RUNNING, worker_name=worker_name)
    if kind == "metrics":
        eta = event.get("eta_seconds")
        updated = mine.update(step=event.get("step") or 0, total_steps=event.get("total_steps"),
                              train_loss=event.get("loss"), last_progress_at=now,
                              estimated_finish=now + timedelta(seconds=eta) if eta is not None else None)
        if updated:
            data = {"step": event.get("step"), "total_steps": event.get("total_steps"), "epoch": event.get("epoch"),
                    "train_loss": event.get("loss"), "learning_rate": event.get("learning_rate"),
                    "tokens_per_second": event.get("tokens_per_second"), "eta_seconds": eta}
            FineTuningEvent.objects.create(job_id=job_id, type=FineTuningEvent.Type.METRICS, data=data,
                                           message=_metrics_message(data))
        return bool(updated)
    if kind == "eval":
        updated = mine.update(valid_loss=event.get("valid_loss"), last_progress_at=now)
        if updated:
            data = {"step": event.get("step"), "valid_loss": event.get("valid_loss")}
            FineTuningEvent.objects.create(job_id=job_id, type=FineTuningEvent.Type.METRICS, data=data,
                                           message=f"Step {data['step']}: validation loss={_num(data['valid_loss'])}")
        return bool(updated)
    if kind == "checkpoint":
        return job_checkpoint_record(job_id=job_id, worker_name=worker_name, step=int(event.get("step") or 0),
                                     path=str(event.get("path") or ""))
    if not mine.update(last_progress_at=now):
        return False
    level = {"warning": "warn", "warn": "warn", "error": "error"}.get(str(event.get("level", "info")), "info")
    FineTuningEvent.objects.create(job_id=job_id, level=level, message=str(event.get("text") or event)[:5000])
    return True


def _num(value) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "n/a"


def _metrics_message(data: dict) -> str:
    parts = [f"Step {data['step']}/{data['total_steps']}: training loss={_num(data['train_loss'])}"]
    if data.get("learning_rate") is not None:
        parts.append(f"learning rate={data['learning_rate']:.3g}")
    if data.get("tokens_per_second") is not None:
        parts.append(f"{data['tokens_per_second']:.0f} tokens/s")
    if data.get("eta_seconds") is not None:
        parts.append(f"ETA {data['eta_seconds']:.0f} s")
    return ", ".join(parts)


@transaction.atomic
def job_checkpoint_record(*, job_id, worker_name: str, step: int, path: str) -> bool:
    """A checkpoint row (once per step, also when a resumed run writes it again) and its audit record."""
    job = FineTuningJob.objects.select_for_update(of=("self",)).filter(
        pk=job_id, status=FineTuningJob.Status.RUNNING, worker_name=worker_name).first()
    if job is None:
        return False
    checkpoint, created = FineTuningCheckpoint.objects.get_or_create(
        job=job, step=step, defaults={"path": path, "metrics": {"step": step, "train_loss": job.train_loss,
                                                                "valid_loss": job.valid_loss}})
    if created:
        _event(job, f"Checkpoint saved at step {step}.", data={"step": step, "checkpoint": checkpoint.openai_id})
        audit_record(actor=Actor.system(worker_name), action="finetuning.checkpoint.create", outcome="success",
                     target_type="fine_tuning_job", target_id=job.openai_id, request_id=job.request_id,
                     details={"checkpoint": checkpoint.openai_id, "step": step, "path": path})
    return True


def fine_tuned_model_name(job: FineTuningJob) -> str:
    """OpenAI's shape, `ft:<base>:<suffix>:<id>` (an empty suffix leaves `::`, as OpenAI's do)."""
    return f"ft:{job.model.name}:{job.suffix}:{job.id.hex[:10]}"


@transaction.atomic
def job_succeed(*, job_id, worker_name: str, result) -> FineTuningJob | None:
    """Register the adapter as a variant of the base model and finish the job; None (nothing done)
    when the job stopped being this worker's meanwhile (cancelled, or handed on)."""
    job = FineTuningJob.objects.select_for_update(of=("self",)).select_related("model").filter(
        pk=job_id, status=FineTuningJob.Status.RUNNING, worker_name=worker_name).first()
    if job is None:
        return None
    actor = Actor.system(worker_name)
    variant = model_variant_register(base=job.model, name=fine_tuned_model_name(job),
                                     adapter_path=str(result.adapter_dir), actor=actor,
                                     description=f"LoRA adapter trained by fine-tuning job {job.openai_id}.")
    now = timezone.now()
    job.status, job.fine_tuned_model, job.finished_at = FineTuningJob.Status.SUCCEEDED, variant, now
    job.trained_tokens, job.step, job.estimated_finish = result.trained_tokens, result.steps, None
    job.train_loss = result.train_loss if result.train_loss is not None else job.train_loss
    job.valid_loss = result.valid_loss if result.valid_loss is not None else job.valid_loss
    job.save(update_fields=["status", "fine_tuned_model", "finished_at", "trained_tokens", "step",
                            "estimated_finish", "train_loss", "valid_loss"])
    job.result_file = _results_file(job)
    job.save(update_fields=["result_file"])
    _event(job, f"New fine-tuned model created: {variant.name}")
    _event(job, "The job has successfully completed.")
    audit_record(actor=actor, action="finetuning.job.complete", outcome="success", target_type="fine_tuning_job",
                 target_id=job.openai_id, request_id=job.request_id,
                 details={"fine_tuned_model": variant.name, "adapter_path": str(result.adapter_dir),
                          "result_file": job.result_file.openai_id,
                          "steps": result.steps, "trained_tokens": result.trained_tokens,
                          "train_loss": result.train_loss, "valid_loss": result.valid_loss})
    return job


RESULT_COLUMNS = ("step", "train_loss", "valid_loss", "learning_rate", "tokens_per_second")


def _results_file(job: FineTuningJob) -> File:
    """The job's metrics, one CSV row per event (OpenAI's result file), stored beside its training
    file (same site, owner and data class) and listed with purpose fine-tune-results."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(RESULT_COLUMNS)
    for data in FineTuningEvent.objects.filter(job=job, type=FineTuningEvent.Type.METRICS).order_by("id") \
            .values_list("data", flat=True):
        writer.writerow(["" if (data or {}).get(c) is None else data[c] for c in RESULT_COLUMNS])
    content = out.getvalue().encode()
    path = Path(job.output_dir) / "results.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    source = job.training_file
    return File.objects.create(purpose=File.Purpose.FINE_TUNE_RESULTS, filename=f"{job.openai_id}-results.csv",
                               bytes=len(content), sha256=hashlib.sha256(content).hexdigest(), site=source.site,
                               path=str(path), data_class=job.data_class, team=job.team, user=job.user,
                               api_key=job.api_key)


@transaction.atomic
def job_release(*, job_id, worker_name: str, step: int) -> bool:
    """Hand a running job back to the queue because its worker is shutting down (a deploy, a
    restart): it resumes from its last checkpoint on the next worker, and the attempt does not
    count against CITADEL_FINETUNE_MAX_ATTEMPTS, since nothing failed."""
    job = FineTuningJob.objects.select_for_update(of=("self",)).select_related("pool").filter(
        pk=job_id, status=FineTuningJob.Status.RUNNING, worker_name=worker_name).first()
    if job is None:
        return False
    checkpoint = job.checkpoints.order_by("-step").first()
    resume = f"step {checkpoint.step}" if checkpoint else "the start (no checkpoint yet)"
    job.status, job.worker_name, job.estimated_finish = FineTuningJob.Status.QUEUED, "", None
    job.attempts = max(0, job.attempts - 1)
    job.save(update_fields=["status", "worker_name", "estimated_finish", "attempts"])
    _event(job, f"Worker {worker_name} is shutting down at step {step}; the job goes back to the queue and "
                f"resumes from {resume}.", level="warn")
    audit_record(actor=Actor.system(worker_name), action="finetuning.job.requeue", outcome="success",
                 target_type="fine_tuning_job", target_id=job.openai_id, request_id=job.request_id,
                 details={"reason": "worker shutting down", "worker": worker_name, "step": step,
                          "resume_step": checkpoint.step if checkpoint else None})
    transaction.on_commit(lambda: _publish(job))
    return True


@transaction.atomic
def job_fail(*, job_id, code: str, message: str, actor: Actor, param: str = "") -> bool:
    """Fail a job that has not finished; False when it already had."""
    job = FineTuningJob.objects.select_for_update(of=("self",)).filter(pk=job_id).first()
    if job is None or job.is_terminal:
        return False
    job.status, job.finished_at, job.estimated_finish = FineTuningJob.Status.FAILED, timezone.now(), None
    job.error_code, job.error_message, job.error_param = code, message[:5000], param
    job.save(update_fields=["status", "finished_at", "estimated_finish", "error_code", "error_message",
                            "error_param"])
    _event(job, f"Fine-tuning failed: {message}", level="error", data={"code": code})
    audit_record(actor=actor, action="finetuning.job.complete", outcome="failure", target_type="fine_tuning_job",
                 target_id=job.openai_id, request_id=job.request_id,
                 details={"error_code": code, "error": message[:1000], "step": job.step, "attempts": job.attempts})
    return True


@transaction.atomic
def job_stopped(*, job_id, worker_name: str, step: int) -> None:
    """The worker confirms that training of a cancelled job stopped."""
    job = FineTuningJob.objects.select_for_update(of=("self",)).filter(
        pk=job_id, status=FineTuningJob.Status.CANCELLED, worker_name=worker_name, stopped_at__isnull=True).first()
    if job is None:
        return
    job.stopped_at = timezone.now()
    job.save(update_fields=["stopped_at"])
    _event(job, f"Training stopped at step {step} after the cancel.")
    audit_record(actor=Actor.system(worker_name), action="finetuning.job.stopped", outcome="success",
                 target_type="fine_tuning_job", target_id=job.openai_id, request_id=job.request_id,
                 details={"step": step})


# -- recovery (beat) --------------------------------------------------------------------------------

def _requeue(job: FineTuningJob, *, why: str) -> str | None:
    """Put a running job whose worker is gone back in the queue (it resumes from its newest
    checkpoint), or fail it when it has used its attempts or its policy no longer allows it."""
    actor = Actor.system("finetuning-recovery")
    max_attempts = settings.CITADEL_FINETUNE_MAX_ATTEMPTS
    checkpoint = job.checkpoints.order_by("-step").first()
    resume = f"step {checkpoint.step}" if checkpoint else "the start (no checkpoint yet)"
    if job.attempts >= max_attempts:
        job_fail(job_id=job.id, code="worker_lost", actor=actor,
                 message=f"{why} The job has run on {job.attempts} workers, the limit "
                         f"(CITADEL_FINETUNE_MAX_ATTEMPTS={max_attempts}); its last checkpoint is at {resume}.")
        return "failed"
    decision = decide(team=job.team, data_class=job.data_class, model=job.model, purpose="fine_tuning")
    if not decision.allowed:
        job_fail(job_id=job.id, code="residency_denied", actor=actor,
                 message=f"{why} It cannot be resumed: {decision.reason}")
        return "failed"
    with transaction.atomic():
        locked = FineTuningJob.objects.select_for_update().filter(pk=job.pk, status=FineTuningJob.Status.RUNNING,
                                                                  worker_name=job.worker_name).first()
        if locked is None:
            return None
        locked.status, locked.worker_name = FineTuningJob.Status.QUEUED, ""
        locked.pool, locked.site, locked.estimated_finish = decision.pool, decision.pool.site, None
        locked.save(update_fields=["status", "worker_name", "pool", "site", "estimated_finish"])
        _event(locked, f"{why} Resuming from {resume} on pool '{decision.pool.name}' "
                       f"(attempt {locked.attempts + 1} of {max_attempts}).", level="warn")
        audit_record(actor=actor, action="finetuning.job.requeue", outcome="success", target_type="fine_tuning_job",
                     target_id=locked.openai_id, request_id=locked.request_id,
                     details={"reason": why, "worker": job.worker_name, "resume_step": checkpoint.step
                              if checkpoint else None, "attempts": locked.attempts, "pool": decision.pool.name,
                              "residency": decision.details()})
        transaction.on_commit(lambda: _publish(locked))
    return "requeued"


def _worker_gone(job: FineTuningJob) -> str | None:
    """Why the process that ran `job` is gone, or None while it lives: its heartbeat stopped, or a
    worker of the same name restarted (another pid) and so is not running it any more."""
    from citadel.registry.selectors import workers_live

    worker = workers_live().filter(name=job.worker_name).first()
    if worker is None:
        return f"Worker {job.worker_name} stopped responding while training (step {job.step})."
    if job.worker_pid is not None and worker.pid is not None and worker.pid != job.worker_pid:
        return (f"Worker {job.worker_name} restarted (process {job.worker_pid} is gone, {worker.pid} runs now) "
                f"while training (step {job.step}).")
    return None


def jobs_recover(*, resend_after: timedelta | None = None) -> dict:
    """Beat's sweep, so that no job is left running or queued for ever without anyone working on it.

    - running, but its worker stopped heartbeating (killed, host down): back to queued, to resume
      from its last checkpoint on a live worker of a pool its policy allows; failed with the reason
      after CITADEL_FINETUNE_MAX_ATTEMPTS workers;
    - running past CITADEL_FINETUNE_TIME_LIMIT_SECONDS (a trainer that hangs): failed;
    - queued, sent long ago, and a live worker now serves an allowed pool: sent again (the message
      may have been lost; a duplicate is harmless, job_claim runs a job once).
    """
    stale = timedelta(seconds=settings.CITADEL_WORKER_STALE_SECONDS)
    now = timezone.now()
    counts = {"requeued": 0, "failed": 0, "resent": 0}
    running = FineTuningJob.objects.filter(status=FineTuningJob.Status.RUNNING).select_related(
        "model", "team", "data_class")
    for job in running:
        if job.started_at and now - job.started_at > timedelta(seconds=settings.CITADEL_FINETUNE_TIME_LIMIT_SECONDS):
            counts["failed"] += job_fail(job_id=job.id, code="timeout", actor=Actor.system("finetuning-recovery"),
                                         message="The job ran past its time limit (CITADEL_FINETUNE_TIME_LIMIT_SECONDS).")
            continue
        if job.last_progress_at and now - job.last_progress_at < stale:
            continue  # recent progress: its worker is alive even if its heartbeat row lags
        why = _worker_gone(job)
        if why:
            outcome = _requeue(job, why=why)
            if outcome:
                counts[outcome] += 1
    cutoff = now - (resend_after or timedelta(seconds=60))
    queued = FineTuningJob.objects.filter(status=FineTuningJob.Status.QUEUED).select_related(
        "model", "team", "data_class", "pool").exclude(dispatched_at__gte=cutoff)
    for job in queued:
        decision = decide(team=job.team, data_class=job.data_class, model=job.model, purpose="fine_tuning")
        if not decision.allowed:
            counts["failed"] += job_fail(job_id=job.id, code="residency_denied", message=decision.reason,
                                         actor=Actor.system("finetuning-recovery"))
            continue
        if not workers_live(pool=decision.pool).exists():
            continue  # nobody to send it to yet; it waits queued, visibly
        if decision.pool.pk != job.pool_id:
            FineTuningJob.objects.filter(pk=job.pk).update(pool=decision.pool, site=decision.pool.site)
            job.pool = decision.pool
        _publish(job)
        counts["resent"] += 1
    return counts

