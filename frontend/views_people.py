"""Console pages for people and their keys: teams (with each team's quota against this month's use),
users and their roles, and API keys (a new key's secret shown once; revoking asks first).

The checks are the permission module's (citadel.accounts.permissions) and the writes the audited
services of citadel.accounts, as the management API does them. A team's members and roles are changed
on the team's own page (frontend.views_account.team_page); the usage charts are the usage page's.
"""

from django.contrib.auth import get_user_model
from django.contrib.auth.decorators import login_required
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import PermissionDenied as ConsoleDenied
from django.core.exceptions import ValidationError
from django.core.paginator import Paginator
from django.db import transaction
from django.shortcuts import render
from django.utils import timezone

from citadel.accounts import permissions as perms
from citadel.accounts.models import ApiKey, EndpointGroup, Membership, Role, Team
from citadel.accounts.services import team_create
from citadel.audit.services import Actor, audit_record
from citadel.core.exceptions import CitadelError, Conflict, InvalidRequest
from citadel.quotas.limiter import gpu_hours_used
from citadel.quotas.models import Quota
from citadel.usage.selectors import tokens_used
from frontend.nav import PLATFORM_ADMINS

PAGE_SIZE = 50


def _month_start():
    return timezone.now().replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def _team_use(team: Team, since) -> dict:
    """This month's tokens and GPU-hours of a team against its quota, as fractions for a <meter>."""
    quota = Quota.objects.filter(team=team).first()
    tokens, _ = tokens_used(team_id=team.pk, since=since)
    hours = gpu_hours_used(team=team, since=since)
    token_limit = quota.tokens_per_month if quota else None
    hour_limit = quota.gpu_hours_per_month if quota else None
    return {"tokens": tokens, "token_limit": token_limit, "hours": hours, "hour_limit": hour_limit,
            "quota": quota}


@login_required
def teams_page(request):
    """The teams the user is in (every team, for platform administrators), each with its members and
    this month's use against its quota; platform administrators create teams here."""
    error = done = None
    form = {"name": "", "description": ""}
    if request.method == "POST":
        if not perms.is_platform_admin(request.user):
            raise ConsoleDenied("Only a platform administrator creates teams.")
        form = {key: request.POST.get(key, "").strip() for key in form}
        try:
            team = team_create(name=form["name"], description=form["description"],
                               actor=Actor.for_user(request.user), request=request)
            done, form = f"Created team {team.name}.", {"name": "", "description": ""}
        except CitadelError as exc:
            error = exc
    teams = perms.scope(request.user, Team.objects.order_by("name"), team_field="pk", owner_field=None)
    page = Paginator(teams, PAGE_SIZE).get_page(request.GET.get("page"))
    since = _month_start()
    rows = [{"team": team, "members": team.memberships.count(), **_team_use(team, since)} for team in page]
    return render(request, "frontend/people/teams.html", {
        "rows": rows, "page": page, "form": form, "done": done, "error": error,
        "error_field": getattr(error, "param", None), "can_create": perms.is_platform_admin(request.user),
    }, status=error.status if error else 200)


def _user_create(*, username: str, password: str, email: str, team: Team | None, role: str, request):
    """A local account (and its first membership); audited, as every change of who may do what."""
    User = get_user_model()
    if not username:
        raise InvalidRequest("username is required.", param="username")
    if User.objects.filter(username=username).exists():
        raise Conflict(f"A user named '{username}' already exists.", param="username")
    try:
        validate_password(password, User(username=username, email=email))
    except ValidationError as exc:
        raise InvalidRequest("password: " + " ".join(exc.messages), param="password") from None
    if team is not None and role not in Role.values:
        raise InvalidRequest(f"role must be one of {', '.join(Role.values)}.", param="role")
    from citadel.accounts.services import membership_set

    with transaction.atomic():
        user = User.objects.create_user(username, email=email, password=password)
        audit_record(actor=Actor.for_user(request.user), action="user.create", outcome="success",
                     target_type="user", target_id=username, request=request,
                     details={"team": team.name if team else None, "role": role if team else None})
        if team is not None:
            membership_set(team=team, user=user, role=role, actor=Actor.for_user(request.user), request=request)
    return user


@perms.role_required(PLATFORM_ADMINS)
def users_page(request):
    """Every account with its teams and roles (filter by name or team); platform administrators add a
    local account with its first team and role. Roles are changed on each team's page."""
    error = done = None
    form = {"username": "", "email": "", "team": "", "role": Role.ML_ENGINEER}
    if request.method == "POST":
        form = {key: request.POST.get(key, default).strip() for key, default in form.items()}
        try:
            team = None
            if form["team"]:
                team = Team.objects.filter(name=form["team"]).first()
                if team is None:
                    raise InvalidRequest(f"No team named '{form['team']}'.", param="team")
            user = _user_create(username=form["username"], password=request.POST.get("password", ""),
                                email=form["email"], team=team, role=form["role"], request=request)
            done, form = f"Created user {user.username}.", {**form, "username": "", "email": ""}
        except CitadelError as exc:
            error = exc
    query = request.GET.get("q", "").strip()
    team_filter = request.GET.get("team", "").strip()
    users = get_user_model().objects.order_by("username")
    if query:
        users = users.filter(username__icontains=query)
    if team_filter:
        users = users.filter(memberships__team__name=team_filter)
    page = Paginator(users, PAGE_SIZE).get_page(request.GET.get("page"))
    memberships = {}
    for m in Membership.objects.filter(user__in=list(page)).select_related("team").order_by("team__name"):
        memberships.setdefault(m.user_id, []).append(m)
    rows = [{"user": user, "memberships": memberships.get(user.pk, [])} for user in page]
    return render(request, "frontend/people/users.html", {
        "rows": rows, "page": page, "q": query, "team_filter": team_filter, "form": form, "done": done,
        "error": error, "error_field": getattr(error, "param", None), "teams": Team.objects.order_by("name"),
        "roles": Role.choices,
    }, status=error.status if error else 200)


@login_required
def keys_page(request):
    """The API keys the user may see (their teams'); create one (its secret is shown on this answer
    only, never again) or revoke one after a confirmation. Auditors read."""
    from frontend.views_account import _account_post

    created = error = None
    if request.method == "POST":
        try:
            created = _account_post(request)
        except CitadelError as exc:
            error = exc
    keys = perms.scope(request.user, ApiKey.objects.select_related("user", "team", "quota").order_by("-created_at"))
    show = request.GET.get("show", "active")
    if show == "active":
        keys = keys.filter(revoked_at__isnull=True)
    page = Paginator(keys, PAGE_SIZE).get_page(request.GET.get("page"))
    memberships = Membership.objects.filter(user=request.user).select_related("team")
    return render(request, "frontend/people/keys.html", {
        "keys": page, "page": page, "show": show, "created": created, "error": error,
        "error_field": getattr(error, "param", None), "memberships": memberships, "groups": EndpointGroup.choices,
        "can_write": perms.has_role(request.user, perms.WRITE_ROLES | perms.USE_ROLES)
        and not perms.is_auditor_only(request.user),
    }, status=error.status if error else 200)
