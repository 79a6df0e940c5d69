"""Fixtures for the Ansible tests: a real Debian 12 root file system to converge on, and runs of
ansible-playbook against it through Ansible's chroot connection.

The pristine root (debootstrap --variant=minbase, plus python3 for Ansible and systemd) is cached outside the
repository, at $CITADEL_TEST_ROOT_CACHE (default /var/cache/citadel-test-root), and built again
when missing (about a minute, from the mirror apt uses here). Each run converges a fresh copy.
"""

import fcntl
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.ansible import wheelhouse
from tests.conftest import IN_CI, port_open, require

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = REPO / "ansible"
EXAMPLE = ANSIBLE_DIR / "inventories" / "example"
VAULT_PASSWORD_FILE = EXAMPLE / "example-vault-password.txt"
ROOT_CACHE = Path(os.environ.get("CITADEL_TEST_ROOT_CACHE", "/var/cache/citadel-test-root"))
ROOT_READY = ".citadel-test-root-complete"
# Debian packages the converge downloaded, kept for the next run's apt (it still installs them).
DEB_CACHE = Path(f"{ROOT_CACHE}-debs")
SUITE = "bookworm"
# A plain host: Debian's minimal base, plus Python for Ansible and systemd (which every real host
# has, and whose systemctl enables units). A cache made by another recipe is made again.
INCLUDE = "python3,systemd"
RECIPE = f"debootstrap --variant=minbase --include={INCLUDE} {SUITE}\n"
# The folders of packages this machine has (/etc/pip.conf); the chroot gets them as hard links.
PACKAGE_FOLDERS = [Path("/opt/wheels"), Path("/opt/pypi"), Path("/opt/pypi-more")]
# The tree a wheel of Citadel is built from (pyproject.toml's packages and README).
PACKAGE_SOURCES = ["pyproject.toml", "README.md", "platform", "inference", "finetune", "frontend", "bench"]


def pytest_configure(config):
    config.addinivalue_line("markers", "converge: applies site.yml to a debootstrapped Debian root (minutes)")


def ansible_env() -> dict:
    """A clean environment: the chroot connection passes ansible-playbook's own environment into the
    chroot, and this test process's (Django's settings, pytest's) must not reach the target."""
    env = {name: os.environ[name] for name in ["PATH", "HOME", "LANG", "TERM", "TMPDIR"] if name in os.environ}
    env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    env.update(ANSIBLE_CONFIG=str(ANSIBLE_DIR / "ansible.cfg"), ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0",
               ANSIBLE_HOST_KEY_CHECKING="False", ANSIBLE_RETRY_FILES_ENABLED="False",
               ANSIBLE_CALLBACKS_ENABLED="ansible.posix.profile_tasks")  # the slowest tasks, at the end
    return env


def require_ansible() -> None:
    require(shutil.which("ansible-playbook") is not None,
            "ansible-playbook (Debian: apt-get install -y ansible ansible-lint debootstrap)")


def apt_mirror() -> str:
    """The Debian mirror apt uses on this machine (deb822 or one-line sources), else deb.debian.org."""
    for path in sorted(Path("/etc/apt").glob("sources.list.d/*.sources")):
        for block in path.read_text().split("\n\n"):
            uris = re.search(r"^URIs:\s*(\S+)", block, re.M)
            suites = re.search(r"^Suites:\s*(.+)$", block, re.M)
            if uris and suites and SUITE in suites.group(1).split():
                return uris.group(1)
    sources = Path("/etc/apt/sources.list")
    if sources.exists():
        match = re.search(rf"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+{SUITE}\s", sources.read_text(), re.M)
        if match:
            return match.group(1)
    return "http://deb.debian.org/debian"


def apt_proxy_env() -> dict:
    """apt's proxy (Acquire::http::Proxy), for debootstrap, which reads http_proxy instead."""
    env = dict(os.environ)
    if shutil.which("apt-config"):
        out = subprocess.run(["apt-config", "shell", "PROXY", "Acquire::http::Proxy"],
                             capture_output=True, text=True).stdout
        match = re.search(r"PROXY='([^']+)'", out)
        if match:
            env["http_proxy"] = match.group(1)
    return env


