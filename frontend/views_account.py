"""Console sign-in and the account pages: password (with lockout), the TOTP step, TOTP enrolment,
single sign-on, and the caller's teams, roles and API keys.

Sign-in ends in citadel.accounts.signin (the second factor, shared with single sign-on): a user
with a confirmed TOTP device finishes at /login/totp/; one who must have a second factor
(platform administrators, admins, operators) but has none is signed in only to enrol one at
/account/totp/ (citadel.accounts.middleware). Django's login() rotates the session id.
"""

import time

from django.conf import settings
from django.contrib import auth
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.http import Http404
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme

from citadel.accounts import permissions as perms
from citadel.accounts.lockout import login_lock_active
from citadel.accounts.middleware import ENROL_REQUIRED
from citadel.accounts.models import ApiKey, EndpointGroup, Membership, Role, Team, TotpDevice
from citadel.accounts.services import api_key_create, api_key_revoke
from citadel.accounts.signin import PENDING, PENDING_SECONDS, sign_in_complete
from citadel.accounts.totp import (
    provisioning_uri,
    totp_confirm,
    totp_enrol_start,
    totp_enrolled,
    totp_verify,
)
from citadel.audit.services import Actor, audit_record
from citadel.core.exceptions import CitadelError, NotFound
from citadel.core.net import client_address


class LoginView(auth_views.LoginView):
    template_name = "frontend/login.html"
    redirect_authenticated_user = True

    def get_context_data(self, **kwargs):
        context = super().get_context_data(**kwargs)
        lock = getattr(self.request, "citadel_lock", None)
        context["locked_until"] = lock.until if lock else None
        context["sso_enabled"] = bool(settings.CITADEL_OIDC_ISSUER)
        return context

    def form_valid(self, form):
        user = form.get_user()
        if not perms.is_platform_admin(user) and perms.user_roles(user) == {Role.APPLICATION}:
            # Service accounts call the API with keys; a console session would be a password to steal.
            audit_record(actor=Actor.for_user(user), action="user.login", outcome="denied", target_type="user",
                         target_id=user.get_username(), request=self.request,
                         details={"reason": "application_account"})
            form.add_error(None, "Application accounts use API keys; they do not sign in to the console.")
            return self.form_invalid(form)
        return sign_in_complete(self.request, user, backend=user.backend, next_url=self.get_success_url())


def login_totp(request):
    """The second step of a password sign-in: the current code from the user's authenticator app."""
    pending = request.session.get(PENDING)
    if not pending or time.time() - pending["at"] > PENDING_SECONDS:
        request.session.pop(PENDING, None)
        return redirect("frontend:login")
    user = auth.get_user_model().objects.filter(pk=pending["user"], is_active=True).first()
    if user is None:
        return redirect("frontend:login")
    error = None
    if request.method == "POST":
        lock = login_lock_active(username=user.get_username(), address=client_address(request))
        if lock is not None:
            error = f"Too many failed attempts: signing in is locked until {lock.until:%H:%M} UTC."
        elif totp_verify(user=user, code=request.POST.get("code", ""), request=request):
            del request.session[PENDING]
            auth.login(request, user, backend=pending["backend"])  # a new session id
            nxt = pending.get("next") or settings.LOGIN_REDIRECT_URL
            if not url_has_allowed_host_and_scheme(nxt, allowed_hosts={request.get_host()}):
                nxt = reverse(settings.LOGIN_REDIRECT_URL)
            return redirect(nxt)
        else:
            error = "That code is not right. Enter the current code from your authenticator app."
    return render(request, "frontend/login_totp.html", {"error": error}, status=400 if error else 200)


def _qr_svg(uri: str) -> str | None:
    """The otpauth URI as an inline SVG QR code, when the qrcode package is installed."""
    try:
        import qrcode
        import qrcode.image.svg
    except ImportError:
        return None
    image = qrcode.make(uri, image_factory=qrcode.image.svg.SvgPathImage, box_size=8)
    return image.to_string(encoding="unicode")


@login_required
def account_totp(request):
    """Enrol an authenticator app: the otpauth URI (and a QR code), then a first code confirms it."""
    error = None
    if totp_enrolled(request.user):
        request.session.pop(ENROL_REQUIRED, None)
        return render(request, "frontend/account_totp.html", {"enrolled": True})
    if request.method == "POST":
        try:
            totp_confirm(user=request.user, code=request.POST.get("code", ""), request=request)
        except CitadelError as exc:
            error = exc.message
        else:
            request.session.pop(ENROL_REQUIRED, None)
            request.session.cycle_key()
            return redirect("frontend:account")
    device = TotpDevice.objects.filter(user=request.user).first()
    if device is None or request.GET.get("new"):
        device = totp_enrol_start(user=request.user, request=request)
    uri = provisioning_uri(device)
    return render(request, "frontend/account_totp.html",
                  {"enrolled": False, "uri": uri, "secret": device.secret, "qr_svg": _qr_svg(uri), "error": error,
                   "required": request.session.get(ENROL_REQUIRED, False)}, status=400 if error else 200)


@login_required
def account_page(request):
    """The caller's roles, teams and API keys (their teams' keys, as the management API shows them)."""
    created = None
    error = None
    if request.method == "POST":
        try:
            created = _account_post(request)
        except CitadelError as exc:
            error = exc.message
    keys = perms.scope(request.user, ApiKey.objects.select_related("user", "team", "quota"))
    memberships = Membership.objects.filter(user=request.user).select_related("team")
    return render(request, "frontend/account.html", {
        "memberships": memberships, "roles": sorted(perms.user_roles(request.user)),
        "platform_admin": perms.is_platform_admin(request.user), "keys": keys, "created": created,
        "error": error, "groups": EndpointGroup.choices, "totp_enrolled": totp_enrolled(request.user),
        "can_write": perms.has_role(request.user, perms.WRITE_ROLES | perms.USE_ROLES)
        and not perms.is_auditor_only(request.user),
    }, status=400 if error else 200)


