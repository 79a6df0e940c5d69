"""Management API for teams, memberships and roles, API keys, and sign-in locks.

What each caller sees is decided by citadel.accounts.permissions: team members see their teams'
keys; a team's admins manage its members; platform administrators see and manage everything.
"""

from django.contrib.auth import get_user_model
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from citadel.accounts import permissions as perms
from citadel.accounts import totp
from citadel.accounts.lockout import login_lock_lift
from citadel.accounts.middleware import ENROL_REQUIRED
from citadel.accounts.models import ApiKey, EndpointGroup, LoginLock, Membership, Role, Team, TotpDevice
from citadel.accounts.services import (
    API_KEY_MAX_DAYS,
    api_key_create,
    api_key_revoke,
    api_key_update,
    membership_remove,
    membership_set,
    team_create,
)
from citadel.audit.services import Actor
from citadel.core.exceptions import NotFound, PermissionDenied
from citadel.residency.services import data_class_get


def _user(username: str, param: str = "user"):
    user = get_user_model().objects.filter(username=username).first()
    if user is None:
        raise NotFound(f"No user named {username!r}.", param=param)
    return user


def _visible_teams(user):
    return perms.scope(user, Team.objects.prefetch_related("memberships__user"), team_field="pk", owner_field=None)


def team_get(request, name: str, param: str | None = None) -> Team:
    """The team, when the caller is in it (or a platform administrator); otherwise 404, as if it did not exist."""
    return perms.object_get(request.user, Team.objects.all(), team_field="pk", owner_field=None, what="team",
                            param=param, name=name)


class MembershipOutput(serializers.ModelSerializer):
    user = serializers.CharField(source="user.username")
    team = serializers.CharField(source="team.name")

    class Meta:
        model = Membership
        fields = ["team", "user", "role", "source"]


class TeamOutput(serializers.ModelSerializer):
    members = MembershipOutput(source="memberships", many=True, read_only=True)

    class Meta:
        model = Team
        fields = ["name", "description", "members", "created_at"]


class ApiKeyOutput(serializers.ModelSerializer):
    user = serializers.CharField(source="user.username")
    team = serializers.CharField(source="team.name", default=None, allow_null=True)
    data_class = serializers.CharField(source="data_class.name")

    class Meta:
        model = ApiKey
        fields = ["prefix", "name", "user", "team", "data_class", "scopes", "allowed_models", "created_at",
                  "expires_at", "revoked_at", "last_used_at", "last_used_from"]


class MeOutput(serializers.Serializer):
    username = serializers.CharField()
    platform_admin = serializers.BooleanField()
    roles = serializers.ListField(child=serializers.CharField())
    memberships = MembershipOutput(many=True)
    totp_enrolled = serializers.BooleanField()
    api_key = serializers.CharField(allow_null=True, help_text="The prefix of the key the request was made with.")


class LoginLockOutput(serializers.Serializer):
    kind = serializers.CharField()
    key = serializers.CharField()
    until = serializers.DateTimeField()


class MeApi(APIView):
    """Who the caller is: their roles and teams, and whether they have a second factor."""

    @extend_schema(responses=MeOutput)
    def get(self, request):
        user = request.user
        return Response({
            "username": user.get_username(),
            "platform_admin": perms.is_platform_admin(user),
            "roles": sorted(perms.user_roles(user)),
            "memberships": MembershipOutput(Membership.objects.filter(user=user).select_related("team", "user"),
                                            many=True).data,
            "totp_enrolled": bool(getattr(getattr(user, "totp_device", None), "confirmed_at", None)),
            "api_key": perms.api_key_of(request).prefix if perms.api_key_of(request) else None,
        })


class TeamListCreateApi(APIView):
    write_roles = frozenset()  # platform administrators create teams

    class TeamCreateInput(serializers.Serializer):
        name = serializers.CharField(max_length=64)
        description = serializers.CharField(required=False, allow_blank=True, default="")
        members = serializers.ListField(child=serializers.CharField(), required=False, default=list)

    @extend_schema(responses=TeamOutput(many=True))
    def get(self, request):
        return Response(TeamOutput(_visible_teams(request.user), many=True).data)

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


class TeamDetailApi(APIView):
    @extend_schema(responses=TeamOutput)
    def get(self, request, name: str):
        return Response(TeamOutput(team_get(request, name)).data)


class MembershipListCreateApi(APIView):
    """A team's members; its admins (and platform administrators) add members or change their role."""

    write_roles = frozenset({Role.ADMIN})

    class MembershipInput(serializers.Serializer):
        user = serializers.CharField()
        role = serializers.ChoiceField(choices=Role.choices)

    @extend_schema(responses=MembershipOutput(many=True))
    def get(self, request, name: str):
        team = team_get(request, name)
        return Response(MembershipOutput(team.memberships.select_related("user", "team"), many=True).data)

    @extend_schema(request=MembershipInput, responses={201: MembershipOutput})
    def post(self, request, name: str):
        team = team_get(request, name)
        perms.team_role_required(request.user, team, {Role.ADMIN})
        data = self.MembershipInput(data=request.data)
        data.is_valid(raise_exception=True)
        previous = team.memberships.filter(user__username=data.validated_data["user"]).first()
        perms.role_grant_check(request.user, data.validated_data["role"], previous.role if previous else None)
        membership = membership_set(team=team, user=_user(data.validated_data["user"]),
                                    role=data.validated_data["role"], actor=Actor.for_request(request),
                                    request=request)
        return Response(MembershipOutput(membership).data, status=status.HTTP_201_CREATED)


