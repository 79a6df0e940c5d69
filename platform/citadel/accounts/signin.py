"""The end of every interactive sign-in (password or single sign-on): the second factor.

A user with a confirmed TOTP device is not signed in yet: the session (its id rotated) remembers
who is half-way, for five minutes, and the TOTP step (frontend:login-totp) finishes it. A user
whose role needs a second factor but who has none is signed in only to enrol one (the enrolment
middleware holds every other page). Django's login() rotates the session id.
"""

import time

from django.contrib import auth
from django.shortcuts import redirect

from citadel.accounts.middleware import ENROL_REQUIRED
from citadel.accounts.totp import mfa_required, totp_enrolled

PENDING = "citadel_mfa_pending"
PENDING_SECONDS = 300


def sign_in_complete(request, user, *, backend: str, next_url: str, second_factor: bool = True):
    """Sign `user` in, or send them to the TOTP step or to enrolment first; returns the redirect."""
    if second_factor and totp_enrolled(user):
        request.session.cycle_key()
        request.session[PENDING] = {"user": user.pk, "backend": backend, "at": time.time(), "next": next_url}
        return redirect("frontend:login-totp")
    auth.login(request, user, backend=backend)  # a new session id
    if second_factor and mfa_required(user):
        request.session[ENROL_REQUIRED] = True
        return redirect("frontend:account-totp")
    return redirect(next_url)
