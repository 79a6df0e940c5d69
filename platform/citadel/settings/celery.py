"""Celery settings: the broker from CELERY_BROKER_URL, else an embedded filesystem transport.

The broker is transport only (DESIGN.md): jobs, states and results live in the database, so
results are not stored in Celery and a redelivered message finds its job already done.
"""

from pathlib import Path

import environ

env = environ.Env()

_data_dir = Path(env.str("CITADEL_DATA_DIR", default=str(Path(__file__).resolve().parents[3] / "var")))

CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default="filesystem://")
CELERY_BROKER_TRANSPORT_OPTIONS = {}
if CELERY_BROKER_URL.startswith("filesystem://"):
    _queue_dir = (_data_dir / "broker" / "queue").resolve()
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_queue_dir),
        "data_folder_out": str(_queue_dir),
        "processed_folder": str((_data_dir / "broker" / "processed").resolve()),
        # Exchange tables (fanout, pidbox); kombu's default is "control" under the working directory.
        "control_folder": str((_data_dir / "broker" / "control").resolve()),
        "store_processed": False,
        "polling_interval": 0.05,
    }
elif CELERY_BROKER_URL.startswith("redis"):
    # Longer than the longest task, so an unacknowledged job is not handed out twice while
    # it still runs; a redelivery after a crash is harmless because tasks are idempotent.
    # A message redelivered after this is harmless (the job's lease is live, or the job is done:
    # see citadel.jobs.leases); CITADEL_BROKER_VISIBILITY_SECONDS shortens it for the fault tests.
    CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": env.int("CITADEL_BROKER_VISIBILITY_SECONDS",
                                                                     default=3 * 3600)}

CELERY_TASK_IGNORE_RESULT = True
CELERY_RESULT_BACKEND = None
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_ACKS_LATE = True
# A task whose worker process dies goes back to the queue (prefork pools; with `citadel worker`'s
# thread pool the whole process dies and the unacknowledged message is redelivered anyway).
# Safe because every task is idempotent: it locks its row and does only what is missing.
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# Celery's Django fixup closes a task's database connection after every task unless this is set; with
# it, citadel.jobs.tasks closes connections as Django does for requests (older than CONN_MAX_AGE, or
# broken), so a worker thread keeps its connection between jobs.
CELERY_DB_REUSE_MAX = 100_000
# Retried for ever with backoff, so workers consume again after the broker restarts.
CELERY_BROKER_CONNECTION_MAX_RETRIES = None

# Leases on running jobs (citadel.jobs.leases, RELIABILITY.md): a dead worker's job is found by the
# reconciler within CITADEL_JOB_LEASE_SECONDS + CITADEL_RECONCILE_SECONDS and re-enqueued, or failed
# once it has been tried CITADEL_JOB_MAX_ATTEMPTS times.
CITADEL_JOB_LEASE_SECONDS = env.float("CITADEL_JOB_LEASE_SECONDS", default=60.0)
CITADEL_JOB_LEASE_RENEW_SECONDS = env.float("CITADEL_JOB_LEASE_RENEW_SECONDS",
                                            default=max(0.5, CITADEL_JOB_LEASE_SECONDS / 6))
CITADEL_JOB_MAX_ATTEMPTS = env.int("CITADEL_JOB_MAX_ATTEMPTS", default=3)
CITADEL_RECONCILE_SECONDS = env.float("CITADEL_RECONCILE_SECONDS", default=15.0)
# A queued job whose message has not been taken this long after it was sent is sent again, up to
# CITADEL_JOB_MAX_DISPATCHES sends (then it fails as worker_lost: no worker is taking its pool's jobs).
CITADEL_JOB_RESEND_SECONDS = env.float("CITADEL_JOB_RESEND_SECONDS", default=30.0)
CITADEL_JOB_MAX_DISPATCHES = env.int("CITADEL_JOB_MAX_DISPATCHES", default=5)
CELERY_TASK_DEFAULT_QUEUE = "control"
# Every task's queue, named: housekeeping on `control`; the work itself on the pool queue that
# the publisher names (citadel.celery.pool_queue), which no route overrides.
CELERY_TASK_ROUTES = {
    "citadel.jobs.reconcile": {"queue": "control"}, "citadel.jobs.redispatch_queued": {"queue": "control"},
    "citadel.jobs.prompts_purge": {"queue": "control"}, "citadel.finetuning.recover": {"queue": "control"},
    "citadel.batches.recover": {"queue": "control"}, "citadel.registry.workers_mark_stale": {"queue": "control"},
    "citadel.usage.*": {"queue": "control"}, "citadel.audit.*": {"queue": "control"},
}
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_BEAT_SCHEDULE_FILENAME = str(_data_dir / "celerybeat-schedule")
CELERY_BEAT_SCHEDULE = {
    "workers-mark-stale": {"task": "citadel.registry.workers_mark_stale", "schedule": 15.0},
    # Expired leases (dead workers) re-enqueued or failed; queued jobs whose message was lost sent again
    # (what citadel.jobs.redispatch_queued did alone before).
    "jobs-reconcile": {"task": "citadel.jobs.reconcile", "schedule": CITADEL_RECONCILE_SECONDS},
    # Fine-tuning jobs whose worker died go back to the queue (resume from checkpoint) or fail.
    "finetuning-recover": {"task": "citadel.finetuning.recover", "schedule": 15.0},
    # Batches: lines of dead workers back to pending, lost messages sent again, expiry; usage of ended
    # fine-tuning jobs metered.
    "batches-recover": {"task": "citadel.batches.recover", "schedule": 15.0},
    "usage-meter-fine-tuning": {"task": "citadel.usage.meter_fine_tuning", "schedule": 60.0},
    # Sign the audit chain's head; purge audit records past CITADEL_AUDIT_RETENTION_DAYS (if set).
    "audit-checkpoint": {"task": "citadel.audit.checkpoint",
                         "schedule": env.float("CITADEL_AUDIT_CHECKPOINT_SECONDS", default=300.0)},
    "audit-retention-purge": {"task": "citadel.audit.retention_purge", "schedule": 6 * 3600.0},
    # Drop kept prompts whose residency policy's retention days are over.
    "jobs-prompts-purge": {"task": "citadel.jobs.prompts_purge", "schedule": 3600.0},
}
