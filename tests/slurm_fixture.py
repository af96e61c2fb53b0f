"""A real single-node SLURM on localhost for the tests (Debian's ``slurm-wlm`` and ``munge``).

:func:`ensure_slurm` reuses a SLURM that already answers ``sinfo`` with an idle (or mixed)
node; otherwise it writes a ``slurm.conf`` under a state folder, starts ``munged`` (when no
credential can be made), ``slurmctld`` and ``slurmd -N localhost`` as daemons (no systemd), and
waits for the node to be idle. A file lock keeps two test sessions from starting it twice.
The daemons are left running, like a system service, for the next session to reuse: stopping
them at the end of one session broke another session using them at the same time. Stop them
with :func:`stop_slurm` (or ``kill $(cat /tmp/lenscan-test-slurm/*.pid)``).
``.ci/run`` installs the packages; without the binaries the fixture skips with that reason.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

#: Where the test SLURM keeps its config, state, spool, logs and pid files.
STATE_DIR = Path(os.environ.get("LENSCAN_TEST_SLURM_DIR", "/tmp/lenscan-test-slurm"))
BINARIES = ("sinfo", "sbatch", "squeue", "scancel", "slurmctld", "slurmd", "munged", "munge")

_CONF = """\
ClusterName=lenscan-test
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={state}/ctld
SlurmdSpoolDir={state}/d
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={state}/slurmd.pid
SlurmctldLogFile={state}/slurmctld.log
SlurmdLogFile={state}/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
SchedulerType=sched/backfill
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=30
KillWait=5
NodeName=localhost CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName={partition} Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class Slurm:
    """A SLURM the tests can submit to."""

    partition: str
    conf: Path | None
    cpus: int
    memory_mb: int
    started: list[Path] = field(default_factory=list)  # pid files of daemons we started

    def env(self) -> dict[str, str]:
        """Environment for SLURM commands (``SLURM_CONF`` when we wrote the config)."""
        return {"SLURM_CONF": str(self.conf)} if self.conf else {}


class SlurmUnavailable(RuntimeError):
    """SLURM binaries are missing: the caller skips."""


def _run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 20):
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def _ready_partition(env: dict[str, str]) -> tuple[str, int, int] | None:
    """(partition, cpus, memory MB) of an idle/mixed node answering ``sinfo``, else None."""
    try:
        out = _run(["sinfo", "-h", "-N", "-o", "%P|%t|%c|%m"], env, timeout=10)
    except subprocess.TimeoutExpired:
        return None
    if out.returncode != 0:
        return None
    for line in out.stdout.splitlines():
        partition, state, cpus, memory = line.split("|")
        if state.rstrip("*") in ("idle", "mix"):
            return partition.rstrip("*"), int(cpus), int(memory)
    return None


def _munge_works() -> bool:
    try:
        enc = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        return (
            enc.returncode == 0
            and (
                subprocess.run(["unmunge"], input=enc.stdout, capture_output=True, timeout=10)
            ).returncode
            == 0
        )
    except (subprocess.TimeoutExpired, OSError):
        return False


def _start_munge(started: list[Path]) -> None:
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        subprocess.run(["mungekey", "--create", "--keyfile", str(key)], check=True)
        shutil.chown(key, "munge", "munge")
        key.chmod(0o600)
    run_dir = Path("/run/munge")
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.chown(run_dir, "munge", "munge")
    for d in (Path("/var/log/munge"), Path("/var/lib/munge")):
        d.mkdir(parents=True, exist_ok=True)
        shutil.chown(d, "munge", "munge")
    subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True, timeout=30)
    started.append(run_dir / "munged.pid")
    _wait(_munge_works, 20, "munged did not start (munge -n | unmunge fails)")


def _wait(ok, timeout: float, message: str) -> None:
    end = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > end:
            raise RuntimeError(message)
        time.sleep(0.5)


def ensure_slurm(partition: str = "lenscan") -> Slurm:
    """Return a running SLURM (see :func:`_ensure_slurm`), one session at a time."""
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    with (STATE_DIR / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _ensure_slurm(partition)


def _ensure_slurm(partition: str) -> Slurm:
    """Return a running SLURM: the one already here, or a single-node one started now.

    Raises
    ------
    SlurmUnavailable
        If the SLURM or munge binaries are not installed.
    RuntimeError
        If the daemons do not come up (the message points at their logs).
    """
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        raise SlurmUnavailable(
            f"SLURM binaries {missing} are not installed (apt-get install slurm-wlm munge)"
        )
    conf = STATE_DIR / "slurm.conf"
    for env_conf in (None, conf):
        env = {"SLURM_CONF": str(env_conf)} if env_conf else {}
        if env_conf is not None and not env_conf.exists():
            continue
        ready = _ready_partition(env)
        if ready:
            return Slurm(ready[0], env_conf, ready[1], ready[2])
    started: list[Path] = []
    if not _munge_works():
        _start_munge(started)
    cpus = min(2, os.cpu_count() or 1)
    memory_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.9)
    for sub in ("ctld", "d"):
        (STATE_DIR / sub).mkdir(parents=True, exist_ok=True)
    conf.write_text(
        _CONF.format(state=STATE_DIR, cpus=cpus, memory_mb=memory_mb, partition=partition)
    )
    env = {"SLURM_CONF": str(conf)}
    slurm = Slurm(partition, conf, cpus, memory_mb, started)
    for cmd, pid in (
        (["slurmctld", "-f", str(conf), "-i"], "slurmctld.pid"),
        (["slurmd", "-f", str(conf), "-N", "localhost"], "slurmd.pid"),
    ):
        run = _run(cmd, env, timeout=60)
        if run.returncode != 0:
            stop_slurm(slurm)
            raise RuntimeError(f"{cmd[0]} failed to start: {run.stderr.strip()}")
        started.append(STATE_DIR / pid)
    try:
        _wait(
            lambda: _ready_partition(env) is not None,
            60,
            f"the SLURM node did not become idle; see {STATE_DIR}/slurmctld.log and slurmd.log",
        )
    except RuntimeError:
        stop_slurm(slurm)
        raise
    return slurm


def stop_slurm(slurm: Slurm) -> None:
    """Stop the daemons :func:`ensure_slurm` started (by pid, newest first)."""
    for pid_file in reversed(slurm.started):
        try:
            pid = int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        end = time.monotonic() + 15
        while time.monotonic() < end:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
    slurm.started.clear()
