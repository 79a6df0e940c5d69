"""Settings for `make run` on one machine: embedded defaults, a secret key kept in the data dir."""

import os
import secrets

from citadel.settings.base import *  # noqa: F403
from citadel.settings.base import DATA_DIR, env


def _local_secret_key() -> str:
    """A random key made on first start and kept (mode 0600) so sessions survive restarts."""
    path = DATA_DIR / "secret_key"
    if not path.exists():
        DATA_DIR.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(50))
    return path.read_text().strip()


SECRET_KEY = env.str("DJANGO_SECRET_KEY", default="") or _local_secret_key()
CITADEL_AUDIT_SIGNING_KEY_FILE = DATA_DIR / "audit_signing_key"  # used when CITADEL_AUDIT_SIGNING_KEY is unset
