"""Management API: the audit trail, read-only, for platform administrators and auditors (compliance
officers read everyone's records; nothing here changes the log). Export and verification stay with
`citadel audit` (see VERIFYING.md)."""

from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from citadel.accounts.permissions import OVERSIGHT_ROLES
from citadel.audit.models import AuditRecord
from citadel.core.exceptions import InvalidRequest


class AuditRecordOutput(serializers.ModelSerializer):
    class Meta:
        model = AuditRecord
        fields = ["sequence", "created_at", "actor_type", "actor_id", "actor_label", "action", "target_type",
                  "target_id", "outcome", "request_id", "source_address", "details", "prev_hash", "record_hash"]


class AuditRecordListApi(APIView):
    read_roles = OVERSIGHT_ROLES
    write_roles = frozenset()
    FILTERS = ("action", "outcome", "actor_label", "target_type", "target_id")

    @extend_schema(parameters=[OpenApiParameter(name, str) for name in FILTERS]
                   + [OpenApiParameter("before", int, description="Only records with a lower sequence."),
                      OpenApiParameter("limit", int, description="At most this many (default 100, at most 1000).")],
                   responses=AuditRecordOutput(many=True))
    def get(self, request):
        records = AuditRecord.objects.order_by("-sequence")
        for name in self.FILTERS:
            if request.query_params.get(name):
                records = records.filter(**{name: request.query_params[name]})
        try:
            if request.query_params.get("before"):
                records = records.filter(sequence__lt=int(request.query_params["before"]))
            limit = min(int(request.query_params.get("limit") or 100), 1000)
        except ValueError:
            raise InvalidRequest("before and limit must be whole numbers.") from None
        if limit < 1:  # a negative slice is not a query: it raised, a 500 (found by tests/fuzz)
            raise InvalidRequest(f"limit must be between 1 and 1000, not {limit}.", param="limit")
        return Response(AuditRecordOutput(records[:limit], many=True).data)
