"""Writes for accounts: teams, memberships and roles, API keys and the first admin account.

Every change to who may do what is audited in the same transaction (fail closed).
"""

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

from citadel.accounts.models import ApiKey, EndpointGroup, Membership, Role, Team
from citadel.audit.services import Actor, audit_record
from citadel.core.exceptions import AuthenticationFailed, Conflict, InvalidRequest, NotFound, PermissionDenied

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
def membership_set(*, team: Team, user, role: str, actor: Actor, source: str = "local", request=None) -> Membership:
    """Put `user` in `team` with `role`, or change their role there."""
    if role not in Role.values:
        raise InvalidRequest(f"role {role!r} is not one of {', '.join(Role.values)}.", param="role")
    membership = Membership.objects.select_for_update().filter(team=team, user=user).first()
    before = membership.role if membership else None
    if membership is None:
        membership = Membership.objects.create(team=team, user=user, role=role, source=source)
    elif membership.role != role or membership.source != source:
        membership.role, membership.source = role, source
        membership.save(update_fields=["role", "source"])
    else:
        return membership
    audit_record(actor=actor, action="team.member.set", outcome="success", target_type="team", target_id=team.name,
                 request=request, details={"user": user.get_username(), "role": role, "previous_role": before,
                                           "source": source})
    return membership


@transaction.atomic
def membership_remove(*, team: Team, user, actor: Actor, request=None) -> None:
    deleted, _ = Membership.objects.filter(team=team, user=user).delete()
    if not deleted:
        raise NotFound(f"{user.get_username()} is not a member of team '{team.name}'.")
    audit_record(actor=actor, action="team.member.remove", outcome="success", target_type="team",
                 target_id=team.name, request=request, details={"user": user.get_username()})


def _clean_scopes(scopes) -> list[str]:
    scopes = list(dict.fromkeys(scopes))
    unknown = sorted(set(scopes) - set(EndpointGroup.values))
    if unknown or not scopes:
        raise InvalidRequest(f"scopes must be a non-empty list of {', '.join(EndpointGroup.values)}"
                             + (f"; unknown: {', '.join(unknown)}." if unknown else "."), param="scopes")
    return scopes


def _clean_models(names) -> list[str]:
    from citadel.registry.models import Model

    names = sorted(set(names))
    missing = sorted(set(names) - set(Model.objects.filter(name__in=names).values_list("name", flat=True)))
    if missing:
        raise NotFound(f"No model named {', '.join(missing)}.", param="allowed_models")
    return names


def _within(limit_to: ApiKey | None, scopes: list[str], allowed_models: list[str], expires_at) -> None:
    """A request made with an API key cannot give a key more than that key has: no wider scopes, no
    other models, no later expiry (so a leaked narrow key cannot mint a broad one)."""
    if limit_to is None:
        return
    wider = sorted(set(scopes) - set(limit_to.scopes))
    if wider:
        raise PermissionDenied(f"A key cannot grant scopes it lacks: {', '.join(wider)}.", code="insufficient_scope")
    if limit_to.allowed_models and (not allowed_models or set(allowed_models) - set(limit_to.allowed_models)):
        raise PermissionDenied("A key limited to some models cannot grant others; name models among: "
                               f"{', '.join(limit_to.allowed_models)}.", code="insufficient_scope")
    if limit_to.expires_at is not None and (expires_at is None or expires_at > limit_to.expires_at):
        raise PermissionDenied("A key cannot grant a key that outlives it; give expires_in_days.",
                               code="insufficient_scope")


API_KEY_MAX_DAYS = 3650
"""The longest expiry a key may be given (ten years): past some 2.9 million days the date would not fit
a datetime at all (a fuzzed request found that as a server error); a key meant to live longer is
created without an expiry."""


@transaction.atomic
def api_key_create(*, user, name: str, actor: Actor, expires_in_days: int | None = None, team: Team | None = None,
                   data_class=None, scopes=None, allowed_models=(), limit_to: ApiKey | None = None,
                   request=None) -> CreatedKey:
    """A new key for `user`, of `team` (the user must be a member, not as an auditor) and `data_class`
    (default internal): together they pick the residency policy of every request made with it.
    `scopes` (default: every endpoint group; with `limit_to`, that key's) and `allowed_models`
    (default: all) narrow what it may call; `limit_to` is the key the request was made with, if any."""
    from citadel.residency.models import DEFAULT_DATA_CLASS, DataClass

    name = (name or "").strip()
    if not name:
        raise InvalidRequest("name must not be empty: give the key a name that says what uses it.", param="name")
    if team is not None:
        membership = Membership.objects.filter(team=team, user=user).first()
        if membership is None:
            raise InvalidRequest(f"{user.get_username()} is not a member of team '{team.name}'.", param="team")
        if membership.role == Role.AUDITOR:
            raise InvalidRequest(f"{user.get_username()} is an auditor in team '{team.name}'; auditors hold no "
                                 "API keys.", param="team")
    if scopes is None:
        scopes = limit_to.scopes if limit_to is not None else EndpointGroup.values
    scopes = _clean_scopes(scopes)
    allowed_models = _clean_models(allowed_models or ())
    data_class = data_class or DataClass.objects.get(name=DEFAULT_DATA_CLASS)
    if expires_in_days is not None and not 0 < expires_in_days <= API_KEY_MAX_DAYS:
        raise InvalidRequest(f"expires_in_days must be a number of days from 1 to {API_KEY_MAX_DAYS} (ten years); "
                             "leave it out for a key that does not expire.", param="expires_in_days")
    prefix = secrets.token_hex(4)
    key = f"{KEY_SCHEME}_{prefix}_{secrets.token_urlsafe(32)}"
    expires_at = timezone.now() + timedelta(days=expires_in_days) if expires_in_days else None
    _within(limit_to, scopes, allowed_models, expires_at)
    api_key = ApiKey.objects.create(user=user, name=name, prefix=prefix, digest=_digest(key), expires_at=expires_at,
                                    team=team, data_class=data_class, scopes=scopes, allowed_models=allowed_models)
    audit_record(
        actor=actor,
        action="api_key.create",
        outcome="success",
        target_type="api_key",
        target_id=prefix,
        request=request,
        details={"name": name, "user": user.get_username(), "expires_at": expires_at and expires_at.isoformat(),
                 "team": team.name if team else None, "data_class": data_class.name, "scopes": scopes,
                 "allowed_models": allowed_models},
    )
    return CreatedKey(api_key=api_key, key=key)


@transaction.atomic
def api_key_update(*, api_key: ApiKey, actor: Actor, scopes=None, allowed_models=None, expires_at=None,
                   limit_to: ApiKey | None = None, request=None) -> ApiKey:
    """Narrow or widen what a key may call, or move its expiry; a revoked key stays revoked."""
    api_key = ApiKey.objects.select_for_update().get(pk=api_key.pk)
    if api_key.revoked_at is not None:
        raise Conflict(f"API key {api_key.prefix} is revoked; create a new one.")
    changes = {}
    if scopes is not None:
        changes["scopes"] = _clean_scopes(scopes)
    if allowed_models is not None:
        changes["allowed_models"] = _clean_models(allowed_models)
    if expires_at is not None:
        changes["expires_at"] = expires_at
    for field, value in changes.items():
        setattr(api_key, field, value)
    _within(limit_to, api_key.scopes, api_key.allowed_models, api_key.expires_at)
    if changes:
        api_key.save(update_fields=list(changes))
        audit_record(actor=actor, action="api_key.update", outcome="success", target_type="api_key",
                     target_id=api_key.prefix, request=request,
                     details={k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in changes.items()})
    return api_key


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
