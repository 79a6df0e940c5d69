"""Management API for single sign-on group mappings (platform administrators; auditors read)."""

from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from citadel.accounts.models import Role, Team
from citadel.accounts.permissions import OVERSIGHT_ROLES
from citadel.audit.services import Actor
from citadel.core.exceptions import NotFound
from citadel.sso.models import GroupMapping
from citadel.sso.services import group_mapping_create, group_mapping_delete, group_mapping_get


class GroupMappingOutput(serializers.ModelSerializer):
    team = serializers.CharField(source="team.name", default=None, allow_null=True)

    class Meta:
        model = GroupMapping
        fields = ["id", "group", "team", "role", "platform_admin", "created_at"]


class GroupMappingListCreateApi(APIView):
    read_roles, write_roles = OVERSIGHT_ROLES, frozenset()

    class GroupMappingInput(serializers.Serializer):
        group = serializers.CharField(max_length=255)
        team = serializers.CharField(required=False, allow_null=True, default=None)
        role = serializers.ChoiceField(choices=Role.choices, default=Role.ML_ENGINEER)
        platform_admin = serializers.BooleanField(default=False)

    @extend_schema(responses=GroupMappingOutput(many=True))
    def get(self, request):
        return Response(GroupMappingOutput(GroupMapping.objects.select_related("team"), many=True).data)

    @extend_schema(request=GroupMappingInput, responses={201: GroupMappingOutput})
    def post(self, request):
        data = self.GroupMappingInput(data=request.data)
        data.is_valid(raise_exception=True)
        fields = dict(data.validated_data)
        if fields["team"]:
            team = Team.objects.filter(name=fields["team"]).first()
            if team is None:
                raise NotFound(f"No team named '{fields['team']}'.", param="team")
            fields["team"] = team
        mapping = group_mapping_create(actor=Actor.for_request(request), request=request, **fields)
        return Response(GroupMappingOutput(mapping).data, status=status.HTTP_201_CREATED)


class GroupMappingDetailApi(APIView):
    read_roles, write_roles = OVERSIGHT_ROLES, frozenset()

    @extend_schema(responses=GroupMappingOutput)
    def get(self, request, pk: int):
        return Response(GroupMappingOutput(group_mapping_get(pk=pk)).data)

    @extend_schema(responses={204: None})
    def delete(self, request, pk: int):
        group_mapping_delete(mapping=group_mapping_get(pk=pk), actor=Actor.for_request(request), request=request)
        return Response(status=status.HTTP_204_NO_CONTENT)
