"""Who may do what: the one module the management API, the OpenAI endpoints and the console ask.

Two questions, answered separately so that each endpoint states only what is special about it:

1. May this user (or this API key) call this endpoint with this method? `RoleAccess`, the default
   DRF permission class, reads three attributes of the view:
     endpoint_group   which group of an API key's scopes the endpoint belongs to (default from the path:
                      /v1/files files, /v1/fine_tuning fine_tuning, other /v1 inference, else management);
     read_roles       roles that may use safe methods (default: any signed-in user);
     write_roles      roles that may use unsafe methods (default: WRITE_ROLES in the management API, that is
                      not auditors nor applications; USE_ROLES under /v1, where applications work).
   A platform administrator (Django's is_staff or is_superuser) passes every role check.
   An auditor-only user is refused every unsafe method whatever the view says: auditors change nothing.

2. May they see this object? `scope()` narrows a queryset to the objects of the user's teams (and
   their own objects that belong to no team); `object_get()` fetches one object that way and answers
   404 for another team's object, so its existence is not leaked. Platform administrators see all.

A user in no team acts as an ML engineer on their own objects only (personal keys, their jobs).
The console uses `role_required` and the same `scope()`. PERMISSIONS.md (beside this file) says
what a new endpoint needs.
"""

from functools import wraps

from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied as ConsoleDenied
from django.db.models import Q, QuerySet
from rest_framework import permissions

from citadel.accounts.models import EndpointGroup, Membership, Role
from citadel.core.exceptions import NotFound, PermissionDenied

ALL_ROLES = frozenset(Role.values)
WRITE_ROLES = frozenset({Role.ADMIN, Role.OPERATOR, Role.ML_ENGINEER})
"""Who changes their team's objects through the management API by default."""
USE_ROLES = frozenset({Role.ADMIN, Role.OPERATOR, Role.ML_ENGINEER, Role.APPLICATION})
"""Who may run inference, upload files and submit fine-tuning jobs (the OpenAI endpoints)."""
REGISTRY_ROLES = frozenset({Role.OPERATOR})
"""Who manages models, worker pools, workers and deployments (besides platform administrators)."""
OVERSIGHT_ROLES = frozenset({Role.AUDITOR})
"""Who reads the audit log and residency policies (besides platform administrators)."""
MFA_ROLES = frozenset({Role.ADMIN, Role.OPERATOR})
"""Roles that must sign in to the console with a second factor (platform administrators too)."""


def is_platform_admin(user) -> bool:
    return bool(user and user.is_authenticated and user.is_active and (user.is_superuser or user.is_staff))


def user_roles(user) -> frozenset[str]:
    """The roles of `user` over all their teams; {ml_engineer} for a signed-in user in no team.

    Cached on the user object, which lives for one request: a role granted or removed applies
    from the next request on, in every process.
    """
    if not user or not user.is_authenticated:
        return frozenset()
    cached = getattr(user, "_citadel_roles", None)
    if cached is None:
        cached = frozenset(Membership.objects.filter(user=user).values_list("role", flat=True).distinct())
        if not cached:
            cached = frozenset({Role.ML_ENGINEER})
        user._citadel_roles = cached
    return cached


def has_role(user, roles) -> bool:
    return is_platform_admin(user) or bool(user_roles(user) & set(roles))


def is_auditor_only(user) -> bool:
    return not is_platform_admin(user) and user_roles(user) <= OVERSIGHT_ROLES and bool(user_roles(user))


def team_ids(user, roles=None) -> set[int]:
    """Ids of the teams `user` belongs to (with one of `roles`, when given)."""
    if not user or not user.is_authenticated:
        return set()
    memberships = Membership.objects.filter(user=user)
    if roles is not None:
        memberships = memberships.filter(role__in=list(roles))
    return set(memberships.values_list("team_id", flat=True))


def scope(user, queryset: QuerySet, *, team_field: str | None = "team", owner_field: str | None = "user") -> QuerySet:
    """`queryset` narrowed to what `user` may see: their teams' objects and their own team-less ones."""
    if is_platform_admin(user):
        return queryset
    if not user or not user.is_authenticated:
        return queryset.none()
    condition = Q(pk__in=[])
    if team_field:
        condition |= Q(**{f"{team_field}__in": team_ids(user)})
    if owner_field:
        owned = Q(**{owner_field: user})
        if team_field:
            owned &= Q(**{f"{team_field}__isnull": True})
        condition |= owned
    return queryset.filter(condition)


