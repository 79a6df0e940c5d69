"""The OpenID Connect client (authlib): discovery from the issuer, authorization code with PKCE
(S256), state and nonce kept in the session and checked on return, the ID token's signature
checked against the provider's published keys (JWKS), and its issuer, audience and expiry.

A client is made per sign-in from the settings, so a settings change needs no restart and no
client object outlives a request (the provider's metadata is fetched at each sign-in: sign-ins
are rare next to API calls).
"""

from authlib.integrations.django_client import OAuth
from django.conf import settings

NAME = "citadel_oidc"


def oidc_enabled() -> bool:
    return bool(settings.CITADEL_OIDC_ISSUER and settings.CITADEL_OIDC_CLIENT_ID)


def oidc_client():
    issuer = settings.CITADEL_OIDC_ISSUER.rstrip("/")
    oauth = OAuth()
    return oauth.register(
        name=NAME,
        client_id=settings.CITADEL_OIDC_CLIENT_ID,
        client_secret=settings.CITADEL_OIDC_CLIENT_SECRET,
        server_metadata_url=f"{issuer}/.well-known/openid-configuration",
        client_kwargs={"scope": settings.CITADEL_OIDC_SCOPES, "code_challenge_method": "S256"},
    )
