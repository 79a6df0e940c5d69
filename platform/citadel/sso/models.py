"""Single sign-on with OpenID Connect: which provider account is which Citadel user, and how the
provider's groups map to teams and roles (managed in the management API, /api/v1/sso/group-mappings/)."""

from django.conf import settings
from django.db import models

from citadel.accounts.models import Role


class OidcIdentity(models.Model):
    """The provider's (issuer, subject) pair is the identity: a username from the provider never
    takes over a local account of the same name."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="oidc_identities")
    issuer = models.CharField(max_length=500)
    subject = models.CharField(max_length=255)
    last_login_at = models.DateTimeField(null=True, blank=True)
    last_groups = models.JSONField(default=list, blank=True)

    class Meta:
        unique_together = [("issuer", "subject")]

    def __str__(self) -> str:
        return f"{self.subject} at {self.issuer}"


class GroupMapping(models.Model):
    """Members of the provider's `group` get `role` in `team` at each sign-in (or, with
    platform_admin, become platform administrators). Memberships granted this way are replaced at
    every sign-in, so removing someone from the group at the provider removes the role here."""

    group = models.CharField(max_length=255, db_index=True)
    team = models.ForeignKey("accounts.Team", on_delete=models.CASCADE, null=True, blank=True,
                             related_name="group_mappings")
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.ML_ENGINEER)
    platform_admin = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["group", "team__name"]
        constraints = [models.UniqueConstraint(fields=["group", "team"], name="sso_group_team_unique"),
                       models.CheckConstraint(condition=models.Q(team__isnull=False) | models.Q(platform_admin=True),
                                              name="sso_mapping_team_or_platform_admin")]

    def __str__(self) -> str:
        return f"{self.group} -> {self.team or 'platform'} as {'admin' if self.platform_admin else self.role}"
