"""The OpenAI-compatible endpoints: /v1/models, /v1/chat/completions, /v1/completions.

Authenticated by API key only (Bearer); errors come back in OpenAI's error shape through the
project's one exception handler. Where a request may run is the residency policy's call
(citadel.residency.services.decide, through job_submit): the key's team and data class, which
the `X-Citadel-Data-Class` header may raise but never lower.
"""

from django.http import StreamingHttpResponse
from rest_framework.exceptions import ParseError, ValidationError
from rest_framework.response import Response
from rest_framework.views import APIView

from citadel.accounts.authentication import ApiKeyAuthentication
from citadel.accounts.models import EndpointGroup
from citadel.accounts.permissions import USE_ROLES, api_key_of
from citadel.audit.services import Actor, audit_record
from citadel.core.exceptions import CitadelError, NotFound, PermissionDenied, ServiceUnavailable
from citadel.finetuning.selectors import fine_tuned_model_usable, fine_tuned_models_hidden
from citadel.gateway.openai_format import completion_body
from citadel.gateway.serializers import ChatCompletionInput, CompletionInput
from citadel.gateway.streaming import job_event_stream
from citadel.jobs.models import InferenceJob
from citadel.jobs.selectors import job_wait
from citadel.jobs.services import job_error, job_submit
from citadel.quotas.limiter import quota_admit
from citadel.registry.selectors import model_get, models_deployed
from citadel.residency.services import request_subject


class OpenAIApi(APIView):
    authentication_classes = [ApiKeyAuthentication]
    schema = None  # documented by OpenAI's own reference, not the management schema
    # Roles, key scopes and quotas: citadel.accounts.permissions.RoleAccess and citadel.quotas (the defaults).
    endpoint_group = EndpointGroup.INFERENCE
    write_roles = USE_ROLES


def _model_body(model) -> dict:
    return {"id": model.name, "object": "model", "created": int(model.created_at.timestamp()), "owned_by": "citadel"}


class ModelListApi(OpenAIApi):
    def get(self, request):
        api_key = api_key_of(request)
        hidden = fine_tuned_models_hidden(request=request)  # other teams' fine-tuned models
        models = [m for m in models_deployed() if (api_key is None or api_key.allows_model(m.name))
                  and m.name not in hidden]
        return Response({"object": "list", "data": [_model_body(m) for m in models]})


class ModelRetrieveApi(OpenAIApi):
    def get(self, request, model_id: str):
        model = models_deployed().filter(name=model_id).first()
        api_key = api_key_of(request)
        if model is None or (api_key is not None and not api_key.allows_model(model.name)) \
                or not fine_tuned_model_usable(request=request, name=model.name):
            raise NotFound(f"The model '{model_id}' does not exist.", param="model", code="model_not_found")
        return Response(_model_body(model))


def run_job(request, data, *, kind: str):
    """Submit the validated request and answer it, streamed or whole. Shared with the console."""
    api_key = request.auth if hasattr(request.auth, "prefix") else None
    if api_key is not None and not api_key.allows_model(data.validated_data["model"]):
        raise PermissionDenied(f"This API key may not use the model '{data.validated_data['model']}' (its models: "
                               f"{', '.join(api_key.allowed_models)}).", param="model", code="model_not_allowed")
    if api_key is None:  # a console session runs on its team's quota (a key's request was counted on arrival)
        quota_admit(team=request_subject(request).team)
    payload = data.payload()
    model = model_get(name=data.validated_data["model"])  # once per request: job_submit takes it
    adapter = {"name": model.name, "path": model.adapter_path} if model.base_id else None
    if adapter is not None:  # a fine-tuned model: its base's deployment runs it with this adapter
        if not fine_tuned_model_usable(request=request, name=adapter["name"]):  # another team's adapter
            raise NotFound(f"The model '{adapter['name']}' does not exist. List the available ones at "
                           "GET /v1/models.", param="model", code="model_not_found")
        payload["adapter"] = adapter
    job = job_submit(model_name=data.validated_data["model"], kind=kind, payload=payload,
                     stream=data.validated_data["stream"], actor=Actor.for_request(request), request=request,
                     user=request.user, api_key=api_key, subject=request_subject(request), model=model)
    if data.validated_data["stream"]:
        response = StreamingHttpResponse(job_event_stream(job, include_usage=data.include_usage),
                                         content_type="text/event-stream")
        response["Cache-Control"] = "no-cache"
        response["X-Accel-Buffering"] = "no"
        return response
    job = job_wait(job_id=job.id)
    if job.status != InferenceJob.Status.SUCCEEDED:
        raise job_error(job)
    return Response(completion_body(job))


def inference_request(request, serializer_class, *, kind: str, data=None):
    """Validate and run one inference request; a refused one is audited before its error goes back."""
    body = request.data if data is None else data
    try:
        data = serializer_class(data=body)
        data.is_valid(raise_exception=True)
        return run_job(request, data, kind=kind)
    except (CitadelError, ValidationError, ParseError) as error:
        # job_submit audits what it refuses itself (no worker, or denied by residency policy)
        if not isinstance(error, ServiceUnavailable) and not getattr(error, "audited", False):
            model = body.get("model") if isinstance(body, dict) else None
            audit_record(actor=Actor.for_request(request), action=f"inference.{kind}", outcome="failure",
                         target_type="model", target_id=str(model or "")[:200], request=request,
                         details={"error": type(error).__name__, "message": str(error)[:500]})
        raise


class ChatCompletionApi(OpenAIApi):
    def post(self, request):
        return inference_request(request, ChatCompletionInput, kind=InferenceJob.Kind.CHAT)


class CompletionApi(OpenAIApi):
    def post(self, request):
        return inference_request(request, CompletionInput, kind=InferenceJob.Kind.COMPLETION)
