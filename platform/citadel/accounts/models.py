"""Teams and API keys: what internal applications send as `Authorization: Bearer <key>`.

A key belongs to a user and, optionally, to a team, and carries a data class: together they
pick the residency policy that governs every request made with it (citadel.residency).

Only a SHA-256 digest of the key and a short prefix (to find the row and to show in lists)
are stored. A key carries 256 random bits, so a fast digest is safe here, unlike passwords,
and it keeps the check cheap on every request.
"""

from django.conf import settings
from django.db import models

from citadel.residency.models import default_data_class_id


class Team(models.Model):
    """A group of users whose data a residency policy governs (roles come with the identity issue)."""

    name = models.SlugField(max_length=64, unique=True)
    description = models.TextField(blank=True)
    members = models.ManyToManyField(settings.AUTH_USER_MODEL, blank=True, related_name="teams")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class ApiKey(models.Model):
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="api_keys")
    name = models.CharField(max_length=100)
    team = models.ForeignKey(Team, on_delete=models.PROTECT, null=True, blank=True, related_name="api_keys")
    data_class = models.ForeignKey("residency.DataClass", on_delete=models.PROTECT, default=default_data_class_id,
                                   related_name="api_keys",
                                   help_text="The class of the data sent with this key; a request may raise it.")
    prefix = models.CharField(max_length=16, unique=True)
    digest = models.CharField(max_length=64)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    last_used_from = models.GenericIPAddressField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix})"

    @property
    def is_active(self) -> bool:
        from django.utils import timezone

        if self.revoked_at is not None:
            return False
        return self.expires_at is None or self.expires_at > timezone.now()