def ensure_root_cache() -> Path:
    """The cached pristine root; made with debootstrap when missing (one builder at a time)."""
    ROOT_CACHE.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{ROOT_CACHE}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ready = ROOT_CACHE / ROOT_READY
        if ready.exists() and ready.read_text() == RECIPE:
            return ROOT_CACHE
        building = Path(f"{ROOT_CACHE}.building")
        shutil.rmtree(building, ignore_errors=True)
        done = subprocess.run(["debootstrap", "--variant=minbase", f"--include={INCLUDE}", SUITE, str(building),
                               apt_mirror()], env=apt_proxy_env(), capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            pytest.fail(f"debootstrap could not build a {SUITE} root from {apt_mirror()}:\n{done.stdout[-3000:]}"
                        f"\n{done.stderr[-3000:]}")
        # What image builds do: package scripts must not start services in a chroot.
        policy = building / "usr/sbin/policy-rc.d"
        policy.write_text("#!/bin/sh\n# Citadel's converge test: no service starts in this chroot.\nexit 101\n")
        policy.chmod(0o755)
        (building / ROOT_READY).write_text(RECIPE)
        shutil.rmtree(ROOT_CACHE, ignore_errors=True)
        building.rename(ROOT_CACHE)
        return ROOT_CACHE


def link_or_copy_tree(source: Path, dest: Path) -> None:
    """Hard links (instant, and removing them never touches the originals), else a copy."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["cp", "-al", str(source), str(dest)], capture_output=True).returncode != 0:
        shutil.rmtree(dest, ignore_errors=True)
        subprocess.run(["cp", "-a", str(source), str(dest)], check=True)


def build_wheel(out: Path, mark: str = "") -> Path:
    """A wheel of this checkout, built from a copy so that nothing is written into the repository;
    `mark`, when given, is appended as a comment to citadel/__init__.py (a rebuilt package)."""
    source = out / "source"
    source.mkdir(parents=True)
    with tarfile.open(out / "source.tar", "w") as tar:
        for name in PACKAGE_SOURCES:
            tar.add(REPO / name, arcname=name, filter=lambda info: None if "__pycache__" in info.name else info)
    with tarfile.open(out / "source.tar") as tar:
        tar.extractall(source, filter="data")
    if mark:
        with open(source / "platform/citadel/__init__.py", "a") as module:
            module.write(f"# {mark}\n")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(out / "dist"), str(source)], check=True, capture_output=True, text=True)
    return next((out / "dist").glob("citadel-*.whl"))


@dataclass
class PlaybookRun:
    returncode: int
    output: str
    seconds: float
    recap: dict = field(default_factory=dict)

    def changed_tasks(self) -> list[str]:
        """The tasks that reported `changed`, by name."""
        task, changed = "", []
        for line in self.output.splitlines():
            if line.startswith(("TASK [", "RUNNING HANDLER [")):
                task = line.split("[", 1)[1].rsplit("]", 1)[0]
            elif line.startswith("changed:"):
                changed.append(task)
        return sorted(set(changed))


def run_playbook(args: list[str], log: Path | None = None, timeout: int = 600) -> PlaybookRun:
    started = time.monotonic()
    done = subprocess.run(["ansible-playbook", *args], cwd=ANSIBLE_DIR, env=ansible_env(),
                          capture_output=True, text=True, timeout=timeout)
    output = done.stdout + done.stderr
    if log is not None:
        log.write_text(output)
    recap = {}
    for host, counts in re.findall(r"^(\S+)\s+:\s+(ok=.*)$", output, re.M):
        recap[host] = {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)", counts)}
    return PlaybookRun(done.returncode, output, time.monotonic() - started, recap)


@dataclass
class Target:
    """A converged copy of the Debian root and how it got there."""
    root: Path
    work: Path
    playbook_args: list[str]
    database: str | None = None  # on this machine's PostgreSQL, when it answers
    first: PlaybookRun | None = None

    def path(self, inside: str) -> Path:
        return self.root / inside.lstrip("/")

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        """A command inside the chroot."""
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
        done = subprocess.run(["chroot", str(self.root), *command], env=env, capture_output=True, text=True,
                              timeout=300)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(command)} failed in the chroot ({done.returncode}):\n"
                                 f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return done


CONVERGE_OVERRIDES = """---
# The converge test's settings on top of the example inventory (extra vars: they win).
citadel_common_package_src: {wheel}
citadel_common_pip_requirements_src: {requirements}
citadel_common_pip_index_url: file:///opt/pypi/simple
citadel_common_pip_extra_index_urls: [file:///opt/pypi-more/simple]
citadel_common_pip_find_links: [/opt/wheels, /opt/citadel-test-wheelhouse]
# Byte-compiling torch's and transformers' thousands of modules is most of the install on 2 cores;
# production keeps it (the code is root's, so the services could not write the bytecode later).
citadel_common_pip_extra_args: --no-compile
citadel_common_database_host: 127.0.0.1
citadel_common_broker_host: 127.0.0.1
citadel_postgresql_listen_addresses: [localhost]
citadel_broker_redis_bind: 127.0.0.1 -::1
citadel_worker_require_cuda: false
"""

# With this machine's PostgreSQL, which the chroot reaches (it shares the network): the tasks that
# need a database run for real, from the installed virtual environment, on a database of their own.
CONVERGE_DATABASE = """citadel_common_database_user: postgres
citadel_common_database_name: {database}
citadel_control_plane_manage_database: true
"""

HOST_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"


def host_database(action: str, name: str) -> None:
    """CREATE or DROP a database on this machine's PostgreSQL (trust authentication)."""
    import psycopg

    with psycopg.connect(HOST_POSTGRES, autocommit=True) as connection:
        if action == "create":
            connection.execute(f'CREATE DATABASE "{name}"')
        else:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def share_debs(source: Path, dest: Path) -> None:
    """Hard-link (else copy) the .deb files of `source` missing from `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    for deb in source.glob("*.deb"):
        if not (dest / deb.name).exists():
            try:
                os.link(deb, dest / deb.name)
            except OSError:
                shutil.copy2(deb, dest / deb.name)


@pytest.fixture(scope="session")
def converge_target(tmp_path_factory):
    """A fresh copy of the cached Debian root, with this machine's package folders, a wheel of
    this checkout and an inventory that puts it in every group (site eu-fra)."""
    require_ansible()
    require(shutil.which("debootstrap") is not None, "debootstrap (apt-get install -y debootstrap)")
    require(os.geteuid() == 0, "root (debootstrap and chroot need it)")
    require(all(folder.is_dir() for folder in PACKAGE_FOLDERS),
            "this machine's package folders " + ", ".join(map(str, PACKAGE_FOLDERS)))
    if os.environ.get("CITADEL_SKIP_CONVERGE") and not IN_CI:
        pytest.skip("CITADEL_SKIP_CONVERGE is set: the converge test is skipped on this machine")
    started = time.monotonic()
    cache = ensure_root_cache()
    print(f"Debian root cache: {time.monotonic() - started:.0f} s")
    work = Path(tempfile.mkdtemp(prefix="citadel-converge-", dir="/var/tmp"))
    database = None
    if port_open("127.0.0.1", 5432):
        database = f"citadel_converge_{work.name.rsplit('-', 1)[-1].lower()}"
        host_database("create", database)
    try:
        root = work / "root"
        subprocess.run(["cp", "-a", "--reflink=auto", str(cache), str(root)], check=True)
        for folder in PACKAGE_FOLDERS:
            link_or_copy_tree(folder, root / folder.relative_to("/"))
        share_debs(DEB_CACHE, root / "var/cache/apt/archives")
        build = tmp_path_factory.mktemp("package")
        wheel = build_wheel(build)
        pins = wheelhouse.build(root / "opt/citadel-test-wheelhouse", wheel)
        requirements = build / "requirements.txt"
        requirements.write_text("\n".join(pins) + "\n")
        inventory = work / "inventory"
        (inventory / "group_vars").mkdir(parents=True)
        for name in ["all", "eu_fra", "citadel_workers.yml"]:
            source = EXAMPLE / "group_vars" / name
            (shutil.copytree if source.is_dir() else shutil.copy)(source, inventory / "group_vars" / name)
        (inventory / "hosts.yml").write_text(f"""---
all:
  vars:
    ansible_connection: community.general.chroot
    ansible_host: {root}
    ansible_python_interpreter: /usr/bin/python3
  children:
    citadel_database: {{hosts: {{converge: }}}}
    citadel_broker: {{hosts: {{converge: }}}}
    citadel_control_plane: {{hosts: {{converge: }}}}
    citadel_workers:
      children:
        eu_fra: {{hosts: {{converge: }}}}
""")
        overrides = work / "overrides.yml"
        overrides.write_text(CONVERGE_OVERRIDES.format(wheel=wheel, requirements=requirements)
                             + (CONVERGE_DATABASE.format(database=database) if database else ""))
        args = ["-i", str(inventory / "hosts.yml"), "--vault-password-file", str(VAULT_PASSWORD_FILE),
                "-e", f"@{overrides}", "site.yml"]
        print(f"target ready (root, package folders, wheel, pins): {time.monotonic() - started:.0f} s")
        yield Target(root=root, work=work, playbook_args=args, database=database)
    finally:
        share_debs(work / "root/var/cache/apt/archives", DEB_CACHE)
        if database:
            host_database("drop", database)
        for log in work.glob("*-run.log"):
            shutil.copy(log, Path(tempfile.gettempdir()) / f"citadel-converge-{log.name}")
        # Only files and hard links are in there (no mounts), so removing it touches nothing outside.
        # About 2 GB of small files: removed in the background, so the test does not wait for the disk.
        subprocess.Popen(["rm", "-rf", "--one-file-system", str(work)], start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
