"""Reads for fine-tuning: whose files and jobs a caller sees, lookups by OpenAI id, cursor pages,
and a job's events, checkpoints and loss curve (for the API and the console).

Who sees what: an API key of a team sees its team's files and jobs; a key without a team sees
its user's own (made without a team); a signed-in user sees what citadel.accounts.permissions.scope
allows (their teams' and their own team-less ones; platform administrators all). Lookups outside
that answer 404, as if the object did not exist. A fine-tuned model is usable only by those who
can see the job that trained it: its adapter learned from their data.
"""

import uuid
from dataclasses import dataclass

from django.db.models import Q, QuerySet

from citadel.accounts.permissions import scope
from citadel.core.exceptions import InvalidRequest, NotFound
from citadel.core.lookups import row_by_pk
from citadel.finetuning.models import File, FineTuningCheckpoint, FineTuningEvent, FineTuningJob

MAX_PAGE = 10_000


@dataclass(frozen=True)
class Page:
    items: list
    has_more: bool


def _scope(queryset: QuerySet, request) -> QuerySet:
    api_key = getattr(request, "auth", None)
    if api_key is not None and hasattr(api_key, "prefix"):
        if api_key.team_id:
            return queryset.filter(team_id=api_key.team_id)
        return queryset.filter(user=api_key.user, team__isnull=True)
    return scope(request.user, queryset)  # a signed-in user: the access module's team rule


def files_visible(*, request) -> QuerySet[File]:
    """Fine-tuning files the caller may see (deleted ones are gone for the API)."""
    return _scope(File.objects.filter(deleted_at__isnull=True).select_related("site", "data_class", "team"), request)


def jobs_visible(*, request) -> QuerySet[FineTuningJob]:
    return _scope(FineTuningJob.objects.select_related("model", "training_file", "validation_file",
                                                        "fine_tuned_model", "pool", "site", "team"), request)


def fine_tuned_models_hidden(*, request) -> set[str]:
    """Names of fine-tuned models the caller may not use: those trained by jobs they cannot see.
    (A variant registered without a job, by an administrator, is open like any model.)"""
    made = FineTuningJob.objects.filter(fine_tuned_model__isnull=False)
    visible = jobs_visible(request=request).filter(fine_tuned_model__isnull=False).values("pk")
    return set(made.exclude(pk__in=visible).values_list("fine_tuned_model__name", flat=True))


def fine_tuned_model_usable(*, request, name: str) -> bool:
    made = FineTuningJob.objects.filter(fine_tuned_model__name=name)
    return not made.exists() or jobs_visible(request=request).filter(fine_tuned_model__name=name).exists()


def parse_id(value: str, prefix: str, *, what: str, param: str) -> uuid.UUID:
    """The primary key inside an OpenAI id like `file-<hex>`; an unknown one is a 404."""
    text = str(value or "")
    try:
        if not text.startswith(f"{prefix}-"):
            raise ValueError
        return uuid.UUID(hex=text[len(prefix) + 1:])
    except ValueError:
        raise NotFound(f"No {what} with id '{text}'.", param=param) from None


def file_get(*, request, file_id: str) -> File:
    pk = parse_id(file_id, "file", what="file", param="file_id")
    file = row_by_pk(files_visible(request=request), pk)
    if file is None:
        raise NotFound(f"No file with id '{file_id}'.", param="file_id")
    return file


def file_get_for_subject(*, file_id: str, user, subject) -> File | None:
    """A file the job's creator may train on: their team's (a team key) or their own; None otherwise."""
    try:
        pk = parse_id(file_id, "file", what="file", param="training_file")
    except NotFound:
        return None
    files = File.objects.filter(pk=pk).select_related("site", "data_class")
    if subject.team is not None:
        return files.filter(team=subject.team).first()
    return files.filter(user=user, team__isnull=True).first()


def job_get(*, request, job_id: str) -> FineTuningJob:
    pk = parse_id(job_id, "ftjob", what="fine-tuning job", param="fine_tuning_job_id")
    job = row_by_pk(jobs_visible(request=request), pk)
    if job is None:
        raise NotFound(f"No fine-tuning job with id '{job_id}'.", param="fine_tuning_job_id")
    return job


