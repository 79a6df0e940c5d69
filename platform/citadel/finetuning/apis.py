"""Fine-tuning over HTTP: OpenAI's /v1/files and /v1/fine_tuning/jobs (API keys, OpenAI's shapes
and errors), and the management API under /api/v1/fine-tuning/ (session or key, in the schema).

Both are thin: they parse input, call services and selectors, and render. Refusals are audited
by the services; whatever is refused before reaching them (a malformed body) is audited here.
"""

from django.http import FileResponse
from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import serializers, status
from rest_framework.exceptions import ParseError, ValidationError
from rest_framework.negotiation import BaseContentNegotiation
from rest_framework.parsers import FormParser, JSONParser, MultiPartParser
from rest_framework.response import Response
from rest_framework.views import APIView

from citadel.accounts.authentication import ApiKeyAuthentication
from citadel.audit.services import Actor, audit_record
from citadel.core.exceptions import CitadelError, InvalidRequest, NotFound
from citadel.finetuning import openai_format, selectors, services
from citadel.finetuning.models import File, FineTuningCheckpoint, FineTuningEvent, FineTuningJob
from citadel.gateway.serializers import StrictIntegerField
from citadel.residency.services import request_subject


def _api_key(request):
    return request.auth if hasattr(request.auth, "prefix") else None


def _audit_refusal(request, error: Exception, *, action: str, target: str) -> None:
    """Audit a request refused before a service could (services audit their own refusals)."""
    if getattr(error, "audited", False):
        return
    audit_record(actor=Actor.for_request(request), action=action, outcome="failure", target_type="request",
                 target_id=str(target or "")[:200], request=request,
                 details={"error": type(error).__name__, "message": str(error)[:500]})


class FineTuningJobCreateInput(serializers.Serializer):
    model = serializers.CharField()
    training_file = serializers.CharField()
    validation_file = serializers.CharField(required=False, allow_null=True, allow_blank=True)
    hyperparameters = serializers.JSONField(required=False, allow_null=True)
    method = serializers.JSONField(required=False, allow_null=True)
    suffix = serializers.CharField(required=False, allow_null=True, allow_blank=True)
    seed = StrictIntegerField(required=False, allow_null=True, min_value=0, max_value=2**31 - 1)
    metadata = serializers.JSONField(required=False, allow_null=True)
    integrations = serializers.JSONField(required=False, allow_null=True)
    citadel = serializers.JSONField(required=False, allow_null=True,
                                    help_text="Citadel's LoRA settings: rank, alpha, dropout, target_modules, "
                                              "max_seq_len, lr_schedule, warmup_steps, checkpoint_every, eval_every.")

    def validate_integrations(self, value):
        if value:
            raise serializers.ValidationError("are not supported by Citadel (no data leaves the site); leave them "
                                              "out.")
        return value


def _job_create(request, body) -> FineTuningJob:
    try:
        data = FineTuningJobCreateInput(data=body)
        data.is_valid(raise_exception=True)
        values = data.validated_data
        return services.job_create(
            model_name=values["model"], training_file_id=values["training_file"],
            validation_file_id=values.get("validation_file") or None, hyperparameters=values.get("hyperparameters"),
            method=values.get("method"), citadel=values.get("citadel"), suffix=values.get("suffix"),
            seed=values.get("seed"), metadata=values.get("metadata"), subject=request_subject(request),
            actor=Actor.for_request(request), user=request.user, api_key=_api_key(request), request=request)
    except (CitadelError, ValidationError, ParseError) as error:
        _audit_refusal(request, error, action="finetuning.job.create",
                       target=body.get("model") if isinstance(body, dict) else "")
        raise


def _file_upload(request, *, default_purpose: str = "") -> File:
    try:
        upload = request.FILES.get("file")
        if upload is None:
            raise InvalidRequest("Send the dataset as the multipart field `file`.", param="file")
        return services.file_upload(upload=upload, purpose=request.data.get("purpose") or default_purpose,
                                    model_name=request.data.get("model") or None, subject=request_subject(request),
                                    actor=Actor.for_request(request), user=request.user, api_key=_api_key(request),
                                    request=request)
    except (CitadelError, ValidationError, ParseError) as error:
        _audit_refusal(request, error, action="finetuning.file.upload", target="file")
        raise


