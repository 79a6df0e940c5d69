"""Console pages for the identity settings that were reachable only through the management API:
single sign-on group mappings, the quota of each API key, and sign-in locks.

Each page asks the same questions as its API view (citadel.accounts.permissions) and writes through
the same audited services (citadel.sso.services, citadel.quotas.services, citadel.accounts.lockout):

- group mappings: auditors and platform administrators read, platform administrators change
  (GroupMappingListCreateApi);
- a key's quota: whoever sees the key reads it; platform administrators and the admins of the key's
  team set it (KeyQuotaApi);
- sign-in locks: platform administrators only (LoginLockListApi).

Forms post with htmx and get back the fragment they sit in; without JavaScript they post the page
and follow a redirect, so a reload never repeats a change.
"""

from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied as ConsoleDenied
from django.db import transaction
from django.http import Http404
from django.shortcuts import redirect, render
from django.utils import timezone

from citadel.accounts import permissions as perms
from citadel.accounts.lockout import login_lock_lift
from citadel.accounts.models import ApiKey, LoginLock, Role, Team
from citadel.audit.services import Actor
from citadel.core.exceptions import CitadelError, InvalidRequest, NotFound, PermissionDenied
from citadel.quotas.apis import QuotaSerializer
from citadel.quotas.models import Quota
from citadel.quotas.services import quota_set
from citadel.sso.models import GroupMapping
from citadel.sso.services import group_mapping_create, group_mapping_delete, group_mapping_get

PLATFORM_ADMINS = frozenset()
"""role_required(PLATFORM_ADMINS): no team role is enough, only a platform administrator passes."""
LIMIT_LABELS = (("requests_per_minute", "Requests per minute"), ("tokens_per_minute", "Tokens per minute"),
                ("tokens_per_month", "Tokens per month"),
                ("gpu_hours_per_month", "Fine-tuning GPU-hours per month"))
assert tuple(name for name, _ in LIMIT_LABELS) == Quota.LIMITS


def _answer(request, *, page: str, fragment: str, context: dict, error: CitadelError | None):
    """The fragment for htmx (always 2xx, which htmx swaps, with any refusal shown in it); for a plain
    form the page with the refusal's status, or a redirect back to the page after a change."""
    context["error"] = error.message if error else None
    if request.htmx:
        return render(request, fragment, context)
    if request.method == "POST" and error is None:
        return redirect(request.path)
    return render(request, page, context, status=error.status if error else 200)


# Single sign-on group mappings ---------------------------------------------------------------------------

def _team_named(name: str) -> Team | None:
    """The team a mapping names (platform administrators see every team), as the API looks it up."""
    if not name:
        return None
    team = Team.objects.filter(name=name).first()
    if team is None:
        raise NotFound(f"No team named '{name}'.", param="team")
    return team


def _mapping_fields(post) -> dict:
    return {"team": _team_named(post.get("team", "").strip()), "role": post.get("role") or Role.ML_ENGINEER,
            "platform_admin": post.get("platform_admin") in ("on", "true", "1")}


def _mapping_post(request) -> str:
    """Add, change or remove one mapping; returns what was done, for the page to say."""
    actor, action = Actor.for_user(request.user), request.POST.get("action", "create")
    if action == "create":
        mapping = group_mapping_create(group=request.POST.get("group", ""), actor=actor, request=request,
                                       **_mapping_fields(request.POST))
        return f"Mapped {mapping}."
    pk = request.POST.get("id", "")
    if not pk.isdigit():
        raise InvalidRequest("Say which mapping: its id is missing.", param="id")
    mapping = group_mapping_get(pk=int(pk))
    if action == "delete":
        group_mapping_delete(mapping=mapping, actor=actor, request=request)
        return f"Removed {mapping}."
    if action == "change":
        # The API has no update: a change is the removal and the new mapping, both audited, in one transaction.
        with transaction.atomic():
            group = mapping.group
            group_mapping_delete(mapping=mapping, actor=actor, request=request)
            changed = group_mapping_create(group=group, actor=actor, request=request, **_mapping_fields(request.POST))
        return f"Changed to {changed}."
    raise InvalidRequest(f"Unknown action '{action}'; use create, change or delete.", param="action")


