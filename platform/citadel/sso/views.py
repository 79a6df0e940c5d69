"""Console sign-in through the identity provider: /sso/login sends the browser there, /sso/callback
takes it back, checks what came back (client.py) and signs the user in with the memberships their
groups map to (services.oidc_sign_in). Every refusal is audited and shown without detail to leak."""

import logging

from authlib.common.errors import AuthlibBaseError
from django.conf import settings
from django.http import Http404
from django.shortcuts import render
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme

from citadel.accounts.signin import sign_in_complete
from citadel.audit.services import Actor, audit_record
from citadel.core.exceptions import CitadelError
from citadel.sso.client import oidc_client, oidc_enabled
from citadel.sso.services import oidc_sign_in

log = logging.getLogger(__name__)
NEXT = "citadel_sso_next"


def sso_login(request):
    if not oidc_enabled():
        raise Http404("Single sign-on is not configured.")
    nxt = request.GET.get("next") or ""
    request.session[NEXT] = nxt if url_has_allowed_host_and_scheme(nxt, allowed_hosts={request.get_host()}) else ""
    return oidc_client().authorize_redirect(request, request.build_absolute_uri(reverse("sso:callback")))


def sso_callback(request):
    if not oidc_enabled():
        raise Http404("Single sign-on is not configured.")
    try:
        token = oidc_client().authorize_access_token(request)  # state, code + PKCE verifier, ID token, nonce
        claims = token.get("userinfo")
        if not claims:
            raise AuthlibBaseError(error="missing_id_token", description="The provider sent no ID token.")
        user = oidc_sign_in(issuer=settings.CITADEL_OIDC_ISSUER.rstrip("/"), claims=dict(claims),
                            groups_claim=settings.CITADEL_OIDC_GROUPS_CLAIM, request=request)
    except (AuthlibBaseError, CitadelError) as error:
        message = getattr(error, "message", None) or "The identity provider's answer could not be verified."
        if isinstance(error, AuthlibBaseError):
            log.warning("OIDC sign-in refused: %s", error)
            audit_record(actor=Actor("anonymous"), action="sso.login", outcome="failure", target_type="oidc",
                         target_id=settings.CITADEL_OIDC_ISSUER[:200], request=request,
                         details={"error": str(getattr(error, "error", "")) [:100]})
        return render(request, "frontend/sso_error.html", {"message": message}, status=403)
    nxt = request.session.pop(NEXT, "") or reverse(settings.LOGIN_REDIRECT_URL)
    # Citadel's own second factor too, unless the provider is trusted to have asked for one.
    return sign_in_complete(request, user, backend="citadel.accounts.backends.LockoutModelBackend", next_url=nxt,
                            second_factor=not settings.CITADEL_OIDC_MFA_FROM_PROVIDER)
