"""Settings shared by every environment. Every value is read from the environment.

Variables (all optional here; production.py makes the secrets mandatory):
    CITADEL_DATA_DIR     where state lives (SQLite file, embedded broker, secrets); default ./var
    DATABASE_URL         e.g. postgres://user@127.0.0.1:5432/citadel; default SQLite in the data dir
    CELERY_BROKER_URL    e.g. redis://127.0.0.1:6379/0 or amqp://guest:guest@127.0.0.1:5672//;
                         default: the embedded filesystem transport under the data dir
    DJANGO_SECRET_KEY    required in production
    ALLOWED_HOSTS        comma-separated
    CSRF_TRUSTED_ORIGINS comma-separated origins
    CITADEL_WORKER_STALE_SECONDS  a worker whose heartbeat is older is treated as gone (30)
    CITADEL_REQUEST_TIMEOUT_SECONDS  how long an API request waits for its job (300)
    CITADEL_POOL_QUEUE_LIMIT  requests a pool queues beyond its workers' slots before answering 429 (64;
                         WorkerPool.queue_limit overrides it per pool); CITADEL_POOL_WORKER_SLOTS  requests one
                         worker runs at once (16, `citadel worker --concurrency`); CITADEL_POOL_RETRY_AFTER_SECONDS (2)
    CITADEL_AUDIT_SIGNING_KEY  Ed25519 private key signing audit checkpoints (PEM, or base64 from
                         `citadel audit keygen`); required in production, kept in the data dir otherwise
    CITADEL_AUDIT_TRUSTED_PUBLIC_KEYS  comma-separated older public keys still trusted after a rotation
    CITADEL_AUDIT_CHECKPOINT_SECONDS  how often beat signs the audit chain's head (300)
    CITADEL_AUDIT_RETENTION_DAYS  purge audit records older than this, except legal holds (0: keep all)
    CITADEL_FINETUNE_MAX_FILE_BYTES  largest fine-tuning upload (100 MiB)
    CITADEL_FINETUNE_MAX_EXAMPLES  most examples in one training file (0: no limit)
    CITADEL_FINETUNE_MAX_JOB_TOKENS  most tokens one job may train on, all epochs (50 million; 0: no limit)
    CITADEL_FINETUNE_TEAM_TOKENS_30D  most tokens a team's jobs may train on in 30 days (0: no limit)
    CITADEL_FINETUNE_MAX_ATTEMPTS  workers a job may be started on before a lost worker fails it (3)
    CITADEL_FINETUNE_TIME_LIMIT_SECONDS  a training run is stopped and failed after this long (86400)
    CITADEL_FINETUNE_DEVICE  the trainer's device on workers: auto, cpu or cuda (auto)
    CITADEL_FINETUNE_WORKER_SLOTS  fine-tuning jobs one worker process trains at once (1)
    CITADEL_BATCH_MAX_FILE_BYTES  largest batch input file (200 MiB); CITADEL_BATCH_MAX_LINES (50000)
    CITADEL_BATCH_CHUNK_LINES  lines a worker hands the engine at once (128); CITADEL_BATCH_FEEDERS  chunks
                         in flight per batch task (4). Keep their product at about 4x the engine's max_num_seqs
                         (128 by default): a chunk stays open until its longest line ends, long after most
                         of its lines did, so a smaller window leaves the engine's batch half empty
                         (bench/batch.py: 206 engine steps for 1,024 lines at 64 x 3 against the offline 161)
    PROMETHEUS_MULTIPROC_DIR  where gunicorn's processes share their metrics (default: <data dir>/prometheus)
    CITADEL_QUOTA_REDIS_URL  Redis for the per-minute quota windows (default: CELERY_BROKER_URL when it
                         is Redis; otherwise the database counts them)
    CITADEL_SESSION_IDLE_SECONDS  a console session ends after this long without a request (1800)
    CITADEL_LOGIN_MAX_FAILURES / CITADEL_LOGIN_ADDRESS_MAX_FAILURES / CITADEL_LOGIN_FAILURE_WINDOW_SECONDS /
    CITADEL_LOGIN_LOCKOUT_SECONDS  password failures per account (5) and per address (20) within the window
                         (3600 s) that lock the account or address for the cool-off (900 s)
    CITADEL_MFA_REQUIRED  console sign-ins of administrators and operators need TOTP (true)
    CITADEL_OIDC_ISSUER, CITADEL_OIDC_CLIENT_ID, CITADEL_OIDC_CLIENT_SECRET  single sign-on (off when unset);
    CITADEL_OIDC_GROUPS_CLAIM (groups), CITADEL_OIDC_SCOPES ("openid email profile groups"),
    CITADEL_OIDC_MFA_FROM_PROVIDER  trust the provider's second factor for administrators (false)
"""

