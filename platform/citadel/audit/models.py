"""The audit log: one append-only, hash-chained row per state change and per inference request.

`sequence` is assigned by the writer under the chain lock (services.audit_record), so the log
has no gaps: a missing number means a deleted row. `prev_hash`/`record_hash` chain the rows
(chain.py has the encoding). Signed checkpoints pin the head at intervals, purge manifests
record what a retention purge removed, and legal holds keep records from being purged.
On PostgreSQL these tables refuse UPDATE and DELETE (migration 0004).
"""

from django.db import models
from django.utils import timezone


class AuditRecord(models.Model):
    class ActorType(models.TextChoices):
        USER = "user"
        API_KEY = "api_key"
        SYSTEM = "system"
        ANONYMOUS = "anonymous"

    class Outcome(models.TextChoices):
        SUCCESS = "success"
        FAILURE = "failure"
        DENIED = "denied"

    sequence = models.BigIntegerField(primary_key=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    actor_type = models.CharField(max_length=16, choices=ActorType.choices)
    actor_id = models.CharField(max_length=64, blank=True)
    actor_label = models.CharField(max_length=200, blank=True)
    action = models.CharField(max_length=64, db_index=True)
    target_type = models.CharField(max_length=64, blank=True)
    target_id = models.CharField(max_length=200, blank=True)
    outcome = models.CharField(max_length=16, choices=Outcome.choices)
    request_id = models.CharField(max_length=128, blank=True, db_index=True)
    source_address = models.GenericIPAddressField(null=True, blank=True)
    details = models.JSONField(default=dict, blank=True)
    prev_hash = models.CharField(max_length=64)
    record_hash = models.CharField(max_length=64)

    class Meta:
        ordering = ["sequence"]
        indexes = [models.Index(fields=["actor_type", "actor_id"]), models.Index(fields=["target_type", "target_id"])]

    def __str__(self) -> str:
        return f"#{self.sequence} {self.action} {self.target_type}:{self.target_id} {self.outcome}"


class AuditCheckpoint(models.Model):
    """An Ed25519 signature over (sequence, record_hash, created_at) of the chain's head."""

    sequence = models.BigIntegerField(db_index=True)
    record_hash = models.CharField(max_length=64)
    created_at = models.DateTimeField(default=timezone.now)
    key_id = models.CharField(max_length=32, help_text="First 32 hex digits of SHA-256 of the public key.")
    public_key = models.CharField(max_length=64, help_text="Raw Ed25519 public key, base64.")
    signature = models.CharField(max_length=128, help_text="Ed25519 signature, base64.")

    class Meta:
        ordering = ["sequence", "id"]

    def __str__(self) -> str:
        return f"checkpoint #{self.sequence} {self.record_hash[:12]}"


class AuditPurge(models.Model):
    """A signed manifest of one retention purge: where the kept chain starts and what was kept below it.

    Records below `boundary_sequence` were deleted except `retained` ([sequence, record_hash]
    pairs under legal hold). The first record at the boundary must link to `boundary_prev_hash`.
    """

    created_at = models.DateTimeField(default=timezone.now)
    cutoff = models.DateTimeField(help_text="Records older than this were purged unless held.")
    boundary_sequence = models.BigIntegerField()
    boundary_prev_hash = models.CharField(max_length=64)
    deleted_count = models.BigIntegerField()
    retained = models.JSONField(default=list, blank=True)
    key_id = models.CharField(max_length=32)
    public_key = models.CharField(max_length=64)
    signature = models.CharField(max_length=128)

    class Meta:
        ordering = ["boundary_sequence", "id"]

    def __str__(self) -> str:
        return f"purge below #{self.boundary_sequence} ({self.deleted_count} records)"


class LegalHold(models.Model):
    """Keeps matching records from retention purges until released. Empty criteria match anything;
    a hold matches a record when every criterion it sets does."""

    reason = models.CharField(max_length=500)
    created_at = models.DateTimeField(default=timezone.now)
    created_by = models.CharField(max_length=200, blank=True)
    released_at = models.DateTimeField(null=True, blank=True)
    released_by = models.CharField(max_length=200, blank=True)
    actor_id = models.CharField(max_length=64, blank=True)
    target_type = models.CharField(max_length=64, blank=True)
    target_id = models.CharField(max_length=200, blank=True)
    request_id = models.CharField(max_length=128, blank=True)
    since = models.DateTimeField(null=True, blank=True)
    until = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"legal hold {self.pk}: {self.reason}"

    @property
    def is_active(self) -> bool:
        return self.released_at is None
