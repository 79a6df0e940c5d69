"""Settings for the test suite: PostgreSQL on localhost when it answers, SQLite otherwise.

Tests that need PostgreSQL, Redis or Chromium skip with a message when they are missing,
except under CI (CI=true), where a missing service fails them (see tests/conftest.py).
"""

import os
import socket
import tempfile

from citadel.settings.base import *  # noqa: F403
from citadel.settings.base import DATA_DIR, DATABASES, env

SECRET_KEY = "test-only-not-secret"  # noqa: S105 - the test settings never serve real users


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


if "DATABASE_URL" not in os.environ:
    if _port_open("127.0.0.1", 5432):
        DATABASES["default"] = env.db_url_config("postgres://postgres@127.0.0.1:5432/citadel")
    else:
        DATABASES["default"] = env.db_url_config(f"sqlite:///{tempfile.gettempdir()}/citadel-test.sqlite3")
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # A file, not memory, so that worker and web processes started by the tests share it.
    DATABASES["default"]["TEST"] = {"NAME": f"{tempfile.gettempdir()}/citadel-test-run.sqlite3"}

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # speed; tests only
CITADEL_WORKER_STALE_SECONDS = 10
CITADEL_AUDIT_SIGNING_KEY_FILE = DATA_DIR / "audit_signing_key"  # used when CITADEL_AUDIT_SIGNING_KEY is unset
STATIC_ROOT = None  # the tests serve static files from the apps (WHITENOISE_USE_FINDERS)
# In-process transport: unit tests that dispatch need no broker; e2e processes get Redis via the env.
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default="memory://")
CELERY_BROKER_TRANSPORT_OPTIONS = {}
if CELERY_BROKER_URL.startswith("redis") and "CITADEL_BROKER_VISIBILITY_SECONDS" in os.environ:  # tests/chaos
    # Swept every second (kombu's default is about 100 s), so the redelivery comes within the test.
    CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": env.int("CITADEL_BROKER_VISIBILITY_SECONDS"),
                                       "unacked_restore_interval": 1, "unacked_restore_throttle": 1}