def _account_post(request):
    from citadel.core.exceptions import PermissionDenied

    if perms.is_auditor_only(request.user):
        raise PermissionDenied("Auditors read; they change nothing.")
    actor = Actor.for_user(request.user)
    if request.POST.get("action") == "revoke":
        api_key = perms.object_get(request.user, ApiKey.objects.all(), what="API key",
                                   prefix=request.POST.get("prefix", ""))
        api_key_revoke(api_key=api_key, actor=actor, request=request)
        return None
    team = None
    if request.POST.get("team"):
        team = perms.object_get(request.user, Team.objects.all(), team_field="pk", owner_field=None,
                                what="team", name=request.POST["team"])
    days = request.POST.get("expires_in_days") or None
    return api_key_create(user=request.user, name=request.POST.get("name", ""), team=team, actor=actor,
                          request=request, scopes=request.POST.getlist("scopes") or None,
                          expires_in_days=int(days) if days and days.isdigit() else None)


@login_required
def team_page(request, name: str):
    """A team's members and roles, and its quota; the team's admins (and platform administrators)
    add members and change or remove roles here, with the same checks as the management API."""
    from citadel.accounts.services import membership_remove, membership_set
    from citadel.quotas.models import Quota

    try:
        team = perms.object_get(request.user, Team.objects.all(), team_field="pk", owner_field=None, what="team",
                                name=name)
    except NotFound:
        raise Http404(f"No team named {name!r}.") from None
    error = None
    can_manage = perms.is_platform_admin(request.user) or team.pk in perms.team_ids(request.user, {Role.ADMIN})
    if request.method == "POST" and request.POST.get("action") == "quota":
        error = _team_quota_post(request, team)
    elif request.method == "POST":
        try:
            perms.team_role_required(request.user, team, {Role.ADMIN})
            user = auth.get_user_model().objects.filter(username=request.POST.get("user", "")).first()
            if user is None:
                raise NotFound(f"No user named {request.POST.get('user', '')!r}.")
            previous = team.memberships.filter(user=user).first()
            role = request.POST.get("role") or None
            perms.role_grant_check(request.user, role, previous.role if previous else None)
            if request.POST.get("action") == "remove":
                membership_remove(team=team, user=user, actor=Actor.for_user(request.user), request=request)
            else:
                membership_set(team=team, user=user, role=role or "", actor=Actor.for_user(request.user),
                               request=request)
        except CitadelError as exc:
            error = exc.message
    return render(request, "frontend/team.html", {
        "team": team, "memberships": team.memberships.select_related("user"), "roles": Role.choices,
        "quota": Quota.objects.filter(team=team).first(), "can_manage": can_manage, "error": error,
        "can_set_quota": perms.is_platform_admin(request.user), "limits": Quota.LIMITS,
    }, status=400 if error else 200)


def _team_quota_post(request, team) -> str | None:
    """A platform administrator sets the team's quota (a team does not raise its own ceiling)."""
    from citadel.quotas.models import Quota
    from citadel.quotas.services import quota_set

    if not perms.is_platform_admin(request.user):
        return "Only a platform administrator sets a team's quota."
    limits = {}
    for name in Quota.LIMITS:
        value = (request.POST.get(name) or "").strip()
        try:
            limits[name] = None if not value else (float(value) if name == "gpu_hours_per_month" else int(value))
        except ValueError:
            return f"{name} must be a number, or empty for no limit."
    try:
        quota_set(team=team, limits=limits, actor=Actor.for_user(request.user), request=request)
    except CitadelError as exc:
        return exc.message
    return None


@login_required
def account_password(request):
    """Change one's own password (the current one first; Django's validators); the user's other
    sessions end, since whoever knew the old password may hold one. Audited."""
    from django.contrib.auth.forms import PasswordChangeForm

    from frontend.session_info import sessions_end_others

    done = None
    form = PasswordChangeForm(request.user, request.POST or None)
    if request.method == "POST" and form.is_valid():
        form.save()
        auth.update_session_auth_hash(request, form.user)  # this session stays signed in
        ended = sessions_end_others(request.user, request.session.session_key)
        audit_record(actor=Actor.for_user(request.user), action="user.password_change", outcome="success",
                     target_type="user", target_id=request.user.get_username(), request=request,
                     details={"other_sessions_ended": ended})
        done = f"Password changed; {ended} other session(s) ended."
        form = PasswordChangeForm(request.user)
    status = 400 if request.method == "POST" and done is None else 200
    return render(request, "frontend/account_password.html", {"form": form, "done": done}, status=status)


@login_required
def account_sessions(request):
    """The user's active console sessions (when and from where they signed in); revoke any of them."""
    from frontend.session_info import session_revoke, sessions_of

    done = error = None
    if request.method == "POST":
        public_id = request.POST.get("session", "")
        if session_revoke(request.user, public_id):
            audit_record(actor=Actor.for_user(request.user), action="user.session_revoke", outcome="success",
                         target_type="user", target_id=request.user.get_username(), request=request,
                         details={"session": public_id})
            if not request.user.is_authenticated or not request.session.exists(request.session.session_key):
                return redirect("frontend:login")  # they ended the session they were using
            done = "Session ended."
        else:
            error = "No such session of yours is active: it may have ended already. Reload the list."
    return render(request, "frontend/account_sessions.html",
                  {"sessions": sessions_of(request.user, request.session.session_key), "done": done,
                   "error": error}, status=404 if error else 200)
