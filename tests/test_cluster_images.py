"""The images (``cluster/Dockerfile``, ``cluster/Dockerfile.gpu``), the lock file they share and
``pyproject.toml`` agree; the images' entry point really starts a scheduler and a worker.

Images cannot be built here (no container registry is reachable), so the Dockerfiles are
checked as text and the entry point is run directly.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from lenscan.cluster import CHECKED_PACKAGES, cluster_record, connect
from lenscan.config import ClusterSpec

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LOCK = "cluster/requirements.lock"


def _lock() -> tuple[str, dict[str, str]]:
    """(python version, {package: version}) from the lock file."""
    python, pins = None, {}
    for line in (REPO / LOCK).read_text().splitlines():
        m = re.fullmatch(r"# python (\d+\.\d+)", line.strip())
        if m:
            python = m.group(1)
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"{LOCK}: {line!r} is not pinned with =="
            pins[canonicalize_name(name)] = version
    assert python, f"{LOCK} must say '# python X.Y'"
    return python, pins


def _pyproject_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in ("cloud", "gpu"):  # what the images install
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return reqs


def test_the_lock_pins_the_checked_packages_within_pyproject_ranges():
    _, pins = _lock()
    for package in CHECKED_PACKAGES:
        if package != "lenscan":  # installed from this source tree by the images
            assert canonicalize_name(package) in pins, f"{LOCK} must pin {package}"
    for req in _pyproject_requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{LOCK} does not pin {req.name} (pyproject.toml needs it)"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{LOCK} pins {req.name}=={pins[name]} outside pyproject.toml's {req.specifier}"
        )


def test_the_lock_and_the_cpu_constraints_pin_the_same_torch():
    _, pins = _lock()
    constraints = (REPO / "constraints-cpu.txt").read_text()
    (torch_pin,) = re.findall(r"^torch==(\S+)", constraints, flags=re.M)
    assert pins["torch"] == torch_pin


@pytest.mark.parametrize(("dockerfile", "extras", "cmd"), [
    ("Dockerfile", "cloud", "worker"),
    ("Dockerfile.gpu", "cloud,gpu", "cuda-worker"),
])  # fmt: skip
def test_each_dockerfile_installs_with_the_lock(dockerfile, extras, cmd):
    python, _ = _lock()
    text = (CLUSTER / dockerfile).read_text()
    run = re.sub(r"\\\n", " ", text)
    assert re.search(rf"^FROM python:{re.escape(python)}(-slim)?\b", text, flags=re.M)
    assert f"COPY {LOCK} cluster/entrypoint.sh ./cluster/" in text
    installs = re.findall(r"pip install [^&\n]*", run)
    assert installs, f"{dockerfile} installs nothing"
    for install in installs:
        assert f"-c {LOCK}" in install, f"{dockerfile}: {install!r} ignores the lock"
    assert any(f"'.[{extras}]'" in i for i in installs)
    assert 'ENTRYPOINT ["/opt/lenscan/cluster/entrypoint.sh"]' in text
    assert re.search(rf'^CMD \["{cmd}"', text, flags=re.M)


def _entrypoint(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.Popen(["sh", str(CLUSTER / "entrypoint.sh"), *args], env=env, **kw)


def test_the_entrypoint_starts_a_scheduler_and_a_worker(tmp_path):
    scheduler_file = tmp_path / "scheduler.json"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "cwd": tmp_path}
    procs = [
        _entrypoint("scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address",
                    ":0", "--scheduler-file", str(scheduler_file), **quiet)
    ]  # fmt: skip
    try:
        end = time.monotonic() + 60
        while not scheduler_file.exists():
            assert time.monotonic() < end, "the entrypoint's scheduler wrote no scheduler file"
            time.sleep(0.2)
        procs.append(
            _entrypoint("worker", "--scheduler-file", str(scheduler_file), "--nthreads", "1",
                        "--no-dashboard", "--local-directory", str(tmp_path), **quiet)
        )  # fmt: skip
        spec = ClusterSpec(scheduler_file=str(scheduler_file), timeout_s=60)
        with connect(spec) as client:  # waits for the worker and checks its versions
            record = cluster_record(client, spec)
        assert record["kind"] == "scheduler_file" and record["n_workers"] == 1
        assert record["versions_match"] is True
        address = json.loads(scheduler_file.read_text())["address"]
        assert record["scheduler"] == address
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
    usage = subprocess.run(["sh", str(CLUSTER / "entrypoint.sh")], capture_output=True, text=True)
    assert usage.returncode == 2 and "scheduler|worker|cuda-worker" in usage.stderr
