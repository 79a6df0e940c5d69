"""Production settings: secrets have no default, so a missing one fails at start."""

from citadel.settings.base import *  # noqa: F403
from citadel.settings.base import env

SECRET_KEY = env.str("DJANGO_SECRET_KEY")
CITADEL_AUDIT_SIGNING_KEY = env.str("CITADEL_AUDIT_SIGNING_KEY")  # `citadel audit keygen` makes one
DEBUG = False

SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=True)
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=31536000)
SECURE_HSTS_INCLUDE_SUBDOMAINS = True
SECURE_HSTS_PRELOAD = True
SESSION_COOKIE_SECURE = True
CSRF_COOKIE_SECURE = True

if DATABASES["default"]["ENGINE"] != "django.db.backends.sqlite3":  # noqa: F405
    # Each web and worker thread keeps its PostgreSQL connection (a minute at most) instead of opening one
    # per request or task, which cost every request a backend start; the health check (one round trip per
    # request) drops a connection the server closed (a restart) before it is used. Peak connections are
    # then web workers x threads + worker concurrency + one listener per web process.
    DATABASES["default"]["CONN_MAX_AGE"] = env.int("CONN_MAX_AGE", default=60)  # noqa: F405
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = env.bool("CONN_HEALTH_CHECKS", default=True)  # noqa: F405