import os
from pathlib import Path

import environ

env = environ.Env()

REPO_DIR = Path(__file__).resolve().parents[3]
DATA_DIR = Path(env.str("CITADEL_DATA_DIR", default=str(REPO_DIR / "var"))).resolve()

DEBUG = env.bool("DJANGO_DEBUG", default=False)
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["127.0.0.1", "localhost"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_htmx",
    "citadel.core",
    "citadel.audit",
    "citadel.accounts",
    "citadel.quotas",
    "citadel.sso",
    "citadel.residency",
    "citadel.registry",
    "citadel.jobs",
    "citadel.gateway",
    "citadel.finetuning",
    "citadel.batches",
    "citadel.usage",
    "frontend",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "csp.middleware.CSPMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "frontend.database_unavailable.DatabaseUnavailableMiddleware",  # PostgreSQL down: 503, not 500
    "citadel.core.middleware.RequestIdMiddleware",
    "citadel.core.unstorable.UnstorableTextMiddleware",  # NUL or a lone surrogate: 400 naming the field
    "citadel.usage.metrics.RequestMetricsMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "citadel.accounts.middleware.MfaEnrolmentMiddleware",
    "citadel.accounts.middleware.AuditorReadOnlyMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "citadel.core.middleware.ServiceUnavailableMiddleware",
]

ROOT_URLCONF = "citadel.urls"
WSGI_APPLICATION = "citadel.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": env.db_url("DATABASE_URL", default=f"sqlite:///{DATA_DIR / 'citadel.sqlite3'}"),
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Web, worker and beat are separate processes in the embedded mode: WAL lets readers
    # run beside one writer, IMMEDIATE transactions avoid lock upgrades failing mid-way.
    DATABASES["default"]["OPTIONS"] = {
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        "transaction_mode": "IMMEDIATE",
        "timeout": 30,
    }
else:
    DATABASES["default"]["CONN_MAX_AGE"] = env.int("CONN_MAX_AGE", default=0)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

PASSWORD_HASHERS = [
    "django.contrib.auth.hashers.Argon2PasswordHasher",
    "django.contrib.auth.hashers.PBKDF2PasswordHasher",
]
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator", "OPTIONS": {"min_length": 12}},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "frontend:login"
LOGIN_REDIRECT_URL = "frontend:models"
LOGOUT_REDIRECT_URL = "frontend:login"

SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
# Idle expiry: every request saves the session, so its age counts from the last request.
SESSION_COOKIE_AGE = env.int("CITADEL_SESSION_IDLE_SECONDS", default=30 * 60)
SESSION_SAVE_EVERY_REQUEST = True
SESSION_EXPIRE_AT_BROWSER_CLOSE = True
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
# Content-Security-Policy (django-csp; Django 5.2 has none of its own): the console runs only its own
# static scripts and styles, nothing inline, so an injected <script> or style="" does nothing.
# The API's Swagger page and Django's admin ship inline code of their own and are left out.
CONTENT_SECURITY_POLICY = {
    "EXCLUDE_URL_PREFIXES": ["/api/docs/", "/admin/"],
    "DIRECTIVES": {
        "default-src": ["'self'"], "script-src": ["'self'"], "style-src": ["'self'"], "img-src": ["'self'", "data:"],
        "connect-src": ["'self'"], "font-src": ["'self'"], "object-src": ["'none'"], "base-uri": ["'none'"],
        "form-action": ["'self'"], "frame-ancestors": ["'none'"],
    },
}

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "/static/"
STATIC_ROOT = DATA_DIR / "static"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
# Serve straight from the apps' static folders when collectstatic has not run (make run).
WHITENOISE_USE_FINDERS = True

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "citadel.accounts.authentication.ApiKeyAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    # Roles, API-key scopes and auditors' read-only rule (citadel.accounts.permissions); quotas per key and team.
    "DEFAULT_PERMISSION_CLASSES": ["citadel.accounts.permissions.RoleAccess"],
    "DEFAULT_THROTTLE_CLASSES": ["citadel.quotas.throttles.QuotaThrottle"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "citadel.core.handlers.api_exception_handler",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Citadel management API",
    "DESCRIPTION": "Models, deployments, worker pools, workers and API keys. "
    "The OpenAI-compatible API lives under /v1.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

CITADEL_WORKER_STALE_SECONDS = env.int("CITADEL_WORKER_STALE_SECONDS", default=30)
CITADEL_WORKER_HEARTBEAT_SECONDS = env.int("CITADEL_WORKER_HEARTBEAT_SECONDS", default=5)
CITADEL_REQUEST_TIMEOUT_SECONDS = env.int("CITADEL_REQUEST_TIMEOUT_SECONDS", default=300)
CITADEL_STREAM_POLL_SECONDS = env.float("CITADEL_STREAM_POLL_SECONDS", default=0.02)
# With PostgreSQL a waiting request is woken by its worker's commit; it checks anyway this often.
CITADEL_JOB_WAKEUP_CHECK_SECONDS = env.float("CITADEL_JOB_WAKEUP_CHECK_SECONDS", default=0.5)
# Graceful overload (citadel.jobs.admission).
CITADEL_POOL_QUEUE_LIMIT = env.int("CITADEL_POOL_QUEUE_LIMIT", default=64)
CITADEL_POOL_WORKER_SLOTS = env.int("CITADEL_POOL_WORKER_SLOTS", default=16)
CITADEL_POOL_RETRY_AFTER_SECONDS = env.int("CITADEL_POOL_RETRY_AFTER_SECONDS", default=2)
# Addresses of reverse proxies whose X-Forwarded-For is believed for the audit's source address.
CITADEL_TRUSTED_PROXIES = env.list("CITADEL_TRUSTED_PROXIES", default=[])
# The audit log's signing key (platform/citadel/audit/signing.py); local and test settings name a
# file in the data dir instead, made on first use; production requires the key.
CITADEL_AUDIT_SIGNING_KEY = env.str("CITADEL_AUDIT_SIGNING_KEY", default="")
CITADEL_AUDIT_SIGNING_KEY_FILE = None
CITADEL_AUDIT_TRUSTED_PUBLIC_KEYS = env.list("CITADEL_AUDIT_TRUSTED_PUBLIC_KEYS", default=[])
CITADEL_AUDIT_RETENTION_DAYS = env.int("CITADEL_AUDIT_RETENTION_DAYS", default=0)

# Identity and access (citadel.accounts, citadel.quotas, citadel.sso).
AUTHENTICATION_BACKENDS = ["citadel.accounts.backends.LockoutModelBackend"]
CITADEL_LOGIN_MAX_FAILURES = env.int("CITADEL_LOGIN_MAX_FAILURES", default=5)
CITADEL_LOGIN_ADDRESS_MAX_FAILURES = env.int("CITADEL_LOGIN_ADDRESS_MAX_FAILURES", default=20)
CITADEL_LOGIN_FAILURE_WINDOW_SECONDS = env.int("CITADEL_LOGIN_FAILURE_WINDOW_SECONDS", default=3600)
CITADEL_LOGIN_LOCKOUT_SECONDS = env.int("CITADEL_LOGIN_LOCKOUT_SECONDS", default=900)
CITADEL_MFA_REQUIRED = env.bool("CITADEL_MFA_REQUIRED", default=True)
CITADEL_OIDC_ISSUER = env.str("CITADEL_OIDC_ISSUER", default="")
CITADEL_OIDC_CLIENT_ID = env.str("CITADEL_OIDC_CLIENT_ID", default="")
CITADEL_OIDC_CLIENT_SECRET = env.str("CITADEL_OIDC_CLIENT_SECRET", default="")
CITADEL_OIDC_GROUPS_CLAIM = env.str("CITADEL_OIDC_GROUPS_CLAIM", default="groups")
CITADEL_OIDC_SCOPES = env.str("CITADEL_OIDC_SCOPES", default="openid email profile groups")
# Single sign-on of administrators and operators still asks for Citadel's TOTP unless this says the
# provider enforces a second factor itself.
CITADEL_OIDC_MFA_FROM_PROVIDER = env.bool("CITADEL_OIDC_MFA_FROM_PROVIDER", default=False)
# LoRA fine-tuning (citadel.finetuning): upload and quota limits, checked before any GPU time.
CITADEL_FINETUNE_MAX_FILE_BYTES = env.int("CITADEL_FINETUNE_MAX_FILE_BYTES", default=100 * 1024 * 1024)
CITADEL_FINETUNE_MAX_EXAMPLES = env.int("CITADEL_FINETUNE_MAX_EXAMPLES", default=0)
CITADEL_FINETUNE_MAX_JOB_TOKENS = env.int("CITADEL_FINETUNE_MAX_JOB_TOKENS", default=50_000_000)
CITADEL_FINETUNE_TEAM_TOKENS_30D = env.int("CITADEL_FINETUNE_TEAM_TOKENS_30D", default=0)
CITADEL_FINETUNE_MAX_ATTEMPTS = env.int("CITADEL_FINETUNE_MAX_ATTEMPTS", default=3)
CITADEL_FINETUNE_TIME_LIMIT_SECONDS = env.int("CITADEL_FINETUNE_TIME_LIMIT_SECONDS", default=24 * 3600)
CITADEL_FINETUNE_DEVICE = env.str("CITADEL_FINETUNE_DEVICE", default="auto")
CITADEL_FINETUNE_WORKER_SLOTS = env.int("CITADEL_FINETUNE_WORKER_SLOTS", default=1)
# Batches (citadel.batches) and metrics (citadel.usage.metrics).
CITADEL_BATCH_MAX_FILE_BYTES = env.int("CITADEL_BATCH_MAX_FILE_BYTES", default=200 * 1024 * 1024)
CITADEL_BATCH_MAX_LINES = env.int("CITADEL_BATCH_MAX_LINES", default=50_000)
CITADEL_BATCH_CHUNK_LINES = env.int("CITADEL_BATCH_CHUNK_LINES", default=128)
CITADEL_BATCH_FEEDERS = env.int("CITADEL_BATCH_FEEDERS", default=4)
# Every process of this host (gunicorn's workers, a Celery worker) writes its metrics here, so they add up.
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", str(DATA_DIR / "prometheus"))

from citadel.settings.celery import *  # noqa: E402,F403
from citadel.settings.celery import CELERY_BROKER_URL  # noqa: E402

CITADEL_QUOTA_REDIS_URL = env.str(
    "CITADEL_QUOTA_REDIS_URL", default=CELERY_BROKER_URL if CELERY_BROKER_URL.startswith("redis") else "")
from citadel.settings.logging import *  # noqa: E402,F403
