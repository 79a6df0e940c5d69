"""Teams, memberships with roles, and API keys: what internal applications send as `Authorization: Bearer <key>`.

A user's roles come from their memberships (citadel.accounts.permissions decides what each role may do);
Django's is_staff / is_superuser flags make a platform administrator, who sees every team.

A key belongs to a user and, optionally, to a team, and carries a data class: together they
pick the residency policy that governs every request made with it (citadel.residency).

Only a SHA-256 digest of the key and a short prefix (to find the row and to show in lists)
are stored. A key carries 256 random bits, so a fast digest is safe here, unlike passwords,
and it keeps the check cheap on every request.
"""

from django.conf import settings
from django.db import models

from citadel.residency.models import default_data_class_id


class Role(models.TextChoices):
    """What a member may do in their team (see citadel.accounts.permissions for the exact rules)."""

    ADMIN = "admin", "Team administrator"
    OPERATOR = "operator", "Operator"
    ML_ENGINEER = "ml_engineer", "ML engineer"
    AUDITOR = "auditor", "Auditor"
    APPLICATION = "application", "Application"


class Team(models.Model):
    """A group of users whose data a residency policy governs and whose objects only its members see."""

    name = models.SlugField(max_length=64, unique=True)
    description = models.TextField(blank=True)
    members = models.ManyToManyField(settings.AUTH_USER_MODEL, blank=True, related_name="teams",
                                     through="Membership")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Membership(models.Model):
    """A user in a team with one role. Kept in the table the plain many-to-many used before roles, so
    `team.members` still works; a member added that way is an ML engineer."""

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.ML_ENGINEER)
    source = models.CharField(max_length=16, default="local",
                              help_text="'local' when granted in Citadel, 'oidc' when mapped from the identity "
                                        "provider's groups at login (and replaced at the next login).")

    class Meta:
        db_table = "accounts_team_members"
        unique_together = [("team", "user")]
        ordering = ["team__name", "user__username"]

    def __str__(self) -> str:
        return f"{self.user} in {self.team} as {self.role}"


class EndpointGroup(models.TextChoices):
    """What an API key may call: a key is scoped to one or more of these."""

    INFERENCE = "inference", "Inference (/v1 models, chat, completions)"
    FILES = "files", "Files (/v1/files)"
    FINE_TUNING = "fine_tuning", "Fine-tuning (/v1/fine_tuning)"
    MANAGEMENT = "management", "Management API (/api/v1)"


def all_endpoint_groups() -> list[str]:
    return list(EndpointGroup.values)


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
    scopes = models.JSONField(default=all_endpoint_groups,
                              help_text="Endpoint groups the key may call (see EndpointGroup).")
    allowed_models = models.JSONField(default=list, blank=True,
                                      help_text="Model names the key may use; empty: every model its team may use.")

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

    def allows_model(self, name: str) -> bool:
        return not self.allowed_models or name in self.allowed_models


class LoginFailure(models.Model):
    """One refused password, kept to count failures per account and per address (see login_failure_register)."""

    username = models.CharField(max_length=150, db_index=True)
    address = models.GenericIPAddressField(null=True, blank=True, db_index=True)
    at = models.DateTimeField(auto_now_add=True, db_index=True)

    def __str__(self) -> str:
        return f"{self.username} from {self.address} at {self.at}"


class LoginLock(models.Model):
    """An account (kind 'account', key the username) or an address (kind 'address') refused until `until`."""

    class Kind(models.TextChoices):
        ACCOUNT = "account"
        ADDRESS = "address"

    kind = models.CharField(max_length=8, choices=Kind.choices)
    key = models.CharField(max_length=150)
    until = models.DateTimeField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        unique_together = [("kind", "key")]

    def __str__(self) -> str:
        return f"{self.kind} {self.key} until {self.until}"


class TotpDevice(models.Model):
    """A user's TOTP secret (RFC 6238, 30 s, 6 digits, SHA-1: what authenticator apps expect), kept
    encrypted so that a copy of the database alone does not give anyone the second factor.

    `last_step` is the time step of the last accepted code, so a code is accepted once only.
    """

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="totp_device")
    secret_encrypted = models.TextField(help_text="The base32 secret, encrypted with a key derived from SECRET_KEY "
                                                  "(Fernet; SECRET_KEY_FALLBACKS still decrypt after a rotation).")
    confirmed_at = models.DateTimeField(null=True, blank=True)
    last_step = models.BigIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"TOTP of {self.user}"

    @property
    def secret(self) -> str:
        """The base32 secret, as in the otpauth URI (a database dump alone does not reveal it)."""
        return _secret_cipher().decrypt(self.secret_encrypted.encode()).decode()

    @secret.setter
    def secret(self, value: str) -> None:
        self.secret_encrypted = _secret_cipher().encrypt(value.encode()).decode()


def _secret_cipher():
    import base64
    import hashlib

    from cryptography.fernet import Fernet, MultiFernet

    keys = [settings.SECRET_KEY, *getattr(settings, "SECRET_KEY_FALLBACKS", [])]
    return MultiFernet([Fernet(base64.urlsafe_b64encode(hashlib.sha256(b"citadel-totp:" + key.encode()).digest()))
                        for key in keys])
