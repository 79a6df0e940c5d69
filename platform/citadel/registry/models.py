"""What can run where: models, worker pools (one Celery queue each), deployments, workers."""

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