def _limit(limit, default: int) -> int:
    if limit in (None, ""):
        return default
    try:
        value = int(limit)
    except (TypeError, ValueError):
        raise InvalidRequest(f"limit must be a whole number from 1 to {MAX_PAGE}.", param="limit") from None
    if not 1 <= value <= MAX_PAGE:
        raise InvalidRequest(f"limit must be a whole number from 1 to {MAX_PAGE}.", param="limit")
    return value


def _page(queryset: QuerySet, limit: int) -> Page:
    items = list(queryset[: limit + 1])
    return Page(items=items[:limit], has_more=len(items) > limit)


def _after_created(queryset: QuerySet, model, after: str | None, prefix: str, *, newest_first: bool = True):
    """Rows after the one with OpenAI id `after` in (created_at, id) order."""
    if not after:
        return queryset
    pk = parse_id(after, prefix, what="object", param="after")
    anchor = model.objects.filter(pk=pk).values("created_at", "id").first()
    if anchor is None:
        raise InvalidRequest(f"after: no object with id '{after}'.", param="after")
    if newest_first:
        return queryset.filter(Q(created_at__lt=anchor["created_at"])
                               | Q(created_at=anchor["created_at"], id__lt=anchor["id"]))
    return queryset.filter(Q(created_at__gt=anchor["created_at"])
                           | Q(created_at=anchor["created_at"], id__gt=anchor["id"]))


def files_page(*, request, after: str | None = None, limit=None, order: str = "desc",
               purpose: str | None = None) -> Page:
    if order not in ("asc", "desc"):
        raise InvalidRequest("order must be 'asc' or 'desc'.", param="order")
    files = files_visible(request=request)
    if purpose:
        files = files.filter(purpose=purpose)
    files = files.order_by(*(("-created_at", "-id") if order == "desc" else ("created_at", "id")))
    files = _after_created(files, File, after, "file", newest_first=order == "desc")
    return _page(files, _limit(limit, MAX_PAGE))


def jobs_page(*, request, after: str | None = None, limit=None, metadata: dict | None = None) -> Page:
    """Newest first, like OpenAI's list."""
    jobs = jobs_visible(request=request).order_by("-created_at", "-id")
    for key, value in (metadata or {}).items():
        jobs = jobs.filter(**{f"metadata__{key}": value})
    jobs = _after_created(jobs, FineTuningJob, after, "ftjob")
    return _page(jobs, _limit(limit, 20))


def _after_int(value: str | None, prefix: str) -> int | None:
    if not value:
        return None
    text = str(value)
    if not text.startswith(f"{prefix}-") or not text[len(prefix) + 1:].isdigit():
        raise InvalidRequest(f"after: '{text}' is not an id of the form {prefix}-N.", param="after")
    return int(text[len(prefix) + 1:])


def job_events_page(*, job: FineTuningJob, after: str | None = None, limit=None) -> Page:
    """A job's events newest first; `after` an event id gives the older ones."""
    events = FineTuningEvent.objects.filter(job=job).order_by("-id")
    pk = _after_int(after, "ftevent")
    if pk is not None:
        events = events.filter(id__lt=pk)
    return _page(events, _limit(limit, 20))


def job_checkpoints_page(*, job: FineTuningJob, after: str | None = None, limit=None) -> Page:
    """A job's checkpoints, newest step first."""
    checkpoints = FineTuningCheckpoint.objects.filter(job=job).order_by("-step", "-id")
    pk = _after_int(after, "ftckpt")
    if pk is not None:
        anchor = FineTuningCheckpoint.objects.filter(job=job, pk=pk).values_list("step", flat=True).first()
        if anchor is not None:
            checkpoints = checkpoints.filter(step__lt=anchor)
    return _page(checkpoints, _limit(limit, 10))


def job_loss_curve(*, job: FineTuningJob, after_event_id: int = 0) -> list[dict]:
    """The job's metrics in step order: [{step, train_loss, valid_loss, learning_rate, tokens_per_second,
    event_id}], for a plot. Pass the last event_id seen to get only newer points (live updates)."""
    points = []
    for event_id, data in (FineTuningEvent.objects.filter(job=job, type=FineTuningEvent.Type.METRICS,
                                                          id__gt=after_event_id)
                           .order_by("id").values_list("id", "data")):
        data = data or {}
        points.append({"event_id": event_id, "step": data.get("step"), "train_loss": data.get("train_loss"),
                       "valid_loss": data.get("valid_loss"), "learning_rate": data.get("learning_rate"),
                       "tokens_per_second": data.get("tokens_per_second")})
    return points
