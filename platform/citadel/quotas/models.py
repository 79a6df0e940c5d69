"""Quotas per API key and per team: requests and tokens per minute, tokens and fine-tuning GPU-hours per month.

A request made with a key is admitted only when both the key's quota and its team's allow it
(citadel.quotas.limiter). An empty limit means no limit.
"""

from django.db import models
from django.db.models import Q


class Quota(models.Model):
    team = models.OneToOneField("accounts.Team", on_delete=models.CASCADE, null=True, blank=True, related_name="quota")
    api_key = models.OneToOneField("accounts.ApiKey", on_delete=models.CASCADE, null=True, blank=True,
                                   related_name="quota")
    requests_per_minute = models.PositiveIntegerField(null=True, blank=True)
    tokens_per_minute = models.PositiveBigIntegerField(null=True, blank=True)
    tokens_per_month = models.PositiveBigIntegerField(null=True, blank=True)
    gpu_hours_per_month = models.FloatField(null=True, blank=True,
                                            help_text="Fine-tuning GPU-hours a month (checked by the fine-tuning app).")
    updated_at = models.DateTimeField(auto_now=True)

    LIMITS = ("requests_per_minute", "tokens_per_minute", "tokens_per_month", "gpu_hours_per_month")

    class Meta:
        constraints = [models.CheckConstraint(
            condition=(Q(team__isnull=False) & Q(api_key__isnull=True)) | (Q(team__isnull=True) & Q(api_key__isnull=False)),
            name="quota_for_team_or_key")]

    def __str__(self) -> str:
        return f"quota of {self.subject}"

    @property
    def subject(self) -> str:
        return f"team:{self.team_id}" if self.team_id else f"key:{self.api_key_id}"


class QuotaHit(models.Model):
    """One admitted request, for the database limiter (used when no Redis is configured): the rows of
    the last minute are the sliding window, counted under the quota row's lock."""

    quota = models.ForeignKey(Quota, on_delete=models.CASCADE, related_name="hits")
    at = models.DateTimeField(db_index=True)

    def __str__(self) -> str:
        return f"hit on {self.quota} at {self.at}"
