"""Admission against quotas, atomic across every web process and host.

Requests per minute are a sliding window of the last 60 seconds (not a fixed minute, which would let
twice the limit through around a minute's edge): in Redis a sorted set per quota, checked and
appended by one Lua script over the key's and the team's sets together (all or nothing, on Redis's
clock); without Redis, rows in the database counted under a lock on the quota row.

Tokens per minute and per month are read from the system of record, the jobs' token counts in the
database. They are checked at admission, so requests already running when a limit is reached may
overshoot it by what they use (as with every token limiter that cannot know a reply's length ahead).
"""

import math
import uuid
from datetime import datetime, timedelta
from functools import lru_cache

from django.conf import settings
from django.db import transaction
from django.db.models import Min, Q, Sum
from django.db.models.functions import Coalesce
from django.utils import timezone

from citadel.core.exceptions import RateLimited, ServiceUnavailable
from citadel.quotas.models import Quota, QuotaHit

WINDOW_SECONDS = 60

_SLIDING_WINDOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local wait = 0
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  local limit = tonumber(ARGV[2 + i])
  if redis.call('ZCARD', key) >= limit then
    local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    local w = window
    if oldest[2] then w = tonumber(oldest[2]) + window - now end
    if w > wait then wait = w end
  end
end
if wait > 0 then return wait end
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now, ARGV[2])
  redis.call('PEXPIRE', key, window)