def object_get(user, queryset: QuerySet, *, team_field: str | None = "team", owner_field: str | None = "user",
               what: str = "object", param: str | None = None, **lookup):
    """The one object matching `lookup` that `user` may see, or NotFound (the same for another team's
    object as for a missing one, so ids of other teams' objects reveal nothing)."""
    found = scope(user, queryset, team_field=team_field, owner_field=owner_field).filter(**lookup).first()
    if found is None:
        described = ", ".join(f"{k} {v!r}" for k, v in lookup.items())
        raise NotFound(f"No {what} with {described}.", param=param)
    return found


def team_role_required(user, team, roles) -> None:
    """Refuse unless `user` is a platform administrator or holds one of `roles` in `team`."""
    if is_platform_admin(user):
        return
    if team is None or team.pk not in team_ids(user, roles):
        raise PermissionDenied(f"Only a team's {' or '.join(sorted(roles))} may do this in team "
                               f"'{team.name if team else '-'}'.")


PLATFORM_GRANTED_ROLES = frozenset({Role.OPERATOR, Role.AUDITOR})
"""Roles whose reach goes beyond the team (operators change the registry everywhere, auditors read the
whole audit trail): only platform administrators grant or take them, not a team's own admins."""


def role_grant_check(user, role: str | None, previous: str | None = None) -> None:
    """Refuse a team admin granting, changing or removing a role that reaches beyond the team."""
    if is_platform_admin(user):
        return
    for which in (role, previous):
        if which in PLATFORM_GRANTED_ROLES:
            raise PermissionDenied(f"Only a platform administrator grants or removes the {which} role.",
                                   code="role_required")


def api_key_of(request):
    auth = getattr(request, "auth", None)
    return auth if hasattr(auth, "scopes") and hasattr(auth, "prefix") else None


def endpoint_group_of(view, path: str) -> str:
    """The view's `endpoint_group`, or the one its path implies (so views that do not say are still scoped)."""
    declared = getattr(view, "endpoint_group", None)
    if declared:
        return declared
    if path.startswith("/v1/files"):
        return EndpointGroup.FILES
    if path.startswith("/v1/fine_tuning"):
        return EndpointGroup.FINE_TUNING
    if path.startswith("/v1/"):
        return EndpointGroup.INFERENCE
    return EndpointGroup.MANAGEMENT


def write_roles_of(view, path: str) -> frozenset[str]:
    """The view's `write_roles`, or by default: WRITE_ROLES in the management API, USE_ROLES under /v1."""
    declared = getattr(view, "write_roles", None)
    if declared is not None:
        return declared
    return USE_ROLES if path.startswith("/v1/") else WRITE_ROLES


class RoleAccess(permissions.BasePermission):
    """The default permission of every DRF view (REST_FRAMEWORK's DEFAULT_PERMISSION_CLASSES)."""

    def has_permission(self, request, view) -> bool:
        user = request.user
        if not user or not user.is_authenticated:
            return False
        api_key = api_key_of(request)
        group = endpoint_group_of(view, request.path)
        if api_key is not None and group not in api_key.scopes:
            raise PermissionDenied(f"This API key is not scoped for the '{group}' endpoints (its scopes: "
                                   f"{', '.join(api_key.scopes) or 'none'}).", code="insufficient_scope")
        safe = request.method in permissions.SAFE_METHODS
        if not safe and is_auditor_only(user):
            raise PermissionDenied("Auditors read; they change nothing.", code="read_only_role")
        roles = getattr(view, "read_roles", None) if safe else write_roles_of(view, request.path)
        if roles is None or has_role(user, roles):
            return True
        raise PermissionDenied(f"This needs one of the roles: {', '.join(sorted(roles))} "
                               f"(yours: {', '.join(sorted(user_roles(user)))}).", code="role_required")


def role_required(roles):
    """Console view decorator: signed in, and holding one of `roles` (platform administrators pass)."""

    def decorator(view):
        @wraps(view)
        def wrapped(request, *args, **kwargs):
            if not request.user.is_authenticated:
                return redirect_to_login(request.get_full_path())
            if request.method not in ("GET", "HEAD", "OPTIONS") and is_auditor_only(request.user):
                raise ConsoleDenied("Auditors read; they change nothing.")
            if not has_role(request.user, roles):
                raise ConsoleDenied("Your role does not allow this page.")
            return view(request, *args, **kwargs)

        return wrapped

    return decorator