def _file_content(file: File) -> FileResponse:
    try:
        handle = open(file.path, "rb")  # noqa: SIM115 - FileResponse closes it
    except OSError as error:
        raise NotFound(f"The bytes of file {file.openai_id} are not readable here: {error}") from error
    return FileResponse(handle, content_type="application/octet-stream", as_attachment=True,
                        filename=file.filename)


# -- OpenAI protocol (/v1) ----------------------------------------------------------------------

class OpenAIApi(APIView):
    authentication_classes = [ApiKeyAuthentication]
    parser_classes = [JSONParser, MultiPartParser, FormParser]
    schema = None  # documented by OpenAI's own reference, not the management schema


class FileListCreateApi(OpenAIApi):
    def get(self, request):
        page = selectors.files_page(request=request, after=request.query_params.get("after"),
                                    limit=request.query_params.get("limit"),
                                    order=request.query_params.get("order") or "desc",
                                    purpose=request.query_params.get("purpose"))
        return Response(openai_format.list_body(page, openai_format.file_body))

    def post(self, request):
        return Response(openai_format.file_body(_file_upload(request)))


class FileDetailApi(OpenAIApi):
    def get(self, request, file_id: str):
        return Response(openai_format.file_body(selectors.file_get(request=request, file_id=file_id)))

    def delete(self, request, file_id: str):
        file = services.file_delete(file=selectors.file_get(request=request, file_id=file_id),
                                    actor=Actor.for_request(request), request=request)
        return Response({"id": file.openai_id, "object": "file", "deleted": True})


class AnyAccept(BaseContentNegotiation):
    """File bytes go out whatever the client accepts (the openai client asks for application/binary)."""

    def select_parser(self, request, parsers):
        return parsers[0] if parsers else None

    def select_renderer(self, request, renderers, format_suffix=None):
        return renderers[0], renderers[0].media_type


class FileContentApi(OpenAIApi):
    content_negotiation_class = AnyAccept

    def get(self, request, file_id: str):
        return _file_content(selectors.file_get(request=request, file_id=file_id))


class JobListCreateApi(OpenAIApi):
    def get(self, request):
        metadata = {key[len("metadata["):-1]: value for key, value in request.query_params.items()
                    if key.startswith("metadata[") and key.endswith("]")}
        page = selectors.jobs_page(request=request, after=request.query_params.get("after"),
                                   limit=request.query_params.get("limit"), metadata=metadata)
        return Response(openai_format.list_body(page, openai_format.job_body))

    def post(self, request):
        return Response(openai_format.job_body(_job_create(request, request.data)))


class JobDetailApi(OpenAIApi):
    def get(self, request, job_id: str):
        return Response(openai_format.job_body(selectors.job_get(request=request, job_id=job_id)))


class JobCancelApi(OpenAIApi):
    def post(self, request, job_id: str):
        job = services.job_cancel(job=selectors.job_get(request=request, job_id=job_id),
                                  actor=Actor.for_request(request), request=request)
        return Response(openai_format.job_body(selectors.job_get(request=request, job_id=job.openai_id)))


class JobEventsApi(OpenAIApi):
    def get(self, request, job_id: str):
        job = selectors.job_get(request=request, job_id=job_id)
        page = selectors.job_events_page(job=job, after=request.query_params.get("after"),
                                         limit=request.query_params.get("limit"))
        return Response(openai_format.list_body(page, openai_format.event_body))


class JobCheckpointsApi(OpenAIApi):
    def get(self, request, job_id: str):
        job = selectors.job_get(request=request, job_id=job_id)
        page = selectors.job_checkpoints_page(job=job, after=request.query_params.get("after"),
                                              limit=request.query_params.get("limit"))
        return Response(openai_format.list_body(page, lambda c: openai_format.checkpoint_body(c, job)))


