"""Management API for API keys: each user manages their own; staff see all."""

from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from citadel.accounts.models import ApiKey
from citadel.accounts.services import api_key_create, api_key_get, api_key_revoke
from citadel.audit.services import Actor
from citadel.core.exceptions import NotFound


class ApiKeyOutput(serializers.ModelSerializer):
    user = serializers.CharField(source="user.username")

    class Meta:
        model = ApiKey
        fields = ["prefix", "name", "user", "created_at", "expires_at", "revoked_at", "last_used_at", "last_used_from"]


def _visible_keys(user):
    keys = ApiKey.objects.select_related("user")
    return keys if user.is_staff else keys.filter(user=user)


class ApiKeyListCreateApi(APIView):
    class ApiKeyCreateInput(serializers.Serializer):
        name = serializers.CharField(max_length=100)
        expires_in_days = serializers.IntegerField(required=False, min_value=1)

    class ApiKeyCreatedOutput(ApiKeyOutput):
        key = serializers.CharField(help_text="The key itself, shown only in this response.")

        class Meta(ApiKeyOutput.Meta):
            fields = [*ApiKeyOutput.Meta.fields, "key"]

    @extend_schema(responses=ApiKeyOutput(many=True))
    def get(self, request):
        return Response(ApiKeyOutput(_visible_keys(request.user), many=True).data)

    @extend_schema(request=ApiKeyCreateInput, responses={201: ApiKeyCreatedOutput})
    def post(self, request):
        data = self.ApiKeyCreateInput(data=request.data)
        data.is_valid(raise_exception=True)
        created = api_key_create(user=request.user, actor=Actor.for_request(request), request=request,
                                 **data.validated_data)
        body = ApiKeyOutput(created.api_key).data | {"key": created.key}
        return Response(body, status=status.HTTP_201_CREATED)


class ApiKeyRevokeApi(APIView):
    @extend_schema(request=None, responses=ApiKeyOutput)
    def post(self, request, prefix: str):
        api_key = api_key_get(prefix=prefix)
        if not _visible_keys(request.user).filter(pk=api_key.pk).exists():
            raise NotFound(f"No API key with prefix {prefix!r}.", param="prefix")
        api_key = api_key_revoke(api_key=api_key, actor=Actor.for_request(request), request=request)
        return Response(ApiKeyOutput(api_key).data)
