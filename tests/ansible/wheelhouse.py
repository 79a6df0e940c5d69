"""Wheels for the converge test's offline install, from what this machine already has.

The chroot's pip may not reach the internet, so it installs from this machine's package folders
(/opt/wheels, file:///opt/pypi/simple, file:///opt/pypi-more/simple; see /etc/pip.conf). A few of
Citadel's pure-Python dependencies are not in them (the test's own virtual environment got them
from PyPI): those are packed back into wheels from the installed copies here, file by file from
their RECORD, so the chroot's pip finds every dependency without a download.
"""

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

LOCAL_INDEXES = [Path("/opt/pypi/simple"), Path("/opt/pypi-more/simple")]
LOCAL_WHEELS = Path("/opt/wheels")
SKIPPED_DIST_INFO = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_closure(root: str = "citadel") -> list[metadata.Distribution]:
    """The installed distributions `root` needs at run time (its extras left out)."""
    seen: dict[str, metadata.Distribution] = {}
    pending = [(root, None)]
    while pending:
        name, extra = pending.pop()
        dist = metadata.distribution(name)
        key = canonical(dist.metadata["Name"])
        if key in seen and extra is None:
            continue
        seen[key] = dist
        for text in dist.requires or []:
            requirement = Requirement(text)
            environment = {"extra": extra or ""}
            if requirement.marker is not None and not requirement.marker.evaluate(environment):
                continue
            for wanted in [None, *sorted(requirement.extras)]:
                if wanted is None and canonical(requirement.name) in seen:
                    continue
                pending.append((requirement.name, wanted))
    return [dist for key, dist in seen.items() if key != canonical(root)]


def locally_available(name: str, version: str | None = None) -> bool:
    """Whether this version (None: any) is in a local index or wheel folder."""
    key = canonical(name)
    files = [path.name for path in LOCAL_WHEELS.glob("*.whl")] if LOCAL_WHEELS.is_dir() else []
    for index in LOCAL_INDEXES:
        page = index / key / "index.html"
        if page.is_file():
            files += re.findall(r">([^<]+)</a>", page.read_text())
    return any(canonical(file.split("-")[0]) == key and (version is None or file.split("-")[1] == version)
               for file in files)


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def repack(dist: metadata.Distribution, out_dir: Path) -> Path:
    """A wheel of an installed pure-Python distribution, from the files its RECORD lists."""
    wheel_info = dist.read_text("WHEEL") or ""
    if "Root-Is-Purelib: true" not in wheel_info:
        raise RuntimeError(f"{dist.metadata['Name']} is not pure Python; it cannot be repacked")
    tags = [line.split(":", 1)[1].strip().split("-") for line in wheel_info.splitlines() if line.startswith("Tag:")]
    tag = "-".join(".".join(sorted({t[i] for t in tags})) for i in range(3))  # e.g. py2.py3-none-any
    name = re.sub(r"[-_.]+", "_", dist.metadata["Name"])
    path = out_dir / f"{name}-{dist.version}-{tag}.whl"
    records = []
    dist_info = None
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as wheel:
        for file in dist.files or []:
            parts = file.parts
            if parts[0] == ".." or "__pycache__" in parts or file.suffix == ".pyc":
                continue  # console scripts are made again from entry_points.txt; bytecode is compiled again
            if parts[0].endswith(".dist-info"):
                dist_info = parts[0]
                if file.name in SKIPPED_DIST_INFO:
                    continue
            data = Path(dist.locate_file(file)).read_bytes()
            wheel.writestr(file.as_posix(), data)
            records.append(f"{file.as_posix()},{_record_hash(data)},{len(data)}")
        assert dist_info is not None, f"{dist.metadata['Name']} has no dist-info in its RECORD"
        records.append(f"{dist_info}/RECORD,,")
        wheel.writestr(f"{dist_info}/RECORD", "\n".join(records) + "\n")
    return path


def pip_source_options(wheelhouse: Path) -> list[str]:
    """pip's options for the local package folders and the repacked wheels, nothing else."""
    options = ["--index-url", f"file://{LOCAL_INDEXES[0]}"]
    for index in LOCAL_INDEXES[1:]:
        options += ["--extra-index-url", f"file://{index}"]
    return options + ["--find-links", str(LOCAL_WHEELS), "--find-links", str(wheelhouse)]


def build(out_dir: Path, package: Path) -> list[str]:
    """Wheels in `out_dir` of Citadel's pure-Python run-time dependencies, at the versions installed
    here, that no local package folder has (some are missing, some there are too old for the
    others: kombu 5.6 wants redis < 6.5, the folders have only redis 8), and the pins (name==version, one a line) that pip resolves for `package` from the local
    folders and those wheels, on this machine's Python. The chroot installs the pins with
    --no-deps: nothing is resolved there, so redis's async-timeout, asked for only below Python
    3.11.3 (Debian's is 3.11.2) and only by redis's asyncio client, is not needed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for dist in runtime_closure():  # pure-Python ones at the versions this environment works with
        if not locally_available(dist.metadata["Name"], dist.version) and "Root-Is-Purelib: true" in (
                dist.read_text("WHEEL") or ""):
            repack(dist, out_dir)
    report = out_dir / "report.json"
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PIP_FIND_LINKS", None)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed",
                    "--report", str(report), *pip_source_options(out_dir), str(package)],
                   check=True, env=env, capture_output=True, text=True)
    installs = json.loads(report.read_text())["install"]
    report.unlink()
    return sorted(f"{item['metadata']['name']}=={item['metadata']['version']}" for item in installs
                  if canonical(item["metadata"]["name"]) != "citadel")