# -- management API (/api/v1/fine-tuning/) --------------------------------------------------------

class FineTuningFileOutput(serializers.ModelSerializer):
    id = serializers.CharField(source="openai_id")
    site = serializers.CharField(source="site.name")
    data_class = serializers.CharField(source="data_class.name")
    team = serializers.CharField(source="team.name", default=None, allow_null=True)

    class Meta:
        model = File
        fields = ["id", "filename", "purpose", "bytes", "sha256", "status", "site", "data_class", "team",
                  "validated_with", "report", "created_at"]


class FineTuningJobOutput(serializers.ModelSerializer):
    id = serializers.CharField(source="openai_id")
    model = serializers.CharField(source="model.name")
    training_file = serializers.CharField(source="training_file.openai_id")
    validation_file = serializers.CharField(source="validation_file.openai_id", default=None, allow_null=True)
    fine_tuned_model = serializers.CharField(source="fine_tuned_model.name", default=None, allow_null=True)
    pool = serializers.CharField(source="pool.name", default=None, allow_null=True)
    site = serializers.CharField(source="site.name", default=None, allow_null=True)
    team = serializers.CharField(source="team.name", default=None, allow_null=True)

    class Meta:
        model = FineTuningJob
        fields = ["id", "status", "model", "training_file", "validation_file", "suffix", "seed", "hyperparameters",
                  "config", "metadata", "team", "pool", "site", "worker_name", "attempts", "step", "total_steps",
                  "train_loss", "valid_loss", "estimated_tokens", "trained_tokens", "estimated_finish",
                  "fine_tuned_model", "error_code", "error_message", "error_param", "created_at", "started_at",
                  "finished_at", "stopped_at"]


class FineTuningEventOutput(serializers.ModelSerializer):
    id = serializers.CharField(source="openai_id")

    class Meta:
        model = FineTuningEvent
        fields = ["id", "level", "type", "message", "data", "created_at"]


class FineTuningCheckpointOutput(serializers.ModelSerializer):
    id = serializers.CharField(source="openai_id")

    class Meta:
        model = FineTuningCheckpoint
        fields = ["id", "step", "path", "metrics", "created_at"]


class FineTuningLossPointOutput(serializers.Serializer):
    event_id = serializers.IntegerField()
    step = serializers.IntegerField(allow_null=True)
    train_loss = serializers.FloatField(allow_null=True)
    valid_loss = serializers.FloatField(allow_null=True)
    learning_rate = serializers.FloatField(allow_null=True)
    tokens_per_second = serializers.FloatField(allow_null=True)


PAGE_PARAMETERS = [OpenApiParameter("after", str, description="Id of the last object of the previous page."),
                   OpenApiParameter("limit", int, description="How many to return.")]


def _paged(page: selectors.Page, serializer) -> dict:
    return {"results": serializer(page.items, many=True).data, "has_more": page.has_more}


def _paged_schema(name: str, serializer):
    return inline_serializer(name=name, fields={"results": serializer(many=True),
                                                "has_more": serializers.BooleanField()})


class FineTuningFileUploadInput(serializers.Serializer):
    file = serializers.FileField()
    purpose = serializers.CharField(default="fine-tune")
    model = serializers.CharField(required=False, help_text="Base model whose tokenizer validates the file; "
                                                            "default: the first deployed one.")


class ManagementFileListApi(APIView):
    parser_classes = [MultiPartParser, FormParser]

    @extend_schema(operation_id="fine_tuning_files_list", parameters=PAGE_PARAMETERS,
                   responses=_paged_schema("FineTuningFilePage", FineTuningFileOutput))
    def get(self, request):
        page = selectors.files_page(request=request, after=request.query_params.get("after"),
                                    limit=request.query_params.get("limit") or 100)
        return Response(_paged(page, FineTuningFileOutput))

    @extend_schema(request={"multipart/form-data": FineTuningFileUploadInput}, responses={201: FineTuningFileOutput})
    def post(self, request):
        file = _file_upload(request, default_purpose=File.Purpose.FINE_TUNE)
        return Response(FineTuningFileOutput(file).data, status=status.HTTP_201_CREATED)


