"""TOTP second factor (RFC 6238) with `cryptography`'s implementation: 6 digits, 30-second steps,
SHA-1, a 160-bit secret: what every authenticator app reads from an otpauth:// URI.

A code is accepted for the current step and one step either side (clock drift), and only once:
the device keeps the last accepted step, so a code seen over a shoulder cannot be replayed.
Enrolment, confirmation and removal are audited; wrong codes count towards lockout like wrong passwords.
"""

import base64
import os
import time

from cryptography.hazmat.primitives.hashes import SHA1
from cryptography.hazmat.primitives.twofactor import InvalidToken
from cryptography.hazmat.primitives.twofactor.totp import TOTP
from django.db import transaction
from django.utils import timezone

from citadel.accounts.models import TotpDevice
from citadel.accounts.permissions import MFA_ROLES, has_role, is_platform_admin
from citadel.audit.services import Actor, audit_record
from citadel.core.exceptions import InvalidRequest

ISSUER = "Citadel"
STEP = 30
DIGITS = 6


def _totp(secret: str) -> TOTP:
    key = base64.b32decode(secret + "=" * (-len(secret) % 8))
    return TOTP(key, DIGITS, SHA1(), STEP, enforce_key_length=False)


def totp_code(*, secret: str, at: float | None = None) -> str:
    """The code for `at` (now by default); for tests and for showing what an app should display."""
    return _totp(secret).generate(int(at if at is not None else time.time())).decode()


def mfa_required(user) -> bool:
    from django.conf import settings

    return settings.CITADEL_MFA_REQUIRED and (is_platform_admin(user) or has_role(user, MFA_ROLES))


def totp_enrolled(user) -> bool:
    device = TotpDevice.objects.filter(user=user).first()
    return bool(device and device.confirmed_at)


@transaction.atomic
@transaction.atomic  # select_for_update needs it; a live server runs requests in autocommit
def totp_enrol_start(*, user, request=None) -> TotpDevice:
    """A new unconfirmed secret for `user` (replacing an unconfirmed one); a confirmed device stays until removed."""
    device = TotpDevice.objects.select_for_update().filter(user=user).first()
    if device is not None and device.confirmed_at is not None:
        raise InvalidRequest("A second factor is already enrolled; remove it first to enrol another.")
    secret = base64.b32encode(os.urandom(20)).decode().rstrip("=")
    if device is None:
        device = TotpDevice.objects.create(user=user, secret=secret)
    else:
        device.secret, device.last_step = secret, 0
        device.save(update_fields=["secret_encrypted", "last_step"])
    audit_record(actor=Actor.for_user(user), action="user.totp.enrol_start", outcome="success", target_type="user",
                 target_id=user.get_username(), request=request)
    return device


def provisioning_uri(device: TotpDevice) -> str:
    return _totp(device.secret).get_provisioning_uri(device.user.get_username(), ISSUER)


def _accept(device: TotpDevice, code: str) -> bool:
    """True when `code` is valid now (±1 step) for a step after the last accepted one; records that step."""
    code = (code or "").strip().replace(" ", "")
    if not (code.isdigit() and len(code) == DIGITS):
        return False
    totp, now = _totp(device.secret), int(time.time())
    for drift in (0, -1, 1):
        at = now + drift * STEP
        step = at // STEP
        if step <= device.last_step:
            continue
        try:
            totp.verify(code.encode(), at)
        except InvalidToken:
            continue
        device.last_step = step
        device.save(update_fields=["last_step"])
        return True
    return False


@transaction.atomic
def totp_confirm(*, user, code: str, request=None) -> TotpDevice:
    """Finish enrolment with a first code from the app."""
    device = TotpDevice.objects.select_for_update().filter(user=user).first()
    if device is None:
        raise InvalidRequest("Start the enrolment first.")
    if device.confirmed_at is None:
        if not _accept(device, code):
            audit_record(actor=Actor.for_user(user), action="user.totp.confirm", outcome="failure",
                         target_type="user", target_id=user.get_username(), request=request)
            raise InvalidRequest("That code is not right; check the device's clock and enter the current code.",
                                 param="code")
        device.confirmed_at = timezone.now()
        device.save(update_fields=["confirmed_at"])
        audit_record(actor=Actor.for_user(user), action="user.totp.confirm", outcome="success", target_type="user",
                     target_id=user.get_username(), request=request)
    return device


@transaction.atomic
def totp_verify(*, user, code: str, request=None) -> bool:
    """Check a sign-in code; a wrong one is audited and counts towards the account's lockout."""
    from citadel.accounts.lockout import login_failure_register
    from citadel.core.net import client_address

    device = TotpDevice.objects.select_for_update().filter(user=user, confirmed_at__isnull=False).first()
    if device is not None and _accept(device, code):
        return True
    audit_record(actor=Actor("anonymous", "", user.get_username()), action="user.login.totp", outcome="failure",
                 target_type="user", target_id=user.get_username(), request=request)
    login_failure_register(username=user.get_username(), address=client_address(request) if request else None,
                           request=request)
    return False


@transaction.atomic
def totp_remove(*, user, actor: Actor, request=None) -> None:
    deleted, _ = TotpDevice.objects.filter(user=user).delete()
    if deleted:
        audit_record(actor=actor, action="user.totp.remove", outcome="success", target_type="user",
                     target_id=user.get_username(), request=request)
