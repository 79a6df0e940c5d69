"""Management API for API keys (each user manages their own; staff see all) and teams (staff)."""

from django.contrib.auth import get_user_model
from drf_spectacular.utils import extend_schema
from rest_framework import permissions, serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from citadel.accounts.models import ApiKey, Team
from citadel.accounts.services import api_key_create, api_key_get, api_key_revoke, team_create
from citadel.audit.services import Actor
from citadel.core.exceptions import NotFound
from citadel.residency.services import data_class_get


class ApiKeyOutput(serializers.ModelSerializer):
    user = serializers.CharField(source="user.username")
    team = serializers.CharField(source="team.name", default=None)
    data_class = serializers.CharField(source="data_class.name")

    class Meta:
        model = ApiKey
        fields = ["prefix", "name", "user", "team", "data_class", "created_at", "expires_at", "revoked_at",
                  "last_used_at", "last_used_from"]


class TeamOutput(serializers.ModelSerializer):
    members = serializers.SlugRelatedField(slug_field="username", many=True, read_only=True)

    class Meta:
        model = Team
        fields = ["name", "description", "members", "created_at"]


class TeamListCreateApi(APIView):
    permission_classes = [permissions.IsAdminUser]

    class TeamCreateInput(serializers.Serializer):
        name = serializers.CharField(max_length=64)
        description = serializers.CharField(required=False, allow_blank=True, default="")
        members = serializers.ListField(child=serializers.CharField(), required=False, default=list)

    @extend_schema(responses=TeamOutput(many=True))
    def get(self, request):
        return Response(TeamOutput(Team.objects.prefetch_related("members"), many=True).data)

    @extend_schema(request=TeamCreateInput, responses={201: TeamOutput})
    def post(self, request):
        data = self.TeamCreateInput(data=request.data)
        data.is_valid(raise_exception=True)
        names = data.validated_data["members"]
        members = list(get_user_model().objects.filter(username__in=names))
        missing = sorted(set(names) - {u.get_username() for u in members})
        if missing:
            raise NotFound(f"No user named {', '.join(missing)}.", param="members")
        team = team_create(name=data.validated_data["name"], description=data.validated_data["description"],
                           members=members, actor=Actor.for_request(request), request=request)
        return Response(TeamOutput(team).data, status=status.HTTP_201_CREATED)


def _visible_keys(user):
    keys = ApiKey.objects.select_related("user", "team", "data_class")
    return keys if user.is_staff else keys.filter(user=user)


class ApiKeyListCreateApi(APIView):
    class ApiKeyCreateInput(serializers.Serializer):
        name = serializers.CharField(max_length=100)
        expires_in_days = serializers.IntegerField(required=False, min_value=1)
        team = serializers.CharField(required=False, allow_null=True, default=None,
                                     help_text="The team whose residency policies govern the key's requests.")
        data_class = serializers.CharField(required=False, default="internal",
                                           help_text="The class of the data sent with the key.")

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
        fields = dict(data.validated_data)
        fields["team"] = _team(fields["team"])
        fields["data_class"] = data_class_get(name=fields["data_class"])
        created = api_key_create(user=request.user, actor=Actor.for_request(request), request=request, **fields)
        body = ApiKeyOutput(created.api_key).data | {"key": created.key}
        return Response(body, status=status.HTTP_201_CREATED)


def _team(name: str | None) -> Team | None:
    if not name:
        return None
    team = Team.objects.filter(name=name).first()
    if team is None:
        raise NotFound(f"No team named '{name}'.", param="team")
    return team


class ApiKeyRevokeApi(APIView):
    @extend_schema(request=None, responses=ApiKeyOutput)
    def post(self, request, prefix: str):
        api_key = api_key_get(prefix=prefix)
        if not _visible_keys(request.user).filter(pk=api_key.pk).exists():
            raise NotFound(f"No API key with prefix {prefix!r}.", param="prefix")
        api_key = api_key_revoke(api_key=api_key, actor=Actor.for_request(request), request=request)
        return Response(ApiKeyOutput(api_key).data)
