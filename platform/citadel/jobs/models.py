"""Inference jobs: the database is the system of record, the broker only carries job ids.

A job row is written before anything is dispatched, so a lost message is visible (the job
stays queued) and a redelivered one finds the job no longer queued and does nothing.
Streamed tokens are appended as chunk rows that the web process reads back in order.
Each job records whose policy admitted it (team, data class, the site it ran at) and how much of
its prompt that policy keeps once the job is over (citadel.residency.prompts); the record of
processing activities is built from these columns.
When a request asks for log-probabilities, the job and each chunk also hold them, one entry per
token (see citadel.jobs.logprobs for the shape).
"""

import uuid

from django.conf import settings
from django.db import models

from citadel.registry.models import Deployment, Model, WorkerPool


class InferenceJob(models.Model):
    class Kind(models.TextChoices):
        CHAT = "chat"
        COMPLETION = "completion"

    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"

    TERMINAL = (Status.SUCCEEDED, Status.FAILED)

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    kind = models.CharField(max_length=16, choices=Kind.choices)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED, db_index=True)
    model = models.ForeignKey(Model, on_delete=models.PROTECT, related_name="jobs")
    deployment = models.ForeignKey(Deployment, on_delete=models.PROTECT, null=True, blank=True, related_name="jobs")
    pool = models.ForeignKey(WorkerPool, on_delete=models.PROTECT, null=True, blank=True, related_name="jobs")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, null=True, blank=True)
    api_key = models.ForeignKey("accounts.ApiKey", on_delete=models.PROTECT, null=True, blank=True)
    team = models.ForeignKey("accounts.Team", on_delete=models.PROTECT, null=True, blank=True, related_name="jobs")
    data_class = models.ForeignKey("residency.DataClass", on_delete=models.PROTECT, null=True, blank=True,
                                   related_name="jobs")
    site = models.ForeignKey("residency.Site", on_delete=models.PROTECT, null=True, blank=True, related_name="jobs",
                             help_text="Where the job was sent to run (its pool's site then).")
    prompt_retention = models.CharField(max_length=16, blank=True,
                                        help_text="What the policy keeps of the prompt when the job ends.")
    prompt_kept_until = models.DateTimeField(null=True, blank=True,
                                             help_text="When what was kept of the prompt is to be removed.")
    request_id = models.CharField(max_length=128, blank=True, db_index=True)
    stream = models.BooleanField(default=False)
    payload = models.JSONField(help_text="Messages or prompt and sampling settings, as the worker needs them.")
    worker_name = models.CharField(max_length=200, blank=True)
    dispatch_count = models.PositiveIntegerField(default=0, help_text="Times the job id was sent to the broker.")
    dispatched_at = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    text = models.TextField(blank=True)
    finish_reason = models.CharField(max_length=16, blank=True)
    logprobs = models.JSONField(
        null=True, blank=True,
        help_text="Per generated token, when the request asked for logprobs: "
                  "{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}, ...]}.")
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    error_code = models.CharField(max_length=64, blank=True)
    error_message = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.kind} {self.id} ({self.status})"

    @property
    def is_terminal(self) -> bool:
        return self.status in self.TERMINAL


class InferenceChunk(models.Model):
    """One streamed piece of a job's output, in order."""

    job = models.ForeignKey(InferenceJob, on_delete=models.CASCADE, related_name="chunks")
    index = models.PositiveIntegerField()
    text = models.TextField()
    logprobs = models.JSONField(null=True, blank=True,
                                help_text="The log-probabilities of this chunk's tokens (streamed jobs that asked).")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["job", "index"]
        constraints = [models.UniqueConstraint(fields=["job", "index"], name="one_chunk_per_index")]

    def __str__(self) -> str:
        return f"{self.job_id}#{self.index}"


class JobLease(models.Model):
    """A running job's claim by one worker, renewed while it runs (citadel.jobs.leases).

    One row per job of any kind (inference, fine-tuning, batch), so the apps' own tables stay as they
    are and one UPDATE renews every lease a worker process holds. `attempt` is the fencing token:
    the job's attempt number when this worker claimed it; a worker whose attempt is no longer the
    lease's has lost the job and must not record anything for it.
    """

    class Kind(models.TextChoices):
        INFERENCE = "inference"
        FINE_TUNING = "fine_tuning"
        BATCH = "batch"

    kind = models.CharField(max_length=16, choices=Kind.choices)
    job_id = models.CharField(max_length=64)
    worker_name = models.CharField(max_length=200)
    attempt = models.PositiveIntegerField(default=1)
    acquired_at = models.DateTimeField()
    expires_at = models.DateTimeField(db_index=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["kind", "job_id"], name="one_lease_per_job")]

    def __str__(self) -> str:
        return f"{self.kind} {self.job_id} held by {self.worker_name} until {self.expires_at:%H:%M:%S}"
