"""Password lockout: too many refused passwords for one account, or from one address, within the
window lock that account or address for a cool-off, during which even the right password is refused.

Counted in the database, so every web process sees the same failures and locks. Each lock is
audited when it starts (`user.lockout`), as is each lift by an administrator (`user.lockout.lift`).
"""

from datetime import timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from citadel.accounts.models import LoginFailure, LoginLock
from citadel.audit.services import Actor, audit_record


def login_lock_active(*, username: str, address: str | None) -> LoginLock | None:
    """The lock, if any, that refuses a sign-in to `username` from `address` now."""
    now = timezone.now()
    keys = [(LoginLock.Kind.ACCOUNT, username.lower())]
    if address:
        keys.append((LoginLock.Kind.ADDRESS, address))
    for kind, key in keys:
        lock = LoginLock.objects.filter(kind=kind, key=key, until__gt=now).first()
        if lock is not None:
            return lock
    return None


def _lock(*, kind: str, key: str, count: int, request, username: str) -> None:
    until = timezone.now() + timedelta(seconds=settings.CITADEL_LOGIN_LOCKOUT_SECONDS)
    updated = LoginLock.objects.filter(kind=kind, key=key, until__lte=timezone.now()).update(until=until)
    if not updated:
        try:
            with transaction.atomic():
                LoginLock.objects.create(kind=kind, key=key, until=until)
        except IntegrityError:
            return  # another process locked it at the same moment, and audited that
    audit_record(actor=Actor("anonymous", "", username), action="user.lockout", outcome="denied",
                 target_type="user" if kind == LoginLock.Kind.ACCOUNT else "address", target_id=key,
                 request=request, details={"kind": kind, "failures": count, "until": until.isoformat()})


@transaction.atomic
def login_failure_register(*, username: str, address: str | None, request=None) -> None:
    """Count one refused password and lock the account or the address when it passes its limit."""
    username = username.lower()[:150]
    now = timezone.now()
    since = now - timedelta(seconds=settings.CITADEL_LOGIN_FAILURE_WINDOW_SECONDS)
    LoginFailure.objects.filter(at__lt=since).delete()  # what no window counts any more
    LoginFailure.objects.create(username=username, address=address or None)
    for kind, key, limit in ((LoginLock.Kind.ACCOUNT, username, settings.CITADEL_LOGIN_MAX_FAILURES),
                             (LoginLock.Kind.ADDRESS, address, settings.CITADEL_LOGIN_ADDRESS_MAX_FAILURES)):
        if not key or LoginLock.objects.filter(kind=kind, key=key, until__gt=now).exists():
            continue
        lock = LoginLock.objects.filter(kind=kind, key=key).first()
        counted_since = max(since, lock.until) if lock else since  # failures before the last lock ended count no more
        field = "username" if kind == LoginLock.Kind.ACCOUNT else "address"
        count = LoginFailure.objects.filter(**{field: key}, at__gt=counted_since).count()
        if count >= limit:
            _lock(kind=kind, key=key, count=count, request=request, username=username)


@transaction.atomic
def login_lock_lift(*, kind: str, key: str, actor: Actor, request=None) -> int:
    """End a lock now (an administrator who has checked who is asking)."""
    lifted = LoginLock.objects.filter(kind=kind, key=key, until__gt=timezone.now()).update(until=timezone.now())
    if lifted:
        audit_record(actor=actor, action="user.lockout.lift", outcome="success", target_type=kind, target_id=key,
                     request=request)
    return lifted