class MembershipDetailApi(APIView):
    write_roles = frozenset({Role.ADMIN})

    class RoleInput(serializers.Serializer):
        role = serializers.ChoiceField(choices=Role.choices)

    def _get(self, request, name: str, username: str) -> Membership:
        team = team_get(request, name)
        membership = team.memberships.select_related("user", "team").filter(user__username=username).first()
        if membership is None:
            raise NotFound(f"{username!r} is not a member of team '{name}'.")
        return membership

    @extend_schema(responses=MembershipOutput)
    def get(self, request, name: str, username: str):
        return Response(MembershipOutput(self._get(request, name, username)).data)

    @extend_schema(request=RoleInput, responses=MembershipOutput)
    def patch(self, request, name: str, username: str):
        membership = self._get(request, name, username)
        perms.team_role_required(request.user, membership.team, {Role.ADMIN})
        data = self.RoleInput(data=request.data)
        data.is_valid(raise_exception=True)
        perms.role_grant_check(request.user, data.validated_data["role"], membership.role)
        membership = membership_set(team=membership.team, user=membership.user, role=data.validated_data["role"],
                                    actor=Actor.for_request(request), request=request)
        return Response(MembershipOutput(membership).data)

    @extend_schema(responses={204: None})
    def delete(self, request, name: str, username: str):
        membership = self._get(request, name, username)
        perms.team_role_required(request.user, membership.team, {Role.ADMIN})
        perms.role_grant_check(request.user, None, membership.role)
        membership_remove(team=membership.team, user=membership.user, actor=Actor.for_request(request),
                          request=request)
        return Response(status=status.HTTP_204_NO_CONTENT)


def visible_keys(user):
    """The keys `user` may see: their teams' keys and their own team-less ones (all, for platform admins)."""
    return perms.scope(user, ApiKey.objects.select_related("user", "team", "data_class"))


def key_get(request, prefix: str) -> ApiKey:
    return perms.object_get(request.user, ApiKey.objects.select_related("user", "team", "data_class"),
                            what="API key", prefix=prefix)


class ApiKeyListCreateApi(APIView):
    class ApiKeyCreateInput(serializers.Serializer):
        name = serializers.CharField(max_length=100)
        expires_in_days = serializers.IntegerField(required=False, min_value=1, max_value=API_KEY_MAX_DAYS)
        team = serializers.CharField(required=False, allow_null=True, default=None,
                                     help_text="The team whose residency policies govern the key's requests.")
        data_class = serializers.CharField(required=False, default="internal",
                                           help_text="The class of the data sent with the key.")
        scopes = serializers.ListField(child=serializers.ChoiceField(choices=EndpointGroup.choices), required=False,
                                       help_text="Endpoint groups the key may call (default: all).")
        allowed_models = serializers.ListField(child=serializers.CharField(), required=False, default=list,
                                               help_text="Models the key may use (default: all).")
        user = serializers.CharField(required=False, help_text="Whose key (a team admin may create keys for the "
                                                               "team's members, e.g. applications); default: you.")

    class ApiKeyCreatedOutput(ApiKeyOutput):
        key = serializers.CharField(help_text="The key itself, shown only in this response.")

        class Meta(ApiKeyOutput.Meta):
            fields = [*ApiKeyOutput.Meta.fields, "key"]

    @extend_schema(responses=ApiKeyOutput(many=True))
    def get(self, request):
        return Response(ApiKeyOutput(visible_keys(request.user), many=True).data)

    @extend_schema(request=ApiKeyCreateInput, responses={201: ApiKeyCreatedOutput})
    def post(self, request):
        data = self.ApiKeyCreateInput(data=request.data)
        data.is_valid(raise_exception=True)
        fields = dict(data.validated_data)
        fields["team"] = _team_for_key(request, fields["team"])
        fields["data_class"] = data_class_get(name=fields["data_class"])
        owner = request.user
        if fields.get("user") and fields["user"] != request.user.get_username():
            perms.team_role_required(request.user, fields["team"], {Role.ADMIN})
            owner = _user(fields["user"])
        fields.pop("user", None)
        created = api_key_create(user=owner, actor=Actor.for_request(request), request=request,
                                 limit_to=perms.api_key_of(request), **fields)
        body = ApiKeyOutput(created.api_key).data | {"key": created.key}
        return Response(body, status=status.HTTP_201_CREATED)


def _team_for_key(request, name: str | None) -> Team | None:
    if not name:
        return None
    return team_get(request, name, param="team")


