"""Console pages for LoRA fine-tuning: datasets (upload with the validation report), the job form,
and a job's page with its live loss curve, events, checkpoints and cancel.

Thin, like the API views: every write goes through citadel.finetuning.services (which validate,
apply the residency policy and audit), every read through its selectors, scoped to the user's
teams. A refusal is shown next to the field the service names (CitadelError.param).
"""

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.http import Http404
from django.shortcuts import redirect, render, resolve_url
from django.urls import reverse
from django.utils.http import urlencode
from django.views.decorators.http import require_POST
from django_htmx.http import HttpResponseClientRedirect

from citadel.accounts.permissions import USE_ROLES, has_role, role_required
from citadel.audit.services import Actor
from citadel.core.exceptions import CitadelError, NotFound, ServiceUnavailable
from citadel.finetuning import console_selectors as console
from citadel.finetuning import selectors, services
from citadel.finetuning.models import File, FineTuningJob
from citadel.residency.services import request_subject
from frontend.finetuning_form import JobForm
from frontend.loss_chart import loss_chart

LIVE = (FineTuningJob.Status.VALIDATING_FILES, FineTuningJob.Status.QUEUED, FineTuningJob.Status.RUNNING)


def _refusal(error: CitadelError) -> CitadelError:
    """Errors the page shows; a 503 (audit unavailable) goes on to the middleware that answers it."""
    if isinstance(error, ServiceUnavailable):
        raise error
    return error


@login_required
def jobs_page(request):
    return render(request, "frontend/finetuning/jobs.html", {
        "jobs": console.console_jobs(user=request.user)[:100], "can_write": has_role(request.user, USE_ROLES)})


def _datasets_context(request, **extra) -> dict:
    return {"files": console.console_files(user=request.user)[:200], "models": console.finetunable_models(),
            "can_write": has_role(request.user, USE_ROLES), **extra}


@login_required
def datasets_page(request):
    return render(request, "frontend/finetuning/datasets.html", _datasets_context(request))


@require_POST
@role_required(USE_ROLES)
def dataset_upload(request):
    """Store a JSONL dataset and show its validation report; a refused one shows every bad line."""
    upload, model_name = request.FILES.get("file"), request.POST.get("model") or ""
    context = {"model_name": model_name}
    status = 200
    if upload is None:
        context["error"], status = "Choose a JSONL file to upload.", 400
    else:
        try:
            file = services.file_upload(upload=upload, purpose=File.Purpose.FINE_TUNE, model_name=model_name or None,
                                        subject=request_subject(request), actor=Actor.for_request(request),
                                        user=request.user, request=request)
            context.update(uploaded=file, report=file.report, filename=file.filename)
        except CitadelError as error:
            _refusal(error)
            context.update(error=error.message, filename=upload.name)
            if error.code == "invalid_file" and model_name:
                context["report"] = console.upload_report(upload=upload, model_name=model_name)
            status = 400
    template = "frontend/finetuning/_upload_result.html" if request.htmx else "frontend/finetuning/datasets.html"
    # htmx swaps only 2xx answers by default; the refusal is still shown, with its status in the page.
    return render(request, template, _datasets_context(request, **context), status=200 if request.htmx else status)


@role_required(USE_ROLES)
def job_new(request):
    """The job form: base model, files, LoRA settings; the service validates and names the bad field."""
    defaults = console.job_form_defaults()
    form = JobForm(request.POST if request.method == "POST" else None, defaults=defaults["values"])
    if request.method == "GET":
        form.values["training_file"] = request.GET.get("training_file", "")
    if request.method == "POST":
        try:
            job = services.job_create(
                model_name=form.model, training_file_id=form.training_file,
                validation_file_id=form.validation_file or None, citadel=form.settings, suffix=form.suffix or None,
                seed=form.seed, subject=request_subject(request), actor=Actor.for_request(request),
                user=request.user, request=request)
            return redirect("frontend:finetuning-job", job_id=job.openai_id)
        except CitadelError as error:
            form.add_error(_refusal(error))
    files = console.console_files(user=request.user)
    return render(request, "frontend/finetuning/job_form.html", {
        "form": form, "models": console.finetunable_models(), "files": files, **defaults,
    }, status=400 if form.errors else 200)


def _job(request, job_id: str) -> FineTuningJob:
    try:
        return console.console_job_get(user=request.user, job_id=job_id)
    except NotFound as error:
        raise Http404(error.message) from None


def _job_context(request, job: FineTuningJob) -> dict:
    points = selectors.job_loss_curve(job=job)
    return {"job": job, "live": job.status in LIVE, "chart": loss_chart(points), "points": len(points),
            "latest": points[-1] if points else None, "events": console.console_job_events(job=job),
            "checkpoints": console.console_job_checkpoints(job=job),
            "can_write": has_role(request.user, USE_ROLES),
            "playground_url": (f"{reverse('frontend:playground')}?{urlencode({'model': job.fine_tuned_model.name})}"
                               if job.fine_tuned_model_id else None)}


@login_required
def job_page(request, job_id: str):
    job = _job(request, job_id)
    return render(request, "frontend/finetuning/job.html", _job_context(request, job))


def job_live(request, job_id: str):
    """The part of the job page that changes (status, curve, events, checkpoints), polled by htmx
    every 2 s while the job is queued or running; the answer for a finished job stops the polling.
    A poll whose session has ended sends the whole page to the login form, rather than letting htmx
    swap the login form into the middle of the job page."""
    if not request.user.is_authenticated:
        login = f"{resolve_url(settings.LOGIN_URL)}?{urlencode({'next': reverse('frontend:finetuning-job', args=[job_id])})}"
        return HttpResponseClientRedirect(login) if request.htmx else redirect(login)
    job = _job(request, job_id)
    return render(request, "frontend/finetuning/_job_live.html", _job_context(request, job))


@require_POST
@role_required(USE_ROLES)
def job_cancel(request, job_id: str):
    job = _job(request, job_id)
    error = None
    try:
        job = services.job_cancel(job=job, actor=Actor.for_request(request), request=request)
    except CitadelError as failure:
        error = _refusal(failure).message
    if error is None:
        return redirect("frontend:finetuning-job", job_id=job.openai_id)
    context = {**_job_context(request, job), "cancel_error": error}
    return render(request, "frontend/finetuning/job.html", context, status=400)
