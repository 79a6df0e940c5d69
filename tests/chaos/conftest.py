"""The fault tests' stacks: one per broker, on a private PostgreSQL, started once per session.

CITADEL_CHAOS_ROUNDS is the number of worker kills in all (mid-inference and mid-fine-tune,
both brokers); `make test` runs a few, `make chaos` a hundred.
"""

import os
import tempfile
from pathlib import Path

import pytest

from tests.chaos.services import Postgres, RabbitMQ, Redis
from tests.chaos.stack import ChaosStack
from tests.conftest import require

ROUNDS = int(os.environ.get("CITADEL_CHAOS_ROUNDS", "3"))
# How long a broker may keep an unacknowledged message before handing it out again: shorter than
# the jobs the tests run, so every job also shows that a redelivered message does no harm.
REDIS_VISIBILITY_SECONDS = 3
RABBITMQ_CONSUMER_TIMEOUT_MS = 8000


def rounds(kind: str, broker: str) -> int:
    """Kills of this kind on this broker: a tenth mid-fine-tune (Redis), the rest mid-inference,
    two thirds of those on Redis; at least one of each."""
    fine_tune = max(1, ROUNDS // 10)
    if kind == "fine_tune":
        return fine_tune
    inference = max(2, ROUNDS - fine_tune)
    on_redis = max(1, (2 * inference + 2) // 3)
    return on_redis if broker == "redis" else max(1, inference - on_redis)


def _binaries() -> bool:
    from tests.chaos.services import binary

    return bool(binary("redis-server", []) and binary("initdb", ["/usr/lib/postgresql/*/bin/initdb"]))


@pytest.fixture(scope="session")
def chaos_postgres(tmp_path_factory):
    require(_binaries(), "redis-server and PostgreSQL's initdb/pg_ctl (for private instances)")
    # Not under pytest's folder: its parents are private to this user, and the server may run as `postgres`.
    postgres = Postgres(Path(tempfile.mkdtemp(prefix="citadel-chaos-pg-")))
    postgres.init()
    yield postgres
    postgres.destroy()


def _stack(tmp_path_factory, tiny_checkpoint, postgres: Postgres, broker_name: str):
    root = tmp_path_factory.mktemp(f"chaos-{broker_name}")
    if broker_name == "redis":
        broker = Redis(root / "redis")
        broker.start()
        extra = {"CITADEL_BROKER_VISIBILITY_SECONDS": str(REDIS_VISIBILITY_SECONDS)}
    else:
        require(RabbitMQ.available(), "RabbitMQ's rabbitmq-server (for a private node)")
        broker = RabbitMQ(root / "rabbitmq", consumer_timeout_ms=RABBITMQ_CONSUMER_TIMEOUT_MS)
        broker.start()
        extra = {}
    # Each stack has its own database in the private cluster.
    database = f"citadel_{broker_name}"
    postgres.pg_ctl("status")
    import psycopg

    with psycopg.connect(f"postgresql://postgres@127.0.0.1:{postgres.port}/citadel", autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")  # left by a stack that failed to start
        conn.execute(f"CREATE DATABASE {database}")
    stack = ChaosStack(root=root, database_url=f"postgres://postgres@127.0.0.1:{postgres.port}/{database}",
                       broker_url=broker.url, broker=broker, postgres=postgres, extra_env=extra)
    try:
        stack.setup(tiny_checkpoint)
        stack.start()
    except BaseException:
        stack.stop()
        (broker.destroy if hasattr(broker, "destroy") else broker.stop)()
        raise
    return stack


@pytest.fixture(scope="session")
def chaos_stacks(tmp_path_factory, tiny_checkpoint, chaos_postgres):
    """get(broker) -> that broker's stack, started on first use and stopped at the session's end."""
    stacks: dict[str, ChaosStack] = {}

    def get(broker_name: str) -> ChaosStack:
        if broker_name not in stacks:
            stacks[broker_name] = _stack(tmp_path_factory, tiny_checkpoint, chaos_postgres, broker_name)
        return stacks[broker_name]

    yield get
    for stack in stacks.values():
        stack.stop()
        (stack.broker.destroy if hasattr(stack.broker, "destroy") else stack.broker.stop)()


@pytest.fixture(params=["redis", "rabbitmq"])
def chaos_stack(request, chaos_stacks):
    return chaos_stacks(request.param)


@pytest.fixture
def redis_stack(chaos_stacks):
    return chaos_stacks("redis")
