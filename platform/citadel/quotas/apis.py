"""Management API for quotas: GET or PUT the limits of a team or an API key.

Who sees a quota: whoever sees its team or key. Who sets it: platform administrators for teams
(a team does not raise its own ceiling); for a team's key, that team's admins too.
"""

from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from citadel.accounts import permissions as perms
from citadel.accounts.apis import key_get, team_get
from citadel.accounts.models import Role
from citadel.audit.services import Actor
from citadel.quotas.models import Quota
from citadel.quotas.services import quota_set


class QuotaSerializer(serializers.Serializer):
    requests_per_minute = serializers.IntegerField(min_value=0, allow_null=True, required=False)
    tokens_per_minute = serializers.IntegerField(min_value=0, allow_null=True, required=False)
    tokens_per_month = serializers.IntegerField(min_value=0, allow_null=True, required=False)
    gpu_hours_per_month = serializers.FloatField(min_value=0, allow_null=True, required=False)


def _body(quota: Quota | None) -> dict:
    return {name: getattr(quota, name) if quota else None for name in Quota.LIMITS}


class TeamQuotaApi(APIView):
    write_roles = frozenset()  # platform administrators

    @extend_schema(responses=QuotaSerializer)
    def get(self, request, name: str):
        team = team_get(request, name)
        return Response(_body(Quota.objects.filter(team=team).first()))

    @extend_schema(request=QuotaSerializer, responses=QuotaSerializer)
    def put(self, request, name: str):
        team = team_get(request, name)
        data = QuotaSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        quota = quota_set(team=team, limits=dict(data.validated_data), actor=Actor.for_request(request),
                          request=request)
        return Response(_body(quota))


class KeyQuotaApi(APIView):
    write_roles = frozenset({Role.ADMIN})

    @extend_schema(responses=QuotaSerializer)
    def get(self, request, prefix: str):
        api_key = key_get(request, prefix)
        return Response(_body(Quota.objects.filter(api_key=api_key).first()))

    @extend_schema(request=QuotaSerializer, responses=QuotaSerializer)
    def put(self, request, prefix: str):
        api_key = key_get(request, prefix)
        perms.team_role_required(request.user, api_key.team, {Role.ADMIN})
        data = QuotaSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        quota = quota_set(api_key=api_key, limits=dict(data.validated_data), actor=Actor.for_request(request),
                          request=request)
        return Response(_body(quota))
