"""A user's console sessions, for the account page's list of active sessions and its revoke button.

Sessions live in Django's database session store, which is not indexed by user: a sign-in notes when
and from where (address, browser) in the session itself, and the list decodes the unexpired sessions
and keeps the user's. With the 30-minute idle expiry there are few unexpired sessions to decode.
"""

from django.contrib.auth import SESSION_KEY
from django.contrib.auth.signals import user_logged_in
from django.contrib.sessions.models import Session
from django.dispatch import receiver
from django.utils import timezone

from citadel.core.net import client_address

INFO = "citadel_signed_in"


@receiver(user_logged_in)
def _note_sign_in(sender, request, user, **kwargs):
    session = getattr(request, "session", None)
    if session is not None:
        session[INFO] = {"at": timezone.now().isoformat(timespec="seconds"), "address": client_address(request),
                         "agent": request.META.get("HTTP_USER_AGENT", "")[:200]}


def sessions_of(user, current_key: str | None) -> list[dict]:
    """The user's unexpired sessions, the current one first."""
    rows = []
    for session in Session.objects.filter(expire_date__gt=timezone.now()).order_by("-expire_date"):
        data = session.get_decoded()
        if str(data.get(SESSION_KEY)) != str(user.pk):
            continue
        info = data.get(INFO) or {}
        rows.append({"id": _public_id(session.session_key), "current": session.session_key == current_key,
                     "signed_in": info.get("at", "unknown"), "address": info.get("address") or "unknown",
                     "agent": info.get("agent") or "unknown", "expires": session.expire_date})
    rows.sort(key=lambda row: not row["current"])
    return rows


def _public_id(session_key: str) -> str:
    """What the page shows and posts back: not the session key itself, which would sign anyone in."""
    import hashlib

    return hashlib.sha256(session_key.encode()).hexdigest()[:16]


def session_revoke(user, public_id: str) -> bool:
    """Ends the user's session with that id; False when there is none (or it is another user's)."""
    for session in Session.objects.filter(expire_date__gt=timezone.now()):
        if _public_id(session.session_key) == public_id and str(session.get_decoded().get(SESSION_KEY)) == str(user.pk):
            session.delete()
            return True
    return False


def sessions_end_others(user, current_key: str | None) -> int:
    """Ends every other session of the user (after a password change); returns how many."""
    ended = 0
    for session in Session.objects.filter(expire_date__gt=timezone.now()):
        if session.session_key != current_key and str(session.get_decoded().get(SESSION_KEY)) == str(user.pk):
            session.delete()
            ended += 1
    return ended
