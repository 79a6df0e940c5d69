"""Console logins, logouts and failed logins go to the audit log; failed ones also count towards lockout."""

from django.contrib.auth.signals import user_logged_in, user_logged_out, user_login_failed
from django.dispatch import receiver

from citadel.accounts.lockout import login_failure_register
from citadel.audit.services import Actor, audit_record
from citadel.core.net import client_address


@receiver(user_logged_in)
def _audit_login(sender, request, user, **kwargs):
    audit_record(actor=Actor.for_user(user), action="user.login", outcome="success",
                 target_type="user", target_id=user.get_username(), request=request)


@receiver(user_logged_out)
def _audit_logout(sender, request, user, **kwargs):
    if user is not None:
        audit_record(actor=Actor.for_user(user), action="user.logout", outcome="success",
                     target_type="user", target_id=user.get_username(), request=request)


@receiver(user_login_failed)
def _audit_login_failed(sender, credentials, request=None, **kwargs):
    username = str(credentials.get("username", ""))[:150]
    lock = getattr(request, "citadel_lock", None) if request is not None else None
    details = {"reason": f"{lock.kind}_locked"} if lock is not None else {}
    audit_record(actor=Actor("anonymous", "", username), action="user.login", outcome="failure",
                 target_type="user", target_id=username, request=request, details=details)
    if username:
        login_failure_register(username=username, address=client_address(request) if request else None,
                               request=request)
