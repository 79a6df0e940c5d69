"""Usage over the management API: totals grouped by key, team, model, day or kind (JSON) and the
CSV export. Scoped by citadel.accounts.permissions like every team object; reads only."""

from django.http import HttpResponse
from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from citadel.usage import selectors
from citadel.usage.export import usage_csv
from citadel.usage.services import usage_meter_fine_tuning

PARAMETERS = [OpenApiParameter("days", int, description="How many days back (default 30)."),
              OpenApiParameter("team", str), OpenApiParameter("model", str),
              OpenApiParameter("key", str, description="An API key's prefix.")]


def _records(request):
    usage_meter_fine_tuning()  # ended fine-tuning jobs not metered yet by beat
    params = request.query_params
    return selectors.usage_filter(selectors.usage_visible(request=request),
                                  since=selectors.usage_window(days=params.get("days") or 30),
                                  team=params.get("team"), model=params.get("model"), key=params.get("key"))


class UsageRowOutput(serializers.Serializer):
    group = serializers.CharField()
    requests = serializers.IntegerField()
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    total_tokens = serializers.IntegerField()
    gpu_seconds = serializers.FloatField()


class UsageApi(APIView):
    @extend_schema(operation_id="usage_totals",
                   parameters=[*PARAMETERS, OpenApiParameter("by", str, description="key, team, model, day or kind")],
                   responses=inline_serializer(name="UsageTotals", fields={
                       "by": serializers.CharField(), "total": UsageRowOutput(), "rows": UsageRowOutput(many=True)}))
    def get(self, request):
        records = _records(request)
        by = request.query_params.get("by") or "model"
        return Response({"by": by, "total": UsageRowOutput(selectors.usage_sum(records)).data,
                         "rows": UsageRowOutput(selectors.usage_totals(records, by=by), many=True).data})


class UsageExportApi(APIView):
    @extend_schema(operation_id="usage_export", parameters=PARAMETERS, responses={(200, "text/csv"): str})
    def get(self, request):
        response = HttpResponse(usage_csv(_records(request)), content_type="text/csv; charset=utf-8")
        response["Content-Disposition"] = 'attachment; filename="citadel-usage.csv"'
        return response