class ApiKeyDetailApi(APIView):
    class ApiKeyUpdateInput(serializers.Serializer):
        scopes = serializers.ListField(child=serializers.ChoiceField(choices=EndpointGroup.choices), required=False)
        allowed_models = serializers.ListField(child=serializers.CharField(), required=False)
        expires_at = serializers.DateTimeField(required=False)

    @extend_schema(responses=ApiKeyOutput)
    def get(self, request, prefix: str):
        return Response(ApiKeyOutput(key_get(request, prefix)).data)

    @extend_schema(request=ApiKeyUpdateInput, responses=ApiKeyOutput)
    def patch(self, request, prefix: str):
        api_key = key_get(request, prefix)
        data = self.ApiKeyUpdateInput(data=request.data)
        data.is_valid(raise_exception=True)
        api_key = api_key_update(api_key=api_key, actor=Actor.for_request(request), request=request,
                                 limit_to=perms.api_key_of(request), **data.validated_data)
        return Response(ApiKeyOutput(api_key).data)

    @extend_schema(request=None, responses=ApiKeyOutput)
    def delete(self, request, prefix: str):
        """Revokes the key (the row stays, for the audit trail and its jobs)."""
        api_key = api_key_revoke(api_key=key_get(request, prefix), actor=Actor.for_request(request), request=request)
        return Response(ApiKeyOutput(api_key).data)


class ApiKeyRevokeApi(APIView):
    @extend_schema(request=None, responses=ApiKeyOutput)
    def post(self, request, prefix: str):
        api_key = api_key_revoke(api_key=key_get(request, prefix), actor=Actor.for_request(request), request=request)
        return Response(ApiKeyOutput(api_key).data)


class LoginLockListApi(APIView):
    """Sign-in locks now in force; platform administrators lift them (after checking who asks)."""

    read_roles = frozenset()
    write_roles = frozenset()

    class LiftInput(serializers.Serializer):
        kind = serializers.ChoiceField(choices=LoginLock.Kind.choices)
        key = serializers.CharField(help_text="The username or the address.")

    @extend_schema(responses=LoginLockOutput(many=True))
    def get(self, request):
        from django.utils import timezone

        locks = LoginLock.objects.filter(until__gt=timezone.now()).order_by("until")
        return Response([{"kind": lock.kind, "key": lock.key, "until": lock.until} for lock in locks])

    @extend_schema(request=LiftInput, responses={200: OpenApiTypes.OBJECT})
    def post(self, request):
        data = self.LiftInput(data=request.data)
        data.is_valid(raise_exception=True)
        lifted = login_lock_lift(actor=Actor.for_request(request), request=request, **data.validated_data)
        if not lifted:
            raise NotFound("No such lock is in force.")
        return Response({"lifted": lifted})


class TotpStatusOutput(serializers.Serializer):
    enrolled = serializers.BooleanField()
    required = serializers.BooleanField(help_text="Whether the caller's role needs a second factor.")


class TotpEnrolOutput(serializers.Serializer):
    otpauth_uri = serializers.CharField()
    secret = serializers.CharField()


class SessionOnly(perms.RoleAccess):
    """A second factor is the person's, not a key's: these endpoints refuse API keys, and serve every
    role, auditors included (enrolling one's own second factor changes nothing else)."""

    def has_permission(self, request, view) -> bool:
        if not request.user or not request.user.is_authenticated:
            return False
        if perms.api_key_of(request) is not None:
            raise PermissionDenied("Enrol a second factor from a console session, not with an API key.",
                                   code="session_required")
        return True


class MeTotpApi(APIView):
    """The caller's TOTP: GET its state, POST to start an enrolment (the otpauth URI and secret, once)."""

    permission_classes = [SessionOnly]

    @extend_schema(responses=TotpStatusOutput)
    def get(self, request):
        return Response({"enrolled": totp.totp_enrolled(request.user), "required": totp.mfa_required(request.user)})

    @extend_schema(request=None, responses={201: TotpEnrolOutput})
    def post(self, request):
        device = totp.totp_enrol_start(user=request.user, request=request)
        return Response({"otpauth_uri": totp.provisioning_uri(device), "secret": device.secret},
                        status=status.HTTP_201_CREATED)


class MeTotpConfirmApi(APIView):
    permission_classes = [SessionOnly]

    class CodeInput(serializers.Serializer):
        code = serializers.CharField(max_length=8)

    @extend_schema(request=CodeInput, responses=TotpStatusOutput)
    def post(self, request):
        data = self.CodeInput(data=request.data)
        data.is_valid(raise_exception=True)
        totp.totp_confirm(user=request.user, code=data.validated_data["code"], request=request)
        request.session.pop(ENROL_REQUIRED, None)
        return Response({"enrolled": True, "required": totp.mfa_required(request.user)})


class UserTotpApi(APIView):
    """A platform administrator removes a user's second factor (a lost phone); the user enrols again at
    their next sign-in if their role needs one. Audited."""

    write_roles = frozenset()

    @extend_schema(responses={204: None})
    def delete(self, request, username: str):
        user = _user(username, param="username")
        if not TotpDevice.objects.filter(user=user).exists():
            raise NotFound(f"{username!r} has no second factor enrolled.")
        totp.totp_remove(user=user, actor=Actor.for_request(request), request=request)
        return Response(status=status.HTTP_204_NO_CONTENT)
