"""LoRA fine-tuning: uploaded datasets, jobs, their progress events and checkpoints.

As with inference jobs, the database is the system of record and the broker only carries job
ids: a job row is written (validated, admitted by the residency policy) before anything is
dispatched, a lost message is sent again from the row, and a redelivered one finds the job no
longer queued and does nothing. A job whose worker dies goes back to queued and resumes from
its last checkpoint on another worker of an allowed pool, a bounded number of times.

The OpenAI ids (`file-...`, `ftjob-...`, `ftevent-...`, `ftckpt-...`) are derived from the
primary keys (see `openai_id`), so nothing else has to be kept unique.
"""

import uuid

from django.conf import settings
from django.db import models


class File(models.Model):
    """An uploaded dataset (OpenAI's File with purpose `fine-tune`), stored at a site its policy allows.

    The bytes live under the storage path of `site`; the row keeps where, who owns it, which
    data class it carries (the uploading key's, possibly raised) and the validation report.
    """

    class Purpose(models.TextChoices):
        FINE_TUNE = "fine-tune"
        FINE_TUNE_RESULTS = "fine-tune-results"
        BATCH = "batch"  # a batch's input (citadel.batches checks its lines when the batch is created)
        BATCH_OUTPUT = "batch_output"  # a batch's output and error files

    class Status(models.TextChoices):
        PROCESSED = "processed"
        ERROR = "error"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    purpose = models.CharField(max_length=32, choices=Purpose.choices, default=Purpose.FINE_TUNE)
    filename = models.CharField(max_length=255)
    bytes = models.BigIntegerField()
    sha256 = models.CharField(max_length=64)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PROCESSED)
    site = models.ForeignKey("residency.Site", on_delete=models.PROTECT, related_name="finetuning_files",
                             help_text="Where the bytes are stored: a site the owner's policy allows for storage.")
    path = models.CharField(max_length=1000, help_text="The file's bytes, under the site's storage path.")
    data_class = models.ForeignKey("residency.DataClass", on_delete=models.PROTECT, related_name="finetuning_files")
    team = models.ForeignKey("accounts.Team", on_delete=models.PROTECT, null=True, blank=True,
                             related_name="finetuning_files")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, null=True, blank=True,
                             related_name="finetuning_files")
    api_key = models.ForeignKey("accounts.ApiKey", on_delete=models.SET_NULL, null=True, blank=True,
                                related_name="finetuning_files")
    validated_with = models.CharField(max_length=200, blank=True,
                                      help_text="The base model whose tokenizer counted the tokens of `report`.")
    report = models.JSONField(default=dict, blank=True,
                              help_text="finetune.validate_dataset's report: examples, errors with line numbers, "
                                        "too-long examples, token counts, time estimate.")
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    deleted_at = models.DateTimeField(null=True, blank=True,
                                      help_text="Deleted through the API: bytes removed, row kept for the jobs "
                                                "and audit records that name it.")

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.openai_id} ({self.filename})"

    @property
    def openai_id(self) -> str:
        return f"file-{self.id.hex}"


