"""Shared fixtures: real services when present, a clear skip (or, under CI, a failure) when not."""

import os
import socket

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def require(available: bool, what: str) -> None:
    """Skip when a service is missing on a developer's machine; fail under CI."""
    if available:
        return
    if IN_CI:
        pytest.fail(f"{what} is required under CI but is not available")
    pytest.skip(f"{what} is not available on this machine")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random-weight DeepSeek-V4 checkpoint with its tokenizer, built once per run."""
    from inference.tiny_checkpoint import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-v4"), seed=0)


def database_url() -> str:
    """The URL of the database the tests run on, for the processes they start."""
    from django.db import connection

    db = connection.settings_dict
    if connection.vendor == "postgresql":
        auth = db["USER"] + (f":{db['PASSWORD']}" if db.get("PASSWORD") else "")
        return f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"
    return f"sqlite:///{db['NAME']}"


@pytest.fixture
def cli_env(tmp_path):
    """Environment for a `citadel` subprocess that must see this test's database."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env.update(DJANGO_SETTINGS_MODULE="citadel.settings.test", DATABASE_URL=database_url(),
               CITADEL_DATA_DIR=str(tmp_path / "data"),
               PYTHONPATH=os.pathsep.join([str(root / "platform"), str(root), env.get("PYTHONPATH", "")]))
    return env


@pytest.fixture(scope="module")
def live_stack(django_db_setup, django_db_blocker, tiny_checkpoint, tmp_path_factory):
    """gunicorn + a real Celery worker on PostgreSQL and Redis, serving the tiny model as `tiny`."""
    import subprocess
    import sys

    import redis
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.db import connection

    from citadel.audit.services import Actor
    from citadel.registry.models import Worker
    from citadel.registry.services import deployment_create, model_register, pool_create
    from citadel.residency.models import DataClass
    from citadel.residency.services import policy_create
    from tests import live_stack as ls

    require(connection.vendor == "postgresql", "PostgreSQL on 127.0.0.1:5432")
    require(port_open("127.0.0.1", 6379), "Redis on 127.0.0.1:6379")
    redis.Redis.from_url(ls.REDIS_URL).flushdb()  # no stale messages from an earlier run
    logs = tmp_path_factory.mktemp("live-logs")
    env = ls.process_env(database_url(), tmp_path_factory.mktemp("live-data"))
    pool = "e2e"
    with django_db_blocker.unblock():
        get_user_model().objects.create_user("e2e-admin", password="e2e-admin-password-123", is_staff=True)
        model = model_register(name="tiny", path=str(tiny_checkpoint), actor=Actor.system())
        pool_row = pool_create(name=pool, site="site-a", actor=Actor.system())
        deployment_create(model=model, pool=pool_row, actor=Actor.system(), engine_settings={"device": "cpu"})
        # Residency denies what no policy allows: keys without a team may send internal data to site-a.
        policy_create(team=None, data_class=DataClass.objects.get(name="internal"), actor=Actor.system(),
                      processing_sites=[pool_row.site], storage_sites=[pool_row.site], prompt_retention="full")
    created = subprocess.run([sys.executable, "-m", "citadel.cli", "keys", "create", "--user", "e2e-admin",
                              "--name", "e2e"], env=env, capture_output=True, text=True, check=True)
    stack, processes = ls.launch(env=env, pool=pool, api_key=created.stdout.strip().splitlines()[-1], logs=logs)
    try:
        with django_db_blocker.unblock():
            ls.wait_until(lambda: Worker.objects.filter(pool__name=pool, status="online")
                          .exclude(loaded_models=[]).exists(), 90,
                          "the worker coming online with its model loaded", stack)
        yield stack
    finally:
        ls.stop(processes)
        with django_db_blocker.unblock():
            call_command("flush", interactive=False, verbosity=0)
            with connection.cursor() as cursor:  # a straggling connection would block dropping the test DB
                cursor.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                               "WHERE datname = current_database() AND pid <> pg_backend_pid()")


@pytest.fixture(scope="module")
def single_threaded_torch():
    """One torch thread for a module's tests (`pytestmark = pytest.mark.usefixtures(...)`): engine
    comparisons against a reference stay bit-stable and fast on a 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
