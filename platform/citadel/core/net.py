"""The client's address as the audit records it: REMOTE_ADDR, or X-Forwarded-For from a trusted proxy."""

from django.conf import settings


def client_address(request) -> str | None:
    remote = request.META.get("REMOTE_ADDR")
    forwarded = request.META.get("HTTP_X_FORWARDED_FOR")
    if forwarded and remote in settings.CITADEL_TRUSTED_PROXIES:
        return forwarded.split(",")[0].strip()
    return remote
