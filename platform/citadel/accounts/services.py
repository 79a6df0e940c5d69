"""Writes for accounts: teams, API keys and the first admin account."""

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from django.contrib.auth import get_user_model
from django.db import transaction
from django.utils import timezone

from citadel.accounts.models import ApiKey, Team
from citadel.audit.services import Actor, audit_record
from citadel.core.exceptions import AuthenticationFailed, Conflict, InvalidRequest, NotFound

KEY_SCHEME = "cit"


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class CreatedKey:
    """The stored row and the clear key, which exists only here and is shown once."""

    api_key: ApiKey
    key: str


@transaction.atomic
def team_create(*, name: str, actor: Actor, description: str = "", members=(), request=None) -> Team:
    from django.utils.text import slugify

    if not name or slugify(name) != name:
        raise InvalidRequest(f"name {name!r} must be a slug: lower-case letters, digits, '-' and '_'.", param="name")
    if Team.objects.filter(name=name).exists():
        raise Conflict(f"A team named '{name}' already exists.", param="name")
    team = Team.objects.create(name=name, description=description)
    team.members.set(members)
    audit_record(actor=actor, action="team.create", outcome="success", target_type="team", target_id=name,
                 request=request, details={"members": sorted(u.get_username() for u in members)})
    return team


@transaction.atomic
def api_key_create(*, user, name: str, actor: Actor, expires_in_days: int | None = None, team: Team | None = None,
                   data_class=None, request=None) -> CreatedKey:
    """A new key for `user`, of `team` (the user must be a member) and `data_class` (default internal):
    together they pick the residency policy of every request made with it."""
    from citadel.residency.models import DEFAULT_DATA_CLASS, DataClass

    name = (name or "").strip()
    if not name:
        raise InvalidRequest("name must not be empty: give the key a name that says what uses it.", param="name")
    if team is not None and not team.members.filter(pk=user.pk).exists():
        raise InvalidRequest(f"{user.get_username()} is not a member of team '{team.name}'.", param="team")
    data_class = data_class or DataClass.objects.get(name=DEFAULT_DATA_CLASS)
    if expires_in_days is not None and expires_in_days <= 0:
        raise InvalidRequest("expires_in_days must be a positive number of days.", param="expires_in_days")
    prefix = secrets.token_hex(4)
    key = f"{KEY_SCHEME}_{prefix}_{secrets.token_urlsafe(32)}"
    expires_at = timezone.now() + timedelta(days=expires_in_days) if expires_in_days else None
    api_key = ApiKey.objects.create(user=user, name=name, prefix=prefix, digest=_digest(key), expires_at=expires_at,
                                    team=team, data_class=data_class)
    audit_record(
        actor=actor,
        action="api_key.create",
        outcome="success",
        target_type="api_key",
        target_id=prefix,
        request=request,
        details={"name": name, "user": user.get_username(), "expires_at": expires_at and expires_at.isoformat(),
                 "team": team.name if team else None, "data_class": data_class.name},
    )
    return CreatedKey(api_key=api_key, key=key)


@transaction.atomic
def api_key_revoke(*, api_key: ApiKey, actor: Actor, request=None) -> ApiKey:
    api_key = ApiKey.objects.select_for_update().get(pk=api_key.pk)
    if api_key.revoked_at is not None:
        raise Conflict(f"API key {api_key.prefix} is already revoked.")
    api_key.revoked_at = timezone.now()
    api_key.save(update_fields=["revoked_at"])
    audit_record(
        actor=actor, action="api_key.revoke", outcome="success", target_type="api_key",
        target_id=api_key.prefix, request=request,
    )
    return api_key


def api_key_authenticate(*, key: str, source_address: str | None = None) -> ApiKey:
    """The active key matching `key`, or AuthenticationFailed saying what is wrong."""
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_SCHEME:
        raise AuthenticationFailed("Incorrect API key provided. Create one with `citadel keys create`.")
    api_key = ApiKey.objects.select_related("user", "team", "data_class").filter(prefix=parts[1]).first()
    if api_key is None or not hmac.compare_digest(api_key.digest, _digest(key)):
        raise AuthenticationFailed("Incorrect API key provided. Create one with `citadel keys create`.")
    if api_key.revoked_at is not None:
        raise AuthenticationFailed(f"API key {api_key.prefix} has been revoked.", code="revoked_api_key")
    if api_key.expires_at is not None and api_key.expires_at <= timezone.now():
        raise AuthenticationFailed(f"API key {api_key.prefix} has expired.", code="expired_api_key")
    if not api_key.user.is_active:
        raise AuthenticationFailed("The user who owns this API key is disabled.", code="user_disabled")
    now = timezone.now()
    # Throttle the write: last-used time to the minute is what operators need.
    if api_key.last_used_at is None or now - api_key.last_used_at > timedelta(seconds=60) or (
        api_key.last_used_from != source_address
    ):
        ApiKey.objects.filter(pk=api_key.pk).update(last_used_at=now, last_used_from=source_address)
        api_key.last_used_at, api_key.last_used_from = now, source_address
    return api_key


def api_key_get(*, prefix: str) -> ApiKey:
    try:
        return ApiKey.objects.select_related("user").get(prefix=prefix)
    except ApiKey.DoesNotExist:
        raise NotFound(f"No API key with prefix {prefix!r}.", param="prefix") from None


@transaction.atomic
def admin_bootstrap(*, username: str, password_file: Path) -> str | None:
    """Create the first superuser with a generated password, kept in `password_file` (0600).

    Returns the password when the account was created now, None when it already existed,
    so the caller prints it exactly once.
    """
    User = get_user_model()
    if User.objects.filter(username=username).exists():
        return None
    password = secrets.token_urlsafe(18)
    User.objects.create_superuser(username=username, email="", password=password)
    password_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(password + "\n")
    os.chmod(password_file, 0o600)
    audit_record(
        actor=Actor.system("bootstrap"), action="user.create", outcome="success",
        target_type="user", target_id=username, details={"superuser": True},
    )
    return password
