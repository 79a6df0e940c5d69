"""What can run where: models, worker pools (one Celery queue each), deployments, workers."""

from django.conf import settings
from django.db import models

from citadel.celery import pool_queue


class Model(models.Model):
    """A Hugging Face checkpoint folder, addressed by `name` in the OpenAI API.

    A fine-tuned variant (`base` set) is a PEFT adapter over its base model: it has no deployment
    of its own, runs on its base model's deployments (same `path`), and the worker hands the
    adapter to the engine (citadel.finetuning registers them, named like OpenAI's `ft:<base>:<suffix>:<id>`).
    """

    name = models.SlugField(max_length=200, unique=True, help_text="The id clients pass as `model`.")
    path = models.CharField(max_length=500, help_text="Checkpoint folder on the worker hosts (a variant: its base's).")
    base = models.ForeignKey("self", on_delete=models.PROTECT, null=True, blank=True, related_name="variants",
                             help_text="For a fine-tuned variant: the model its adapter applies to.")
    adapter_path = models.CharField(max_length=500, blank=True,
                                    help_text="For a fine-tuned variant: its PEFT adapter folder on the worker hosts.")
    family = models.CharField(max_length=64, blank=True, help_text="config.json's model_type.")
    manifest = models.JSONField(
        default=dict, blank=True,
        help_text="{file name: SHA-256} of the files the engine loads, recorded at import and checked by a worker "
                  "before it loads the model (citadel.registry.manifest).")
    description = models.TextField(blank=True)
    teams = models.ManyToManyField(
        "accounts.Team", blank=True, related_name="models",
        help_text="Teams that use this model: it may be deployed only at sites where their policies allow "
                  "processing their keys' data classes (citadel.residency).")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class WorkerPool(models.Model):
    """GPU workers at one site that consume one queue."""

    name = models.SlugField(max_length=64, unique=True)
    site = models.ForeignKey("residency.Site", on_delete=models.PROTECT, related_name="pools",
                             help_text="Where the pool's hardware is; residency policies allow or refuse it.")
    queue_limit = models.PositiveIntegerField(
        null=True, blank=True,
        help_text="Requests queued beyond the workers' slots before new ones get 429 (empty: CITADEL_POOL_QUEUE_LIMIT).")
    description = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def queue(self) -> str:
        return pool_queue(self.name)


class Deployment(models.Model):
    """A model served by a pool's workers."""

    class Status(models.TextChoices):
        ACTIVE = "active"
        RETIRED = "retired"

    model = models.ForeignKey(Model, on_delete=models.PROTECT, related_name="deployments")
    pool = models.ForeignKey(WorkerPool, on_delete=models.PROTECT, related_name="deployments")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ACTIVE)
    engine_settings = models.JSONField(default=dict, blank=True, help_text="Keyword arguments for inference.LLM.")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["model", "pool"], condition=models.Q(status="active"), name="one_active_deployment_per_pool"
            )
        ]

    def __str__(self) -> str:
        return f"{self.model.name} on {self.pool.name}"


class Worker(models.Model):
    """A running `citadel worker` process; alive while its heartbeat is fresh."""

    class Status(models.TextChoices):
        ONLINE = "online"
        OFFLINE = "offline"

    name = models.CharField(max_length=200, unique=True, help_text="The Celery node name, e.g. gpu@host1.")
    pool = models.ForeignKey(WorkerPool, on_delete=models.PROTECT, related_name="workers")
    hostname = models.CharField(max_length=200)
    pid = models.IntegerField(null=True, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ONLINE)
    started_at = models.DateTimeField()
    last_heartbeat = models.DateTimeField(db_index=True)
    loaded_models = models.JSONField(default=list, blank=True)
    engine_stats = models.JSONField(default=dict, blank=True, help_text="Per loaded model: the engine's counters.")

    class Meta:
        ordering = ["pool__name", "name"]

    def __str__(self) -> str:
        return self.name


class ModelImport(models.Model):
    """Importing a checkpoint folder from a worker host: a task on the pool's queue reads the folder
    there, hashes every file the engine loads (progress in `bytes_done`), compares the hashes with
    the expected ones when given, and registers the model with that manifest (citadel.registry.imports)."""

    class Status(models.TextChoices):
        QUEUED = "queued"
        VERIFYING = "verifying"
        SUCCEEDED = "succeeded"
        FAILED = "failed"

    TERMINAL = (Status.SUCCEEDED, Status.FAILED)

    name = models.SlugField(max_length=200, help_text="The model's name once registered.")
    path = models.CharField(max_length=500, help_text="Checkpoint folder on the pool's worker hosts.")
    pool = models.ForeignKey(WorkerPool, on_delete=models.PROTECT, related_name="imports",
                             help_text="Whose worker reads the folder (its queue).")
    description = models.TextField(blank=True)
    expected = models.JSONField(default=dict, blank=True,
                                help_text="{file name: SHA-256} the files must match (from the form or SHA256SUMS).")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED, db_index=True)
    files_total = models.PositiveIntegerField(default=0)
    files_done = models.PositiveIntegerField(default=0)
    bytes_total = models.BigIntegerField(default=0)
    bytes_done = models.BigIntegerField(default=0)
    current_file = models.CharField(max_length=300, blank=True)
    manifest = models.JSONField(default=dict, blank=True, help_text="{file name: SHA-256} as computed.")
    error = models.TextField(blank=True)
    model = models.ForeignKey(Model, on_delete=models.SET_NULL, null=True, blank=True, related_name="imports")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True,
                                   related_name="model_imports")
    worker_name = models.CharField(max_length=200, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"import of {self.name} from {self.path}"

    @property
    def percent(self) -> int:
        if self.status == self.Status.SUCCEEDED:
            return 100
        return int(100 * self.bytes_done / self.bytes_total) if self.bytes_total else 0