class FineTuningJob(models.Model):
    class Status(models.TextChoices):
        VALIDATING_FILES = "validating_files"
        QUEUED = "queued"
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"
        CANCELLED = "cancelled"

    TERMINAL = (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED)

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.QUEUED, db_index=True)
    model = models.ForeignKey("registry.Model", on_delete=models.PROTECT, related_name="fine_tuning_jobs",
                              help_text="The base model the adapter is trained on.")
    training_file = models.ForeignKey(File, on_delete=models.PROTECT, related_name="training_jobs")
    validation_file = models.ForeignKey(File, on_delete=models.PROTECT, null=True, blank=True,
                                        related_name="validation_jobs")
    suffix = models.CharField(max_length=64, blank=True)
    seed = models.BigIntegerField()
    hyperparameters = models.JSONField(help_text="OpenAI's form, resolved: n_epochs, batch_size, "
                                                 "learning_rate_multiplier.")
    config = models.JSONField(help_text="finetune.TrainConfig.to_dict(): what the trainer gets.")
    metadata = models.JSONField(null=True, blank=True)
    team = models.ForeignKey("accounts.Team", on_delete=models.PROTECT, null=True, blank=True,
                             related_name="fine_tuning_jobs")
    data_class = models.ForeignKey("residency.DataClass", on_delete=models.PROTECT, related_name="fine_tuning_jobs")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, null=True, blank=True,
                             related_name="fine_tuning_jobs")
    api_key = models.ForeignKey("accounts.ApiKey", on_delete=models.SET_NULL, null=True, blank=True,
                                related_name="fine_tuning_jobs")
    request_id = models.CharField(max_length=128, blank=True)
    pool = models.ForeignKey("registry.WorkerPool", on_delete=models.PROTECT, null=True, blank=True,
                             related_name="fine_tuning_jobs", help_text="The pool it was last sent to.")
    site = models.ForeignKey("residency.Site", on_delete=models.PROTECT, null=True, blank=True,
                             related_name="fine_tuning_jobs", help_text="Where it was last sent to run.")
    output_dir = models.CharField(max_length=1000, help_text="Checkpoints and the adapter, at the training "
                                                             "file's storage site.")
    worker_name = models.CharField(max_length=200, blank=True)
    worker_pid = models.IntegerField(null=True, blank=True,
                                     help_text="The process running it: a worker restarted under the same name "
                                               "(a new pid) no longer runs it.")
    attempts = models.PositiveIntegerField(default=0, help_text="Times a worker started (or resumed) it.")
    dispatch_count = models.PositiveIntegerField(default=0)
    dispatched_at = models.DateTimeField(null=True, blank=True)
    estimated_tokens = models.BigIntegerField(default=0, help_text="Tokens the job will train on, all epochs "
                                                                   "(what the quota counts).")
    step = models.PositiveIntegerField(default=0)
    total_steps = models.PositiveIntegerField(null=True, blank=True)
    train_loss = models.FloatField(null=True, blank=True)
    valid_loss = models.FloatField(null=True, blank=True)
    estimated_finish = models.DateTimeField(null=True, blank=True)
    trained_tokens = models.BigIntegerField(null=True, blank=True)
    fine_tuned_model = models.ForeignKey("registry.Model", on_delete=models.SET_NULL, null=True, blank=True,
                                         related_name="+", help_text="The variant registered on success.")
    result_file = models.ForeignKey(File, on_delete=models.SET_NULL, null=True, blank=True, related_name="+",
                                    help_text="On success: the metrics of every step as CSV (OpenAI's result_files).")
    error_code = models.CharField(max_length=64, blank=True)
    error_message = models.TextField(blank=True)
    error_param = models.CharField(max_length=100, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    last_progress_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    stopped_at = models.DateTimeField(null=True, blank=True,
                                      help_text="When the worker confirmed that training stopped after a cancel.")

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.openai_id} ({self.status})"

    @property
    def openai_id(self) -> str:
        return f"ftjob-{self.id.hex}"

    @property
    def is_terminal(self) -> bool:
        return self.status in self.TERMINAL


class FineTuningEvent(models.Model):
    """One line of a job's log: a message, or metrics of a step (loss, learning rate, tokens/s, ETA)."""

    class Level(models.TextChoices):
        INFO = "info"
        WARN = "warn"
        ERROR = "error"

    class Type(models.TextChoices):
        MESSAGE = "message"
        METRICS = "metrics"

    job = models.ForeignKey(FineTuningJob, on_delete=models.CASCADE, related_name="events")
    level = models.CharField(max_length=8, choices=Level.choices, default=Level.INFO)
    type = models.CharField(max_length=16, choices=Type.choices, default=Type.MESSAGE)
    message = models.TextField()
    data = models.JSONField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-id"]
        indexes = [models.Index(fields=["job", "-id"], name="ftevent_job_newest")]

    def __str__(self) -> str:
        return f"{self.openai_id}: {self.message[:60]}"

    @property
    def openai_id(self) -> str:
        return f"ftevent-{self.pk}"


class FineTuningCheckpoint(models.Model):
    """A resumable checkpoint the trainer wrote (a PEFT adapter folder plus optimizer state)."""

    job = models.ForeignKey(FineTuningJob, on_delete=models.CASCADE, related_name="checkpoints")
    step = models.PositiveIntegerField()
    path = models.CharField(max_length=1000)
    metrics = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-step"]
        constraints = [models.UniqueConstraint(fields=["job", "step"], name="one_checkpoint_per_step")]

    def __str__(self) -> str:
        return f"{self.job.openai_id} step {self.step}"

    @property
    def openai_id(self) -> str:
        return f"ftckpt-{self.pk}"
