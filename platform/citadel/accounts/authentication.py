"""DRF authentication by `Authorization: Bearer <API key>`; sets request.auth to the ApiKey."""

from rest_framework import authentication

from citadel.accounts.services import api_key_authenticate
from citadel.core.exceptions import AuthenticationFailed
from citadel.core.net import client_address


class ApiKeyAuthentication(authentication.BaseAuthentication):
    def authenticate(self, request):
        header = request.META.get("HTTP_AUTHORIZATION", "")
        if not header:
            return None
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise AuthenticationFailed("Send the API key as `Authorization: Bearer <key>`.")
        api_key = api_key_authenticate(key=key.strip(), source_address=client_address(request))
        return api_key.user, api_key

    def authenticate_header(self, request):
        return 'Bearer realm="citadel"'
