"""Reads for usage: whose records a caller sees, totals grouped by key, team, model or day, and the
tokens a quota counts.

Who sees what follows citadel.accounts.permissions: a signed-in user the records of their teams and
their own team-less ones (platform administrators all); an API key its team's (or its user's own).
"""

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db.models import Count, QuerySet, Sum
from django.db.models.functions import Coalesce, TruncDay
from django.utils import timezone

from citadel.accounts.permissions import scope
from citadel.core.exceptions import InvalidRequest
from citadel.usage.models import UsageRecord

GROUPS = {"key": "api_key__prefix", "team": "team__name", "model": "model_name", "day": "day", "kind": "kind"}


@dataclass(frozen=True)
class UsageRow:
    group: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    gpu_seconds: float

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def usage_visible(*, request=None, user=None) -> QuerySet[UsageRecord]:
    records = UsageRecord.objects.select_related("api_key", "team")
    api_key = getattr(request, "auth", None) if request is not None else None
    if api_key is not None and hasattr(api_key, "prefix"):
        if api_key.team_id:
            return records.filter(team_id=api_key.team_id)
        return records.filter(user=api_key.user, team__isnull=True)
    return scope(user if user is not None else request.user, records)


def usage_window(*, days) -> datetime:
    try:
        value = int(days)
    except (TypeError, ValueError):
        value = 0
    if not 1 <= value <= 3660:
        raise InvalidRequest("days must be a whole number from 1 to 3660.", param="days")
    return timezone.now() - timedelta(days=value)


def usage_filter(records: QuerySet, *, since: datetime | None = None, team: str | None = None,
                 model: str | None = None, key: str | None = None) -> QuerySet:
    if since is not None:
        records = records.filter(created_at__gte=since)
    if team:
        records = records.filter(team__name=team)
    if model:
        records = records.filter(model_name=model)
    if key:
        records = records.filter(api_key__prefix=key)
    return records


def usage_totals(records: QuerySet, *, by: str) -> list[UsageRow]:
    """Sums per group (`by`: key, team, model, day or kind), largest total tokens first (days in order)."""
    if by not in GROUPS:
        raise InvalidRequest(f"by must be one of {', '.join(GROUPS)}.", param="by")
    if by == "day":
        records = records.annotate(day=TruncDay("created_at"))
    rows = (records.values(GROUPS[by]).annotate(
        requests=Coalesce(Sum("requests"), 0), prompt=Coalesce(Sum("prompt_tokens"), 0),
        completion=Coalesce(Sum("completion_tokens"), 0), gpu=Coalesce(Sum("gpu_seconds"), 0.0), n=Count("pk"))
        .order_by(GROUPS[by]))
    result = []
    for row in rows:
        group = row[GROUPS[by]]
        label = group.date().isoformat() if by == "day" and group else (group or "(none)")
        result.append(UsageRow(str(label), row["requests"], row["prompt"], row["completion"], float(row["gpu"])))
    if by != "day":
        result.sort(key=lambda r: (-r.total_tokens, -r.gpu_seconds, r.group))
    return result


def usage_sum(records: QuerySet) -> UsageRow:
    row = records.aggregate(requests=Coalesce(Sum("requests"), 0), prompt=Coalesce(Sum("prompt_tokens"), 0),
                            completion=Coalesce(Sum("completion_tokens"), 0), gpu=Coalesce(Sum("gpu_seconds"), 0.0))
    return UsageRow("all", row["requests"], row["prompt"], row["completion"], float(row["gpu"]))


def tokens_used(*, api_key_id=None, team_id=None, since: datetime, kinds=None) -> tuple[int, datetime | None]:
    """Tokens metered for a key or a team since `since`, and when the first of them was (for quotas)."""
    from django.db.models import Min

    records = UsageRecord.objects.filter(created_at__gte=since)
    records = records.filter(api_key_id=api_key_id) if api_key_id else records.filter(team_id=team_id)
    if kinds:
        records = records.filter(kind__in=kinds)
    row = records.aggregate(used=Coalesce(Sum("prompt_tokens"), 0) + Coalesce(Sum("completion_tokens"), 0),
                            first=Min("created_at"))
    return row["used"], row["first"]
