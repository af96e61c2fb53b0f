"""One writer per output folder: a lease on ``OUT``, renewed while a run runs, that expires.

A run that writes a sweep's output folder first takes its lease, the object ``OUT/lease.json``
naming the holder (user, host, pid, run id, start time, time to live). The lease is taken with
the store's atomic create-if-absent and replaced only by a conditional write, so of two runs
started at the same moment exactly one holds it and the other is refused at once with the
holder's name:

* local disks (and NFS): the lease is written beside ``OUT`` and hard-linked into place (the
  link fails when the lease exists); renewal touches its modification time; a takeover first
  creates ``OUT/.lease-claims/<holder's run id>`` exclusively, so one contender wins;
* S3: ``PutObject`` with ``If-None-Match: *`` to create, ``If-Match: <ETag>`` to renew, take
  over and release;
* other stores (GCS, Azure, HTTP, ...): no conditional write is used; the lease is written after
  an existence check and read back. Two runs started within that window can both proceed.

The lease is renewed by a background thread every quarter of its time to live. It is dead, and
the next run takes it over (logging the previous holder), when its last renewal (the store's
modification time of ``lease.json``) is older than the time to live, or at once when the holder
ran on this host and its process is gone. ``break_lease=True`` (``--break-lease``) takes over a
lease that still looks alive: for a holder known to be dead on another host.
"""

from __future__ import annotations

import abc
import contextlib
import datetime as _dt
import errno
import getpass
import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from lenscan._secrets import safe_url

__all__ = [
    "DEFAULT_LEASE_TTL_S",
    "LEASE_NAME",
    "Lease",
    "LeaseError",
    "LeaseHeld",
    "LeaseLost",
    "acquire_lease",
    "hold_lease",
    "read_lease",
]

log = logging.getLogger(__name__)

#: The lease object's name under the output folder.
LEASE_NAME = "lease.json"
#: A lease not renewed for this long belongs to a dead run (renewed every quarter of it).
DEFAULT_LEASE_TTL_S = 120.0
_CLAIMS = ".lease-claims"
_CLAIM_MAX_AGE_S = 3600.0  # claims of replaced leases are kept this long against slow contenders


class LeaseError(RuntimeError):
    """The output folder's lease could not be held (a runtime failure, not a bad argument)."""


class LeaseHeld(LeaseError):
    """Another live run holds the lease on the output folder."""


class LeaseLost(LeaseError):
    """This run's lease was taken over (it stopped renewing for longer than its time to live)."""


@dataclass
class HolderInfo:
    """The lease's content as read back, with the store's time of its last renewal."""

    record: dict[str, Any]
    renewed: float  # epoch seconds, the store's modification time
    version: str  # what a conditional replace must match (run id locally, ETag on S3)

    @property
    def expires(self) -> float:
        return self.renewed + float(self.record.get("ttl_s", DEFAULT_LEASE_TTL_S))

    def dead(self, now: float) -> str | None:
        """Why this holder is dead (expired, process gone), or None while it looks alive."""
        if now > self.expires:
            return f"not renewed for {now - self.renewed:.0f} s (time to live {self.ttl:g} s)"
        r = self.record
        here = r.get("host") == socket.gethostname() and r.get("boot_id") == _boot_id()
        if here and not _process_alive(int(r.get("pid", -1)), r.get("pid_start")):
            return f"its process {r.get('pid')} on this host has ended"
        return None

    @property
    def ttl(self) -> float:
        return float(self.record.get("ttl_s", DEFAULT_LEASE_TTL_S))

    def describe(self) -> str:
        r = self.record
        return (
            f"{r.get('user', '?')}@{r.get('host', '?')} pid {r.get('pid', '?')} "
            f"(run {r.get('run_id', '?')}), started {r.get('started', '?')}, "
            f"last renewed {_iso(self.renewed)}"
        )


def _iso(epoch: float) -> str:
    return _dt.datetime.fromtimestamp(epoch, _dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return None


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _process_alive(pid: int, start: str | None) -> bool:
    if pid <= 0:
        return True  # cannot tell: only expiry ends such a lease
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    return start is None or _process_start(pid) in (None, start)


# --------------------------------------------------------------------------- store backends


class _Backend(abc.ABC):
    """The four operations a lease needs from a store; ``atomic`` when they are conditional."""

    atomic = True

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str) -> None:
        self.fs, self.path = fs, path

    @abc.abstractmethod
    def read(self) -> HolderInfo | None:
        """The lease as stored, or None when there is none."""

    @abc.abstractmethod
    def create(self, data: bytes) -> bool:
        """Write the lease if none exists; False when another run's is there."""

    @abc.abstractmethod
    def renew(self, current: HolderInfo, data: bytes) -> bool:
        """Rewrite our own lease; False when it is no longer ``current`` (taken over)."""

    @abc.abstractmethod
    def replace(self, current: HolderInfo, data: bytes) -> bool:
        """Take over the stale lease ``current``; False when another contender won."""

    @abc.abstractmethod
    def delete(self, current: HolderInfo) -> None:
        """Release the lease if it is still ``current``."""


