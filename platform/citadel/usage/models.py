"""Usage metering: one ledger row per billable unit of work, per key, team and model.

Rows are written in the same transaction as the outcome they meter (an inference job's success,
a chunk of batch lines, a fine-tuning job's end), each with a unique `source`, so a retried or
redelivered task can never count the same work twice. Reports, charts, CSV exports and the
token quotas all read this one table.
"""

from django.conf import settings
from django.db import models


class UsageRecord(models.Model):
    class Kind(models.TextChoices):
        INFERENCE = "inference"
        BATCH = "batch"
        FINE_TUNING = "fine_tuning"

    kind = models.CharField(max_length=16, choices=Kind.choices)
    source = models.CharField(max_length=200, unique=True,
                              help_text="What was metered (job:<id>, batch:<id>:<lines>, ftjob:<id>): one row each.")
    api_key = models.ForeignKey("accounts.ApiKey", on_delete=models.SET_NULL, null=True, blank=True,
                                related_name="usage_records")
    team = models.ForeignKey("accounts.Team", on_delete=models.PROTECT, null=True, blank=True,
                             related_name="usage_records")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True,
                             related_name="usage_records")
    model_name = models.CharField(max_length=200, help_text="Kept as text: usage outlives models.")
    requests = models.PositiveIntegerField(default=1)
    prompt_tokens = models.BigIntegerField(default=0)
    completion_tokens = models.BigIntegerField(default=0)
    gpu_seconds = models.FloatField(default=0.0)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["team", "created_at"], name="usage_team_time"),
                   models.Index(fields=["api_key", "created_at"], name="usage_key_time")]

    def __str__(self) -> str:
        return f"{self.kind} {self.source}"

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens
