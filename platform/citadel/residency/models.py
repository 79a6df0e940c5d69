"""Where data may go: sites, data classes and the policies that join a team's data to sites.

A policy answers, for one team and one data class: at which sites (named, or by jurisdiction)
such data may be processed and stored, how much of a prompt is kept, and whether it may be
used for fine-tuning. Without a policy nothing is allowed (deny by default).
"""

from django.db import models

UNSPECIFIED = "unspecified"

RETENTION_DAYS_MAX = 36500
"""The most days a retention period may name (a hundred years). Longer ones mean "forever", which each
field says its own way, and a date that far off does not fit a datetime: a policy's retention_days
of two billion would have failed every request it covers."""


class Site(models.Model):
    """A place with hardware: worker pools run at a site, files are stored under its storage path."""

    name = models.CharField(max_length=100, unique=True)
    region = models.CharField(max_length=100, blank=True, help_text="e.g. eu-central, Frankfurt DC2.")
    jurisdiction = models.CharField(
        max_length=64, default=UNSPECIFIED,
        help_text="The legal area the site is in, e.g. EU, DE, US, UK. 'unspecified' matches no policy rule "
                  "by jurisdiction: such a site is allowed only where a policy names it.")
    storage_path = models.CharField(max_length=500, blank=True, help_text="Where files stored at this site live.")
    description = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name  # pages that showed the old free-text site show the same


class DataClass(models.Model):
    """A sensitivity label; a higher rank is more sensitive. Built-ins are seeded by migration."""

    name = models.SlugField(max_length=64, unique=True, help_text="e.g. internal, phi, pci.")
    rank = models.PositiveIntegerField(help_text="Sensitivity: a request may raise its class, never lower it.")
    description = models.TextField(blank=True)
    builtin = models.BooleanField(default=False, editable=False)
    audit_retention_days = models.PositiveIntegerField(
        null=True, blank=True,
        help_text="Keep audit records about this class of data this many days (0: forever); "
                  "empty: the platform's default, CITADEL_AUDIT_RETENTION_DAYS. Legal holds keep records longer.")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["rank", "name"]
        verbose_name_plural = "data classes"

    def __str__(self) -> str:
        return self.name


BUILTIN_DATA_CLASSES = [
    ("public", 0, "May be published."),
    ("internal", 10, "For the organisation's own use; the default class of an API key."),
    ("confidential", 20, "Limited to those who need it."),
    ("restricted", 30, "The most sensitive: regulated or secret."),
]
DEFAULT_DATA_CLASS = "internal"


def default_data_class_id() -> int:
    """The default class of a new API key (a callable default: the row is seeded by migration)."""
    return DataClass.objects.only("pk").get(name=DEFAULT_DATA_CLASS).pk


class Policy(models.Model):
    """What one team may do with one class of data. `team` empty: keys that belong to no team."""

    class Retention(models.TextChoices):
        NONE = "none", "Nothing of the prompt is kept"
        METADATA = "metadata", "Only its shape (messages, roles, lengths)"
        REDACTED = "redacted", "The text with personal data replaced by placeholders"
        FULL = "full", "The text as sent"

    team = models.ForeignKey("accounts.Team", on_delete=models.CASCADE, null=True, blank=True,
                             related_name="policies")
    data_class = models.ForeignKey(DataClass, on_delete=models.PROTECT, related_name="policies")
    processing_sites = models.ManyToManyField(Site, blank=True, related_name="processing_policies")
    processing_jurisdictions = models.JSONField(default=list, blank=True)
    storage_sites = models.ManyToManyField(Site, blank=True, related_name="storage_policies")
    storage_jurisdictions = models.JSONField(default=list, blank=True)
    prompt_retention = models.CharField(max_length=16, choices=Retention.choices, default=Retention.NONE)
    retention_days = models.PositiveIntegerField(
        null=True, blank=True, help_text="How long what is kept of a prompt stays; empty: until deleted.")
    fine_tuning_allowed = models.BooleanField(default=False)
    description = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["data_class__rank", "team__name"]
        verbose_name_plural = "policies"
        constraints = [
            models.UniqueConstraint(fields=["team", "data_class"], condition=models.Q(team__isnull=False),
                                    name="one_policy_per_team_and_class"),
            models.UniqueConstraint(fields=["data_class"], condition=models.Q(team__isnull=True),
                                    name="one_default_policy_per_class"),
        ]

    def __str__(self) -> str:
        return f"policy #{self.pk} ({self.team_label}, {self.data_class.name})"

    @property
    def team_label(self) -> str:
        return f"team '{self.team.name}'" if self.team_id else "keys without a team"