class _LocalBackend(_Backend):
    """Local disks and NFS: link() refuses to replace, O_EXCL claims pick one contender."""

    @property
    def claims(self) -> str:
        return posixpath.join(posixpath.dirname(self.path), _CLAIMS)

    def read(self) -> HolderInfo | None:
        try:
            with open(self.path, "rb") as fh:
                stat = os.fstat(fh.fileno())
                record = _loads(fh.read())
        except FileNotFoundError:
            return None
        # A takeover claims the holder's run id (unique per run; renewals keep it).
        version = str(record.get("run_id") or f"unknown-{stat.st_ino}-{stat.st_size}")
        return HolderInfo(record, stat.st_mtime, version)

    def _staged(self, data: bytes) -> str:
        os.makedirs(self.claims, exist_ok=True)  # and OUT itself, on a first run
        tmp = posixpath.join(self.claims, f"new-{uuid.uuid4().hex}")
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        return tmp

    def create(self, data: bytes) -> bool:
        self._forget_old_claims()
        tmp = self._staged(data)
        try:
            os.link(tmp, self.path)  # fails if the lease exists: the atomic create-if-absent
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def _claim(self, current: HolderInfo) -> bool:
        os.makedirs(self.claims, exist_ok=True)
        try:
            os.close(os.open(posixpath.join(self.claims, current.version), os.O_CREAT | os.O_EXCL))
            return True
        except FileExistsError:
            return False

    def renew(self, current: HolderInfo, data: bytes) -> bool:
        os.utime(self.path)  # the store's clock (NFS: the server's) dates the renewal
        return True

    def replace(self, current: HolderInfo, data: bytes) -> bool:
        if not self._claim(current):
            return False
        os.replace(self._staged(data), self.path)
        self._forget_old_claims()
        return True

    def delete(self, current: HolderInfo) -> None:
        if not self._claim(current):  # a contender is taking it over: leave it
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        # Leave no trace of a run that wrote nothing (refused inputs): only empty folders go.
        with contextlib.suppress(OSError):
            os.unlink(posixpath.join(self.claims, current.version))
            os.rmdir(self.claims)
            os.rmdir(posixpath.dirname(self.path))

    def _forget_old_claims(self) -> None:
        cutoff = time.time() - _CLAIM_MAX_AGE_S
        if not os.path.isdir(self.claims):
            return
        for entry in os.scandir(self.claims):
            with contextlib.suppress(OSError):
                if entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)


class _S3Backend(_Backend):
    """S3: conditional PutObject / DeleteObject (If-None-Match, If-Match on the ETag)."""

    def _key(self) -> dict[str, str]:
        bucket, key, _ = self.fs.split_path(self.path)
        return {"Bucket": bucket, "Key": key}

    def read(self) -> HolderInfo | None:
        # HEAD before GET: if the lease changes in between, the ETag is the older one and a
        # conditional write based on it fails instead of replacing what was not inspected.
        try:
            head = self.fs.call_s3("head_object", **self._key())
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        return HolderInfo(_loads(data), head["LastModified"].timestamp(), head["ETag"])

    def _put(self, data: bytes, **condition: str) -> bool:
        try:
            self.fs.call_s3("put_object", Body=data, **self._key(), **condition)
            return True
        except (FileExistsError, FileNotFoundError):
            return False
        except OSError as exc:  # 412 Precondition Failed on If-Match
            if exc.errno == errno.EINVAL:
                return False
            raise
        finally:
            self.fs.invalidate_cache(self.path)

    def create(self, data: bytes) -> bool:
        return self._put(data, IfNoneMatch="*")

    def renew(self, current: HolderInfo, data: bytes) -> bool:
        return self._put(data, IfMatch=current.version)

    def replace(self, current: HolderInfo, data: bytes) -> bool:
        return self._put(data, IfMatch=current.version)

    def delete(self, current: HolderInfo) -> None:
        with contextlib.suppress(FileNotFoundError, OSError):
            self.fs.call_s3("delete_object", IfMatch=current.version, **self._key())
        self.fs.invalidate_cache(self.path)


