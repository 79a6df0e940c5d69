"""Password sign-in that refuses locked accounts and addresses before the password is even checked."""

from django.contrib.auth.backends import ModelBackend
from django.core.exceptions import PermissionDenied

from citadel.accounts.lockout import login_lock_active
from citadel.core.net import client_address


class LockedOut(PermissionDenied):
    """Raised by the backend so Django stops trying other backends; the login form reports it."""


class LockoutModelBackend(ModelBackend):
    def authenticate(self, request, username=None, password=None, **kwargs):
        if username is None:
            username = kwargs.get(self._username_field())
        if username and request is not None:
            lock = login_lock_active(username=str(username), address=client_address(request))
            if lock is not None:
                request.citadel_lock = lock
                raise LockedOut(f"locked until {lock.until.isoformat()}")
        return super().authenticate(request, username=username, password=password, **kwargs)

    @staticmethod
    def _username_field() -> str:
        from django.contrib.auth import get_user_model

        return get_user_model().USERNAME_FIELD
