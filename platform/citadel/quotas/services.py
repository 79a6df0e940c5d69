"""Writes for quotas: set the limits of a team or an API key (audited)."""

from django.db import transaction

from citadel.audit.services import Actor, audit_record
from citadel.core.exceptions import InvalidRequest
from citadel.quotas.models import Quota


@transaction.atomic
def quota_set(*, actor: Actor, team=None, api_key=None, limits: dict, request=None) -> Quota:
    """Replace the limits of `team` or `api_key` (one of them); a limit left out or None is no limit."""
    assert (team is None) != (api_key is None)
    unknown = sorted(set(limits) - set(Quota.LIMITS))
    if unknown:
        raise InvalidRequest(f"Unknown limit {', '.join(unknown)}; the limits are {', '.join(Quota.LIMITS)}.")
    for name, value in limits.items():
        if value is not None and value < 0:
            raise InvalidRequest(f"{name} must not be negative.", param=name)
    quota, _ = Quota.objects.select_for_update().get_or_create(team=team, api_key=api_key)
    before = {name: getattr(quota, name) for name in Quota.LIMITS}
    for name in Quota.LIMITS:
        setattr(quota, name, limits.get(name))
    quota.save()
    audit_record(actor=actor, action="quota.set", outcome="success", target_type="team" if team else "api_key",
                 target_id=team.name if team else api_key.prefix, request=request,
                 details={"limits": {name: limits.get(name) for name in Quota.LIMITS}, "previous": before})
    return quota
