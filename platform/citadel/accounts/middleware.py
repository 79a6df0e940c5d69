"""Holds a console session that still owes its second factor to the enrolment page.

Set by the password sign-in (frontend.views_account) for users whose role needs TOTP and who have
none yet: until they enrol, console pages redirect to /account/totp/ and the management API
answers 403 to that session. Requests that carry an API key are the key's business, not the session's.
"""

from django.http import JsonResponse
from django.shortcuts import redirect

ENROL_REQUIRED = "citadel_mfa_enrol_required"
OPEN_PATHS = ("/account/totp/", "/logout/", "/login/", "/static/", "/healthz", "/readyz", "/metrics", "/sso/",
              "/api/v1/me/totp/")


class MfaEnrolmentMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        session = getattr(request, "session", None)
        if (session is not None and session.get(ENROL_REQUIRED) and request.user.is_authenticated
                and not request.path.startswith(OPEN_PATHS) and not request.META.get("HTTP_AUTHORIZATION")):
            if request.path.startswith(("/api/", "/admin/", "/v1/")):
                return JsonResponse({"detail": "Enrol a second factor first, at /account/totp/.",
                                     "code": "mfa_enrolment_required"}, status=403)
            return redirect("frontend:account-totp")
        return self.get_response(request)


class AuditorReadOnlyMiddleware:
    """Auditors change nothing, in the console either: any unsafe request of a session whose user is
    only an auditor is refused (403), whatever page it targets, except signing in and out. The API
    refuses them the same way (RoleAccess); this covers console views, present and future."""

    EXEMPT = ("/login/", "/logout/", "/account/totp/", "/account/password/", "/account/sessions/", "/sso/",
              "/api/v1/me/totp/")  # their own password and sessions are auditors' business too

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        from django.core.exceptions import PermissionDenied

        from citadel.accounts.permissions import is_auditor_only

        if (request.method not in ("GET", "HEAD", "OPTIONS", "TRACE") and request.user.is_authenticated
                and not request.path.startswith(self.EXEMPT) and not request.META.get("HTTP_AUTHORIZATION")
                and is_auditor_only(request.user)):
            if request.path.startswith(("/api/", "/v1/")):
                return JsonResponse({"detail": "Auditors read; they change nothing.", "code": "read_only_role"},
                                    status=403)
            raise PermissionDenied("Auditors read; they change nothing.")
        return self.get_response(request)
