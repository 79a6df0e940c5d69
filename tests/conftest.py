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