class ManagementFileDetailApi(APIView):
    @extend_schema(responses=FineTuningFileOutput)
    def get(self, request, file_id: str):
        return Response(FineTuningFileOutput(selectors.file_get(request=request, file_id=file_id)).data)

    @extend_schema(responses={204: None})
    def delete(self, request, file_id: str):
        services.file_delete(file=selectors.file_get(request=request, file_id=file_id),
                             actor=Actor.for_request(request), request=request)
        return Response(status=status.HTTP_204_NO_CONTENT)


class ManagementFileContentApi(APIView):
    @extend_schema(responses={(200, "application/octet-stream"): bytes})
    def get(self, request, file_id: str):
        return _file_content(selectors.file_get(request=request, file_id=file_id))


class ManagementJobListApi(APIView):
    @extend_schema(operation_id="fine_tuning_jobs_list", parameters=PAGE_PARAMETERS,
                   responses=_paged_schema("FineTuningJobPage", FineTuningJobOutput))
    def get(self, request):
        page = selectors.jobs_page(request=request, after=request.query_params.get("after"),
                                   limit=request.query_params.get("limit") or 100)
        return Response(_paged(page, FineTuningJobOutput))

    @extend_schema(request=FineTuningJobCreateInput, responses={201: FineTuningJobOutput})
    def post(self, request):
        return Response(FineTuningJobOutput(_job_create(request, request.data)).data, status=status.HTTP_201_CREATED)


class ManagementJobDetailApi(APIView):
    @extend_schema(responses=FineTuningJobOutput)
    def get(self, request, job_id: str):
        return Response(FineTuningJobOutput(selectors.job_get(request=request, job_id=job_id)).data)


class ManagementJobCancelApi(APIView):
    @extend_schema(request=None, responses=FineTuningJobOutput)
    def post(self, request, job_id: str):
        job = services.job_cancel(job=selectors.job_get(request=request, job_id=job_id),
                                  actor=Actor.for_request(request), request=request)
        return Response(FineTuningJobOutput(selectors.job_get(request=request, job_id=job.openai_id)).data)


class ManagementJobEventsApi(APIView):
    @extend_schema(parameters=PAGE_PARAMETERS, responses=_paged_schema("FineTuningEventPage", FineTuningEventOutput))
    def get(self, request, job_id: str):
        job = selectors.job_get(request=request, job_id=job_id)
        page = selectors.job_events_page(job=job, after=request.query_params.get("after"),
                                         limit=request.query_params.get("limit") or 100)
        return Response(_paged(page, FineTuningEventOutput))


class ManagementJobCheckpointsApi(APIView):
    @extend_schema(responses=_paged_schema("FineTuningCheckpointPage", FineTuningCheckpointOutput))
    def get(self, request, job_id: str):
        job = selectors.job_get(request=request, job_id=job_id)
        page = selectors.job_checkpoints_page(job=job, limit=request.query_params.get("limit") or 100)
        return Response(_paged(page, FineTuningCheckpointOutput))


class ManagementJobMetricsApi(APIView):
    """The loss curve: metrics points in step order; `after` an event_id gives only newer points."""

    @extend_schema(parameters=[OpenApiParameter("after", int, description="Last event_id already seen.")],
                   responses=FineTuningLossPointOutput(many=True))
    def get(self, request, job_id: str):
        job = selectors.job_get(request=request, job_id=job_id)
        try:
            after = int(request.query_params.get("after") or 0)
        except ValueError:
            raise InvalidRequest("after must be an event_id (a whole number).", param="after") from None
        return Response(FineTuningLossPointOutput(selectors.job_loss_curve(job=job, after_event_id=after), many=True).data)
