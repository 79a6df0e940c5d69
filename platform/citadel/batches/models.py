"""Batches (OpenAI's Batch API): a JSONL file of requests run as one unit of work.

As with every job in Citadel, the database is the system of record and the broker carries ids.
Each line of the input file becomes a BatchRequest row when the batch is created (validated
then, so a malformed line is recorded as failed with its line number while the others run).
Workers claim pending lines in chunks, hand a whole chunk to the engine at once (its continuous
batching decodes them together) and commit the chunk's results in one transaction with the
batch's counters and the usage record: a killed worker loses at most a chunk in flight, whose
lines go back to pending, and a redelivered message finds those lines done and skips them.

The OpenAI ids (`batch_...`, `batch_req_...`) derive from the primary keys.
"""

import uuid

from django.conf import settings
from django.db import models


class Batch(models.Model):
    class Status(models.TextChoices):
        VALIDATING = "validating"
        FAILED = "failed"
        IN_PROGRESS = "in_progress"
        FINALIZING = "finalizing"
        COMPLETED = "completed"
        EXPIRED = "expired"
        CANCELLING = "cancelling"
        CANCELLED = "cancelled"

    TERMINAL = (Status.FAILED, Status.COMPLETED, Status.EXPIRED, Status.CANCELLED)

    class Endpoint(models.TextChoices):
        CHAT = "/v1/chat/completions"
        COMPLETIONS = "/v1/completions"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.VALIDATING, db_index=True)
    endpoint = models.CharField(max_length=32, choices=Endpoint.choices)
    completion_window = models.CharField(max_length=8, default="24h")
    input_file = models.ForeignKey("finetuning.File", on_delete=models.PROTECT, related_name="batches_input")
    output_file = models.ForeignKey("finetuning.File", on_delete=models.SET_NULL, null=True, blank=True,
                                    related_name="batches_output")
    error_file = models.ForeignKey("finetuning.File", on_delete=models.SET_NULL, null=True, blank=True,
                                   related_name="batches_error")
    metadata = models.JSONField(null=True, blank=True)
    model = models.ForeignKey("registry.Model", on_delete=models.PROTECT, null=True, blank=True,
                              related_name="batches", help_text="The one model every line names.")
    adapter = models.JSONField(null=True, blank=True, help_text="A fine-tuned model's adapter, as jobs carry it.")
    deployment = models.ForeignKey("registry.Deployment", on_delete=models.PROTECT, null=True, blank=True,
                                   related_name="batches")
    pool = models.ForeignKey("registry.WorkerPool", on_delete=models.PROTECT, null=True, blank=True,
                             related_name="batches", help_text="The allowed pool the lines were sent to.")
    site = models.ForeignKey("residency.Site", on_delete=models.PROTECT, null=True, blank=True,
                             related_name="batches")
    team = models.ForeignKey("accounts.Team", on_delete=models.PROTECT, null=True, blank=True,
                             related_name="batches")
    data_class = models.ForeignKey("residency.DataClass", on_delete=models.PROTECT, related_name="batches")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, null=True, blank=True,
                             related_name="batches")
    api_key = models.ForeignKey("accounts.ApiKey", on_delete=models.SET_NULL, null=True, blank=True,
                                related_name="batches")
    request_id = models.CharField(max_length=128, blank=True)
    total = models.PositiveIntegerField(default=0)
    completed = models.PositiveIntegerField(default=0)
    failed = models.PositiveIntegerField(default=0)
    prompt_tokens = models.BigIntegerField(default=0)
    completion_tokens = models.BigIntegerField(default=0)
    errors = models.JSONField(null=True, blank=True, help_text="Why the batch failed as a whole (OpenAI's errors).")
    dispatch_count = models.PositiveIntegerField(default=0)
    dispatched_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    in_progress_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    finalizing_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    failed_at = models.DateTimeField(null=True, blank=True)
    expired_at = models.DateTimeField(null=True, blank=True)
    cancelling_at = models.DateTimeField(null=True, blank=True)
    cancelled_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name_plural = "batches"

    def __str__(self) -> str:
        return f"{self.openai_id} ({self.status})"

    @property
    def openai_id(self) -> str:
        return f"batch_{self.id.hex}"

    @property
    def is_terminal(self) -> bool:
        return self.status in self.TERMINAL


class BatchRequest(models.Model):
    """One line of a batch's input file and, once run, its response or error."""

    class Status(models.TextChoices):
        PENDING = "pending"
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    batch = models.ForeignKey(Batch, on_delete=models.CASCADE, related_name="requests")
    line = models.PositiveIntegerField(help_text="1-based line number in the input file.")
    custom_id = models.CharField(max_length=512, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    payload = models.JSONField(null=True, blank=True, help_text="Messages or prompt and sampling settings.")
    worker_name = models.CharField(max_length=200, blank=True)
    claimed_at = models.DateTimeField(null=True, blank=True)
    text = models.TextField(blank=True)
    finish_reason = models.CharField(max_length=16, blank=True)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    error = models.JSONField(null=True, blank=True, help_text="{code, message, param, line} of a failed line.")
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["batch", "line"]
        constraints = [models.UniqueConstraint(fields=["batch", "line"], name="one_request_per_batch_line")]
        indexes = [models.Index(fields=["batch", "status", "line"], name="batch_request_status_line")]

    def __str__(self) -> str:
        return f"{self.batch_id}#{self.line}"

    @property
    def openai_id(self) -> str:
        return f"batch_req_{self.id.hex}"