class _PlainBackend(_Backend):
    """Stores without a conditional write lenscan uses: check, write, read back (not atomic)."""

    atomic = False

    def read(self) -> HolderInfo | None:
        self.fs.invalidate_cache(self.path)
        try:
            record = _loads(self.fs.cat_file(self.path))
            renewed = self.fs.modified(self.path).timestamp()
        except FileNotFoundError:
            return None
        except NotImplementedError:  # a filesystem without modification times: the record's own
            renewed = _parse_iso(record.get("renewed"))
        return HolderInfo(record, renewed, str(record.get("renewal_id")))

    def _write(self, data: bytes) -> bool:
        self.fs.pipe_file(self.path, data)
        back = self.read()
        return back is not None and back.record == json.loads(data)

    def create(self, data: bytes) -> bool:
        return self.read() is None and self._write(data)

    def renew(self, current: HolderInfo, data: bytes) -> bool:
        now = self.read()
        return now is not None and now.version == current.version and self._write(data)

    replace = renew

    def delete(self, current: HolderInfo) -> None:
        now = self.read()
        if now is not None and now.version == current.version:
            self.fs.rm_file(self.path)


def _loads(data: bytes) -> dict[str, Any]:
    """A lease's record; an unreadable one (not lenscan's) can only expire."""
    try:
        record = json.loads(data)
    except ValueError:
        record = None
    return record if isinstance(record, dict) else {"user": "<unreadable lease>"}


def _parse_iso(text: Any) -> float:
    try:
        return (
            _dt.datetime.strptime(str(text), "%Y-%m-%dT%H:%M:%SZ")
            .replace(tzinfo=_dt.UTC)
            .timestamp()
        )
    except ValueError:
        return 0.0


def _backend(fs: fsspec.AbstractFileSystem, path: str) -> _Backend:
    if isinstance(fs, LocalFileSystem):
        return _LocalBackend(fs, path)
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if protocols & {"s3", "s3a"}:
        return _S3Backend(fs, path)
    return _PlainBackend(fs, path)


# --------------------------------------------------------------------------- the lease


