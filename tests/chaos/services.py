"""Private PostgreSQL, Redis and RabbitMQ instances that the fault tests may stop, kill and restart.

The development machines share one PostgreSQL (5432), Redis (6379) and RabbitMQ (5672) between
many test runs, so the fault tests never touch those: each starts its own on a free port in a
temporary folder, which is also what lets them run on a fresh CI machine with only the packages
installed. PostgreSQL refuses to run as root, so under root its commands run as the `postgres`
user. RabbitMQ runs as a second node (its own name, ports, Erlang cookie via HOME, no plugins).
"""

import glob
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.live_stack import free_port


def _wait_port(port: int, timeout: float, what: str) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"{what} did not listen on port {port} within {timeout}s")


def binary(name: str, patterns: list[str]) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    matches = sorted(m for p in patterns for m in glob.glob(p))
    return matches[-1] if matches else None


@dataclass
class Redis:
    """redis-server on a free port, without persistence (a restart loses what the broker held)."""

    root: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        log = (self.root / "redis.log").open("a")
        self.process = subprocess.Popen(
            [binary("redis-server", []) or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.root)], stdout=log, stderr=subprocess.STDOUT)
        _wait_port(self.port, 20, "redis-server")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def restart(self, down_seconds: float = 0.0) -> None:
        self.stop()
        time.sleep(down_seconds)
        self.start()


@dataclass
class Postgres:
    """A PostgreSQL cluster made by initdb in a temporary folder, run by pg_ctl on a free port."""

    root: Path
    port: int = field(default_factory=free_port)

    @property
    def url(self) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/citadel"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = list(args)
        if os.geteuid() == 0:  # PostgreSQL will not run as root
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=120)

    @property
    def data(self) -> Path:
        return self.root / "data"

    def init(self) -> None:
        initdb = binary("initdb", ["/usr/lib/postgresql/*/bin/initdb"])
        if initdb is None:
            raise RuntimeError("initdb not found; install PostgreSQL's server package")
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        self._run(initdb, "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8")
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{self.root}'\n"
                       "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 200\n")
        self.start()
        self._run(binary("createdb", ["/usr/lib/postgresql/*/bin/createdb"]) or "createdb",
                  "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "citadel")

    def pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self._run(binary("pg_ctl", ["/usr/lib/postgresql/*/bin/pg_ctl"]) or "pg_ctl", "-D", str(self.data),
                         "-l", str(self.root / "postgres.log"), *args, check=check)

    def start(self) -> None:
        self.pg_ctl("start", "-w", "-t", "60")
        _wait_port(self.port, 30, "postgres")

    def stop(self, mode: str = "fast") -> None:
        self.pg_ctl("stop", "-m", mode, "-w", "-t", "60", check=False)

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class RabbitMQ:
    """A second RabbitMQ node: its own name, AMQP and distribution ports, data, logs and cookie.

    `consumer_timeout_ms` is the broker's redelivery timeout for an unacknowledged message (30 min
    by default); the fault tests set it short to show that a longer job is still run once.
    """

    root: Path
    port: int = field(default_factory=free_port)
    consumer_timeout_ms: int = 1_800_000

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    @property
    def node(self) -> str:
        return f"citadel-chaos-{self.port}@localhost"

    @staticmethod
    def available() -> bool:
        return bool(binary("rabbitmq-server", ["/usr/lib/rabbitmq/bin/rabbitmq-server"]))

    def _env(self) -> dict:
        env = dict(os.environ)
        env.update(HOME=str(self.root), RABBITMQ_NODENAME=self.node, RABBITMQ_NODE_PORT=str(self.port),
                   RABBITMQ_DIST_PORT=str(self.dist_port), RABBITMQ_MNESIA_BASE=str(self.root / "mnesia"),
                   RABBITMQ_LOG_BASE=str(self.root / "log"), RABBITMQ_PID_FILE=str(self.root / "pid"),
                   RABBITMQ_ENABLED_PLUGINS_FILE=str(self.root / "enabled_plugins"),
                   RABBITMQ_CONFIG_FILE=str(self.root / "rabbitmq.conf"))
        return env

    def _bin(self, name: str) -> str:
        # The scripts in /usr/lib/rabbitmq/bin run as the caller; /usr/sbin's would switch users.
        direct = Path("/usr/lib/rabbitmq/bin") / name
        return str(direct) if direct.exists() else (binary(name, []) or name)

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not hasattr(self, "dist_port"):
            self.dist_port = free_port()
        (self.root / "enabled_plugins").write_text("[].\n")
        (self.root / "rabbitmq.conf").write_text(f"listeners.tcp.default = {self.port}\nloopback_users = none\n"
                                                 f"consumer_timeout = {self.consumer_timeout_ms}\n")
        subprocess.run([self._bin("rabbitmq-server"), "-detached"], env=self._env(), check=True, timeout=60,
                       capture_output=True)
        _wait_port(self.port, 90, "rabbitmq")

    def stop(self) -> None:
        subprocess.run([self._bin("rabbitmqctl"), "-n", self.node, "stop"], env=self._env(), check=False,
                       timeout=60, capture_output=True)

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