end
return 0
"""


@lru_cache(maxsize=4)
def _redis_script(url: str):
    """One connection pool and registered script per process and URL (not state: a handle)."""
    import redis

    return redis.Redis.from_url(url).register_script(_SLIDING_WINDOW)


def _redis_admit(quotas: list[Quota]) -> float:
    """Milliseconds to wait, or 0 when admitted (and counted in every window)."""
    # The database's name keeps test runs that share one Redis apart; production has one database.
    database = settings.DATABASES["default"]["NAME"]
    keys = [f"citadel:quota:rpm:{database}:{quota.subject}" for quota in quotas]
    limits = [quota.requests_per_minute for quota in quotas]
    script = _redis_script(settings.CITADEL_QUOTA_REDIS_URL)
    return float(script(keys=keys, args=[WINDOW_SECONDS * 1000, uuid.uuid4().hex, *limits]))


@transaction.atomic
def _database_admit(quotas: list[Quota]) -> float:
    now = timezone.now()
    since = now - timedelta(seconds=WINDOW_SECONDS)
    wait = 0.0
    locked = list(Quota.objects.select_for_update().filter(pk__in=[q.pk for q in quotas]).order_by("pk"))
    for quota in locked:
        QuotaHit.objects.filter(quota=quota, at__lte=since).delete()
        hits = QuotaHit.objects.filter(quota=quota)
        if hits.count() >= quota.requests_per_minute:
            oldest = hits.aggregate(oldest=Min("at"))["oldest"] or now
            wait = max(wait, ((oldest - since).total_seconds()) * 1000 or WINDOW_SECONDS * 1000)
    if wait == 0:
        QuotaHit.objects.bulk_create([QuotaHit(quota=quota, at=now) for quota in locked])
    return wait


def _month_start(now: datetime) -> datetime:
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def _next_month(now: datetime) -> datetime:
    start = _month_start(now)
    return (start + timedelta(days=32)).replace(day=1)


def _tokens(condition: Q, since: datetime) -> tuple[int, datetime | None]:
    from citadel.jobs.models import InferenceJob
    from citadel.usage.models import UsageRecord

    row = InferenceJob.objects.filter(condition, created_at__gte=since).aggregate(
        used=Coalesce(Sum("prompt_tokens"), 0) + Coalesce(Sum("completion_tokens"), 0), first=Min("created_at"))
    # Batch lines run without job rows: the usage ledger (citadel.usage) is where they are metered.
    # (One-by-one jobs are metered there too, but are counted from their rows here, as before.)
    batches = UsageRecord.objects.filter(condition, kind=UsageRecord.Kind.BATCH, created_at__gte=since).aggregate(
        used=Coalesce(Sum("prompt_tokens"), 0) + Coalesce(Sum("completion_tokens"), 0), first=Min("created_at"))
    firsts = [first for first in (row["first"], batches["first"]) if first is not None]
    return row["used"] + batches["used"], min(firsts) if firsts else None


def _check_tokens(quota: Quota, now: datetime) -> None:
    condition = Q(api_key_id=quota.api_key_id) if quota.api_key_id else Q(team_id=quota.team_id)
    whose = "this API key" if quota.api_key_id else "this key's team"
    if quota.tokens_per_minute is not None:
        used, first = _tokens(condition, now - timedelta(seconds=WINDOW_SECONDS))
        if used >= quota.tokens_per_minute:
            wait = (first + timedelta(seconds=WINDOW_SECONDS) - now).total_seconds() if first else WINDOW_SECONDS
            raise RateLimited(f"Rate limit reached for {whose}: {used} of {quota.tokens_per_minute} tokens per "
                              "minute used. Retry after the time in the Retry-After header.",
                              retry_after=wait, code="rate_limit_exceeded", error_type="tokens")
    if quota.tokens_per_month is not None:
        used, _ = _tokens(condition, _month_start(now))
        if used >= quota.tokens_per_month:
            raise RateLimited(f"Monthly token quota of {whose} exhausted ({used} of {quota.tokens_per_month}).",
                              retry_after=(_next_month(now) - now).total_seconds(), code="insufficient_quota")


def quota_admit(*, api_key=None, team=None) -> None:
    """Admit one request made with `api_key` (or, for a console session, on behalf of `team`),
    counting it against the key's and the team's per-minute windows, or raise RateLimited (429,
    with the seconds to wait)."""
    condition = Q(pk__in=[])
    if api_key is not None:
        condition |= Q(api_key_id=api_key.pk)
        team = api_key.team
    if team is not None:
        condition |= Q(team_id=team.pk)
    quotas = list(Quota.objects.filter(condition))
    if not quotas:
        return
    now = timezone.now()
    for quota in quotas:
        _check_tokens(quota, now)
    per_minute = [quota for quota in quotas if quota.requests_per_minute is not None]
    if not per_minute:
        return
    if settings.CITADEL_QUOTA_REDIS_URL:
        import redis

        try:
            wait_ms = _redis_admit(per_minute)
        except redis.RedisError as error:  # fail closed: a quota that cannot be counted is not granted
            raise ServiceUnavailable("The quota store (Redis) is unavailable; retry shortly.",
                                     code="quota_store_unavailable") from error
    else:
        wait_ms = _database_admit(per_minute)
    if wait_ms > 0:
        raise RateLimited("Rate limit reached: requests per minute of this API key or its team. Retry after the "
                          "time in the Retry-After header.", retry_after=wait_ms / 1000, code="rate_limit_exceeded")


def gpu_hours_used(*, api_key=None, team=None, since: datetime) -> float:
    """Fine-tuning GPU-hours of the key's (or the team's) jobs since `since`: each job's running time
    (started to finished, or to now while it runs) on its one GPU, clipped to the period."""
    from citadel.finetuning.models import FineTuningJob

    now = timezone.now()
    condition = Q(api_key=api_key) if api_key is not None else Q(team=team)
    jobs = FineTuningJob.objects.filter(condition, started_at__isnull=False).filter(
        Q(finished_at__isnull=True) | Q(finished_at__gte=since))
    seconds = sum(max(0.0, ((finished or now) - max(started, since)).total_seconds())
                  for started, finished in jobs.values_list("started_at", "finished_at"))
    return seconds / 3600


def quota_gpu_hours_admit(*, api_key=None, team=None, requested_hours: float = 0.0,
                          used_hours: float | None = None) -> None:
    """Refuse a fine-tuning job (429, insufficient_quota) when the key's or its team's GPU-hours this
    month, plus `requested_hours` if the caller has an estimate, pass the monthly quota. Checked at
    admission: jobs already running may take the total past it, as with token quotas."""
    if team is None and api_key is not None:
        team = api_key.team
    now = timezone.now()
    condition = Q(pk__in=[])
    if api_key is not None:
        condition |= Q(api_key=api_key)
    if team is not None:
        condition |= Q(team=team)
    for quota in Quota.objects.filter(condition, gpu_hours_per_month__isnull=False):
        used = used_hours if used_hours is not None else gpu_hours_used(
            api_key=api_key if quota.api_key_id else None, team=team if quota.team_id else None,
            since=_month_start(now))
        if used + requested_hours >= quota.gpu_hours_per_month and (used > 0 or requested_hours > 0
                                                                   or quota.gpu_hours_per_month == 0):
            whose = "this API key" if quota.api_key_id else "the team"
            raise RateLimited(f"Fine-tuning GPU-hours quota of {whose} reached: {used:.2f} used"
                              + (f" and {requested_hours:.2f} asked" if requested_hours else "")
                              + f" of {quota.gpu_hours_per_month:.2f} this month.",
                              retry_after=(_next_month(now) - now).total_seconds(), code="insufficient_quota")


def retry_after_header(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))
