"""Console pages. The playground streams through the same job path as /v1/chat/completions,
authenticated by the console session (with CSRF) instead of an API key."""

from django.contrib.auth.decorators import login_required
from django.http import Http404
from django.shortcuts import render
from rest_framework.authentication import SessionAuthentication
from rest_framework.views import APIView

from citadel.accounts.permissions import WRITE_ROLES, is_platform_admin, role_required
from citadel.core.exceptions import CitadelError
from citadel.finetuning.selectors import fine_tuned_model_usable
from citadel.gateway.apis import inference_request
from citadel.gateway.serializers import ChatCompletionInput
from citadel.jobs.models import InferenceJob
from citadel.registry.models import Model
from citadel.registry.selectors import models_deployed
from citadel.residency import services as residency
from citadel.residency.models import DataClass


@role_required(WRITE_ROLES)
def playground(request):
    """Chat with a deployed model or with a fine-tuned adapter the user may use (their teams'), with
    the sampling settings; after each answer the page shows where it ran and under which policy."""
    # ?model= preselects a model, e.g. from a fine-tuning job's page once its adapter is served.
    deployed = list(models_deployed().select_related("base"))
    bases = [model for model in deployed if model.base_id is None]
    adapters = [model for model in deployed
                if model.base_id is not None and fine_tuned_model_usable(request=request, name=model.name)]
    return render(request, "frontend/playground.html", {"bases": bases, "adapters": adapters,
                                                        "selected": request.GET.get("model", "")})


@role_required(WRITE_ROLES)
def playground_job(request, job_id):
    """Where one of the user's playground requests ran: the job row (pool, site, worker, data class,
    prompt retention) and the residency decision its dispatch recorded in the audit log."""
    from citadel.audit.models import AuditRecord

    jobs = InferenceJob.objects.select_related("model", "pool", "site", "data_class", "team")
    if not is_platform_admin(request.user):
        jobs = jobs.filter(user=request.user)
    job = jobs.filter(pk=job_id).first()
    if job is None:
        raise Http404("No such request of yours.")
    record = AuditRecord.objects.filter(details__job=str(job.pk)).order_by("sequence").first()
    decision = (record.details or {}).get("residency", {}) if record else {}
    return render(request, "frontend/_playground_job.html", {"job": job, "decision": decision, "record": record})


class PlaygroundStreamApi(APIView):
    # RoleAccess lets WRITE_ROLES post here (a console path, not /v1): application accounts use API keys.
    authentication_classes = [SessionAuthentication]  # enforces CSRF on this POST
    schema = None

    def post(self, request):
        body = request.data if isinstance(request.data, dict) else {}
        return inference_request(request, ChatCompletionInput, kind=InferenceJob.Kind.CHAT,
                                 data={**body, "stream": True})  # the playground always streams


@login_required
def residency_dry_run(request):
    """Would a request be allowed, and where would it run? The same decision as dispatch and as
    POST /api/v1/residency/dry-run, for the signed-in user; nothing is dispatched."""
    form = {"model": "", "data_class": "", "purpose": "inference"}
    result = error = None
    if request.method == "POST":
        form = {key: request.POST.get(key, default) for key, default in form.items()}
        try:
            if form["purpose"] not in residency.PURPOSES:
                raise CitadelError(f"purpose must be one of {', '.join(residency.PURPOSES)}")
            model = Model.objects.filter(name=form["model"]).first()
            if model is None:
                raise CitadelError(f"There is no model named {form['model']!r}: pick one from the list.")
            result = residency.dry_run(request=request, model=model, requested_class=form["data_class"] or None,
                                       purpose=form["purpose"])
        except CitadelError as failure:
            error = str(failure)
    return render(request, "frontend/residency.html", {
        "models": Model.objects.order_by("name"), "data_classes": DataClass.objects.order_by("rank", "name"),
        "purposes": residency.PURPOSES, "form": form, "result": result, "error": error,
    })