@dataclass
class Lease:
    """A held lease on an output folder; renewed by a background thread until released.

    Attributes
    ----------
    url : str
        The lease object's URL (``OUT/lease.json``).
    record : dict
        What the lease says about this run (user, host, pid, run id, start time, ttl).
    atomic : bool
        Whether the store gave a conditional write (``False``: best effort, see the module).
    """

    url: str
    record: dict[str, Any]
    atomic: bool
    _backend: _Backend = field(repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _lost: str | None = field(default=None, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def start_renewing(self) -> None:
        """Renew every quarter of the time to live, in a daemon thread, until released."""
        period = max(0.2, float(self.record["ttl_s"]) / 4)
        self._thread = threading.Thread(
            target=self._renew_loop, args=(period,), name="lenscan-lease", daemon=True
        )
        self._thread.start()

    def _renew_loop(self, period: float) -> None:
        while not self._stop.wait(period):
            try:
                self.renew()
            except LeaseLost as exc:
                self._lost = str(exc)
                return
            except Exception as exc:  # a store blip: the next period tries again
                log.warning("could not renew the lease %s (%s); retrying", self.url, exc)

    def renew(self) -> None:
        """Renew once; raises :class:`LeaseLost` if another run has taken the lease over."""
        with self._lock:  # the renewal thread and check() never race each other's If-Match
            now = self._backend.read()
            if now is None or now.record.get("run_id") != self.record["run_id"]:
                holder = "nobody" if now is None else now.describe()
                raise LeaseLost(
                    f"the lease on {self.url} was taken over (now held by {holder}) after this "
                    f"run did not renew it for {self.record['ttl_s']:g} s; this run stops "
                    "before writing its results"
                )
            self.record["renewed"] = _iso(time.time())
            self.record["renewal_id"] = uuid.uuid4().hex
            if not self._backend.renew(now, _encode(self.record)) and not self._wrote_last():
                raise LeaseLost(f"the lease on {self.url} was taken over by another run")

    def _wrote_last(self) -> bool:
        # A conditional PUT that succeeded but whose answer was lost is retried by the client
        # and then fails its own condition: the lease holding this renewal is still ours.
        now = self._backend.read()
        return now is not None and now.record.get("renewal_id") == self.record["renewal_id"]

    def check(self) -> None:
        """Raise :class:`LeaseLost` if the lease was taken over; call before writing results.

        Reads the lease once (and renews it), so a run resumed after a long pause (a suspended
        job, a stopped process) learns it lost the lease before it writes, not a period later.
        """
        if self._lost:
            raise LeaseLost(self._lost)
        try:
            self.renew()
        except LeaseLost as exc:
            self._lost = str(exc)
            raise

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Fence a write under ``OUT``: check the lease before it, and after it fails.

        A holder stalled for longer than the time to live (a suspended job, a stopped process)
        may resume in the middle of a write whose temporary file the new holder has already
        removed as an orphan: the write's own error (``FileNotFoundError``) then says nothing
        useful, so a failed write checks the lease and raises :class:`LeaseLost` if it was
        taken over (the write's error is its context).
        """
        self.check()
        try:
            yield
        except Exception:
            self.check()
            raise

    def release(self) -> None:
        """Stop renewing and delete the lease if this run still holds it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._lost:
            return
        try:
            now = self._backend.read()
            if now is not None and now.record.get("run_id") == self.record["run_id"]:
                self._backend.delete(now)
        except Exception as exc:  # the run's own outcome matters more; the lease expires
            log.warning(
                "could not release the lease %s (%s); it expires %g s after its last renewal",
                self.url,
                exc,
                self.record["ttl_s"],
            )


def _encode(record: Mapping[str, Any]) -> bytes:
    return json.dumps(record, indent=2).encode()


def _new_record(ttl_s: float) -> dict[str, Any]:
    now = time.time()
    return {
        "user": getpass.getuser(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_start": _process_start(os.getpid()),
        "boot_id": _boot_id(),
        "run_id": f"{_iso(now).replace('-', '').replace(':', '')}-{uuid.uuid4().hex[:12]}",
        "started": _iso(now),
        "renewed": _iso(now),
        "renewal_id": uuid.uuid4().hex,
        "ttl_s": float(ttl_s),
    }


def read_lease(out: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The lease record on ``out`` (plus ``renewed_at``, the store's time), or None if free."""
    fs, path = fsspec.core.url_to_fs(out, **(storage_options or {}))
    info = _backend(fs, posixpath.join(path.rstrip("/"), LEASE_NAME)).read()
    return None if info is None else {**info.record, "renewed_at": _iso(info.renewed)}


def acquire_lease(
    out: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    ttl_s: float = DEFAULT_LEASE_TTL_S,
    break_lease: bool = False,
) -> Lease:
    """Take the lease on the output folder ``out`` and start renewing it.

    Parameters
    ----------
    out : str
        The output folder's URL (any fsspec URL).
    storage_options : mapping, optional
        fsspec options for ``out``.
    ttl_s : float
        Time to live: a lease not renewed for this long belongs to a dead run.
    break_lease : bool
        Take over a lease that still looks alive (its holder is known to be dead).

    Raises
    ------
    LeaseHeld
        Another live run holds the lease; the message names it and how to take over.
    """
    fs, path = fsspec.core.url_to_fs(out, **(storage_options or {}))
    backend = _backend(fs, posixpath.join(path.rstrip("/"), LEASE_NAME))
    url = str(safe_url(fs.unstrip_protocol(backend.path)))
    out = str(safe_url(out))  # for messages: never a URL's credentials
    record = _new_record(ttl_s)
    data = _encode(record)
    for _ in range(10):
        if backend.create(data):
            return _held(url, record, backend)
        current = backend.read()
        if current is None:
            continue  # released in between: try to create it again
        if current.record.get("run_id") == record["run_id"]:
            return _held(url, record, backend)  # a retried write that had succeeded
        why = current.dead(time.time())
        if why is None and not break_lease:
            raise LeaseHeld(_held_message(out, current))
        if backend.replace(current, data):
            log.warning(
                "took over the lease on %s from %s: %s",
                out,
                current.describe(),
                why or "--break-lease",
            )
            return _held(url, record, backend)
    raise LeaseHeld(f"{out}: other runs keep taking its lease ({url}); try again later")


def _held(url: str, record: dict[str, Any], backend: _Backend) -> Lease:
    current = backend.read()
    if current is None or current.record.get("run_id") != record["run_id"]:
        raise LeaseHeld(f"{url}: the lease was taken by another run while this one wrote it")
    if not backend.atomic:
        log.warning(
            "the store of %s has no conditional write lenscan uses: its lease is best effort "
            "(two runs started within a second of each other may both proceed)",
            url,
        )
    lease = Lease(url=url, record=record, atomic=backend.atomic, _backend=backend)
    lease.start_renewing()
    return lease


def _held_message(out: str, holder: HolderInfo) -> str:
    ago = time.time() - holder.renewed
    return (
        f"{out} is in use by another run: {holder.describe()} ({ago:.0f} s ago); it expires at "
        f"{_iso(holder.expires)} if that run has stopped, and a re-run then takes over. If you "
        "know it has stopped, re-run with --break-lease (break_lease=True) to take over now"
    )


@contextlib.contextmanager
def hold_lease(
    out: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    ttl_s: float = DEFAULT_LEASE_TTL_S,
    break_lease: bool = False,
) -> Iterator[Lease]:
    """Hold the lease on ``out`` for the block (:func:`acquire_lease`, then release)."""
    lease = acquire_lease(out, storage_options, ttl_s=ttl_s, break_lease=break_lease)
    try:
        yield lease
    finally:
        lease.release()
