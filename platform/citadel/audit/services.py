"""Writing audit records. Callers pass who, what and how it went; the request adds where from.

If the record cannot be written the exception propagates, so the action it describes fails
with it (fail closed, DESIGN.md).
"""

from dataclasses import dataclass

from citadel.audit.models import AuditRecord
from citadel.core.net import client_address


@dataclass(frozen=True)
class Actor:
    """Who acted: a user, an API key (with its owner) or the system itself."""

    type: str
    id: str = ""
    label: str = ""

    @classmethod
    def system(cls, label: str = "citadel") -> "Actor":
        return cls(AuditRecord.ActorType.SYSTEM, "", label)

    @classmethod
    def for_user(cls, user) -> "Actor":
        if user is None or not user.is_authenticated:
            return cls(AuditRecord.ActorType.ANONYMOUS)
        return cls(AuditRecord.ActorType.USER, str(user.pk), user.get_username())

    @classmethod
    def for_api_key(cls, api_key) -> "Actor":
        return cls(AuditRecord.ActorType.API_KEY, str(api_key.pk), f"{api_key.prefix} ({api_key.user.get_username()})")

    @classmethod
    def for_request(cls, request) -> "Actor":
        api_key = getattr(request, "auth", None)
        if api_key is not None and hasattr(api_key, "prefix"):
            return cls.for_api_key(api_key)
        return cls.for_user(getattr(request, "user", None))


def audit_record(
    *,
    actor: Actor,
    action: str,
    outcome: str,
    target_type: str = "",
    target_id: str = "",
    request=None,
    request_id: str = "",
    source_address: str | None = None,
    details: dict | None = None,
) -> AuditRecord:
    if request is not None:
        request_id = request_id or getattr(request, "request_id", "")
        source_address = source_address or client_address(request)
    return AuditRecord.objects.create(
        actor_type=actor.type,
        actor_id=actor.id,
        actor_label=actor.label,
        action=action,
        outcome=outcome,
        target_type=target_type,
        target_id=str(target_id),
        request_id=request_id,
        source_address=source_address,
        details=details or {},
    )
