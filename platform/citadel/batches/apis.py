"""OpenAI's /v1/batches (API keys, OpenAI's shapes and errors) and a read-only management view
under /api/v1/batches/ (session or key, in the schema). Thin: parse, call services, render."""

from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.exceptions import ParseError, ValidationError
from rest_framework.response import Response
from rest_framework.views import APIView

from citadel.accounts.authentication import ApiKeyAuthentication
from citadel.accounts.models import EndpointGroup
from citadel.accounts.permissions import USE_ROLES
from citadel.audit.services import Actor, audit_record
from citadel.batches import selectors, services
from citadel.batches.output import batch_body
from citadel.core.exceptions import CitadelError
from citadel.finetuning.openai_format import list_body
from citadel.residency.services import request_subject


class BatchCreateInput(serializers.Serializer):
    input_file_id = serializers.CharField()
    endpoint = serializers.CharField()
    completion_window = serializers.CharField()
    metadata = serializers.JSONField(required=False, allow_null=True)
    output_expires_after = serializers.JSONField(required=False, allow_null=True)


def _api_key(request):
    return request.auth if hasattr(request.auth, "prefix") else None


class OpenAIApi(APIView):
    authentication_classes = [ApiKeyAuthentication]
    schema = None  # documented by OpenAI's own reference
    endpoint_group = EndpointGroup.INFERENCE
    write_roles = USE_ROLES


class BatchListCreateApi(OpenAIApi):
    def get(self, request):
        page = selectors.batches_page(request=request, after=request.query_params.get("after"),
                                      limit=request.query_params.get("limit"))
        return Response(list_body(page, batch_body))

    def post(self, request):
        try:
            data = BatchCreateInput(data=request.data)
            data.is_valid(raise_exception=True)
            values = data.validated_data
            batch = services.batch_create(
                input_file_id=values["input_file_id"], endpoint=values["endpoint"],
                completion_window=values["completion_window"], metadata=values.get("metadata"),
                subject=request_subject(request), actor=Actor.for_request(request), user=request.user,
                api_key=_api_key(request), request=request)
        except (CitadelError, ValidationError, ParseError) as error:
            if not getattr(error, "audited", False):
                audit_record(actor=Actor.for_request(request), action="batch.create", outcome="failure",
                             target_type="batch", target_id="", request=request,
                             details={"error": type(error).__name__, "message": str(error)[:500]})
            raise
        return Response(batch_body(selectors.batch_get(request=request, batch_id=batch.openai_id)))


class BatchDetailApi(OpenAIApi):
    def get(self, request, batch_id: str):
        return Response(batch_body(selectors.batch_get(request=request, batch_id=batch_id)))


class BatchCancelApi(OpenAIApi):
    def post(self, request, batch_id: str):
        batch = services.batch_cancel(batch=selectors.batch_get(request=request, batch_id=batch_id),
                                      actor=Actor.for_request(request), request=request)
        return Response(batch_body(selectors.batch_get(request=request, batch_id=batch.openai_id)))


class ManagementBatchListApi(APIView):
    """Batches the caller may see, in OpenAI's shape (the console and scripts read the same)."""

    @extend_schema(operation_id="batches_list", responses={200: dict})
    def get(self, request):
        page = selectors.batches_page(request=request, after=request.query_params.get("after"),
                                      limit=request.query_params.get("limit"))
        return Response(list_body(page, batch_body))


class ManagementBatchDetailApi(APIView):
    @extend_schema(operation_id="batches_retrieve", responses={200: dict})
    def get(self, request, batch_id: str):
        return Response(batch_body(selectors.batch_get(request=request, batch_id=batch_id)))
