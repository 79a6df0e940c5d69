"""Console logins, logouts and failed logins go to the audit log."""

from django.contrib.auth.signals import user_logged_in, user_logged_out, user_login_failed
from django.dispatch import receiver

from citadel.audit.services import Actor, audit_record


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
    audit_record(actor=Actor("anonymous", "", username), action="user.login", outcome="failure",
                 target_type="user", target_id=username, request=request)
