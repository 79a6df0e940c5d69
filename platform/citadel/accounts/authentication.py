"""DRF authentication by `Authorization: Bearer <API key>`; sets request.auth to the ApiKey."""

from rest_framework import authentication

from citadel.accounts.services import api_key_authenticate
from citadel.audit.services import Actor, audit_record
from citadel.core.exceptions import AuthenticationFailed
from citadel.core.net import client_address


def _audit_refused_key(request, key: str, error: AuthenticationFailed) -> None:
    """Record a refused key by its public prefix only; the presented secret is never stored."""
    parts = key.split("_", 2)
    prefix = parts[1][:16] if len(parts) == 3 else ""
    audit_record(actor=Actor("anonymous", "", prefix), action="api_key.authenticate", outcome="denied",
                 target_type="api_key", target_id=prefix, request=request, details={"reason": error.code})


class ApiKeyAuthentication(authentication.BaseAuthentication):
    def authenticate(self, request):
        header = request.META.get("HTTP_AUTHORIZATION", "")
        if not header:
            return None
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise AuthenticationFailed("Send the API key as `Authorization: Bearer <key>`.")
        try:
            api_key = api_key_authenticate(key=key.strip(), source_address=client_address(request))
        except AuthenticationFailed as error:
            _audit_refused_key(request, key.strip(), error)
            raise
        return api_key.user, api_key

    def authenticate_header(self, request):
        return 'Bearer realm="citadel"'