@perms.role_required(perms.OVERSIGHT_ROLES)
def sso_mappings_page(request):
    """Which identity provider groups give which team and role (auditors read, platform administrators change)."""
    error, done = None, None
    if request.method == "POST":
        if not perms.is_platform_admin(request.user):
            raise ConsoleDenied("Only a platform administrator changes group mappings.")
        try:
            done = _mapping_post(request)
        except CitadelError as exc:
            error = exc
    context = {"mappings": GroupMapping.objects.select_related("team"), "teams": Team.objects.order_by("name"),
               "roles": Role.choices, "can_change": perms.is_platform_admin(request.user), "done": done}
    return _answer(request, page="frontend/identity/sso_mappings.html",
                   fragment="frontend/identity/_sso_mappings.html", context=context, error=error)


# Sign-in locks ---------------------------------------------------------------------------------------------

@perms.role_required(PLATFORM_ADMINS)
def login_locks_page(request):
    """Accounts and addresses that the lockout refuses now; a platform administrator lifts one."""
    error, done = None, None
    if request.method == "POST":
        kind, key = request.POST.get("kind", ""), request.POST.get("key", "")
        try:
            if kind not in LoginLock.Kind.values:
                raise InvalidRequest(f"kind must be one of {', '.join(LoginLock.Kind.values)}.", param="kind")
            if not login_lock_lift(kind=kind, key=key, actor=Actor.for_user(request.user), request=request):
                raise NotFound("No such lock is in force.")
            done = f"Lifted the lock on {kind} {key}."
        except CitadelError as exc:
            error = exc
    context = {"locks": LoginLock.objects.filter(until__gt=timezone.now()).order_by("until"), "done": done}
    return _answer(request, page="frontend/identity/login_locks.html",
                   fragment="frontend/identity/_login_locks.html", context=context, error=error)


# API key quotas ----------------------------------------------------------------------------------------

def _may_set_key_quota(user, api_key: ApiKey) -> bool:
    """KeyQuotaApi's rule: platform administrators, and the admins of the key's team (a personal key's
    quota is the platform administrators' to set)."""
    try:
        perms.team_role_required(user, api_key.team, {Role.ADMIN})
    except PermissionDenied:
        return False
    return not perms.is_auditor_only(user)


def _serializer_message(errors: dict) -> str:
    return "; ".join(f"{name}: {' '.join(str(m) for m in messages)}" for name, messages in errors.items())


@login_required
def key_quota_page(request, prefix: str):
    """One key's limits; a form for those who may set them (the same checks, in the same order, as
    PUT /api/v1/keys/<prefix>/quota/: an admin role, then the key in sight, then admin of its team)."""
    posting = request.method == "POST"
    if posting and not perms.has_role(request.user, {Role.ADMIN}):
        raise ConsoleDenied("Setting a key's quota needs the admin role of the key's team.")
    try:
        api_key = perms.object_get(request.user, ApiKey.objects.select_related("user", "team"), what="API key",
                                   prefix=prefix)
    except NotFound as exc:
        raise Http404(exc.message) from None
    can_set = _may_set_key_quota(request.user, api_key)
    error, done = None, None
    if posting:
        if not can_set:
            raise ConsoleDenied("Only a platform administrator or an admin of the key's team sets its quota.")
        data = QuotaSerializer(data=request.POST)
        try:
            if not data.is_valid():
                raise InvalidRequest(_serializer_message(data.errors))
            quota_set(api_key=api_key, limits=dict(data.validated_data), actor=Actor.for_user(request.user),
                      request=request)
            done = "Quota saved."
        except CitadelError as exc:
            error = exc
    quota = Quota.objects.filter(api_key=api_key).first()
    limits = [(name, label, getattr(quota, name) if quota else None) for name, label in LIMIT_LABELS]
    context = {"key": api_key, "quota": quota, "limits": limits, "can_set": can_set, "done": done}
    return _answer(request, page="frontend/identity/key_quota.html", fragment="frontend/identity/_key_quota.html",
                   context=context, error=error)
