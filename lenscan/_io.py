"""The one place lenscan writes and lists objects at fsspec URLs.

Every file lenscan commits (per-tile parts, ledgers, candidate tables, run records, galleries)
goes through :func:`atomic_write_bytes`; every listing that decides what is done goes through
:func:`list_fresh`.
"""

from __future__ import annotations

import os
import posixpath
import re
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from lenscan._secrets import safe_url

__all__ = [
    "TMP_PREFIX",
    "StorageError",
    "absolute_url",
    "atomic_write_bytes",
    "check_output_folder",
    "clean_orphans",
    "exception_classes",
    "list_fresh",
    "storage_failure",
]

#: Name prefix of the temporary files that a local atomic write renames into place.
TMP_PREFIX = ".tmp-"


def absolute_url(url: str) -> str:
    """``url`` with a relative local path made absolute; other URLs unchanged.

    Records such as ``run.json`` store this, so that they still name the same store when read
    from another directory.

    Examples
    --------
    >>> absolute_url("s3://bucket/des.zarr")
    's3://bucket/des.zarr'
    >>> absolute_url("/data/des.zarr")
    '/data/des.zarr'
    """
    if "://" in url or "::" in url:
        if url.startswith("file://") and not url.startswith("file:///"):
            return os.path.abspath(url[len("file://") :])
        return url
    return os.path.abspath(os.path.expanduser(url))


def atomic_write_bytes(
    url: str, data: bytes, *, storage_options: Mapping[str, Any] | None = None
) -> None:
    """Write ``data`` to ``url`` so that readers see either nothing or the whole object.

    On a local disk: a uniquely named temporary file beside the target, flushed, then renamed
    over it. On an object store one PUT is already all-or-nothing, so the object is written
    directly: no temporary object, no copy, no delete.
    """
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    parent = posixpath.dirname(path)
    if not isinstance(fs, LocalFileSystem):
        fs.pipe_file(path, data)
        fs.invalidate_cache(parent)
        return
    os.makedirs(parent, exist_ok=True)
    tmp = posixpath.join(parent, f"{TMP_PREFIX}{uuid.uuid4().hex}-{posixpath.basename(path)}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def check_output_folder(
    url: str, *, storage_options: Mapping[str, Any] | None = None, flag: str = "--out"
) -> None:
    """Refuse an output folder that is, or lies under, an existing file, before any work.

    Only local paths can be refused this way: on an object store a "folder" is a key prefix,
    and an object of the same name does not stop writes below it.

    Raises
    ------
    ValueError
        Naming ``flag`` and ``url``: the path, or one of its parents, is a file.
    """
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if not isinstance(fs, LocalFileSystem):
        return
    probe = os.path.abspath(path)
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if os.path.exists(probe) and not os.path.isdir(probe):
        where = "is a file" if probe == os.path.abspath(path) else f"is under the file {probe}"
        raise ValueError(
            f"{flag} {url} {where}: give a folder (it is created if missing) or another path"
        )


def list_fresh(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """List the paths directly under ``path``, bypassing fsspec's listing cache.

    A missing folder lists as empty. Object-store filesystems cache listings per instance and
    instances are shared, so a second listing in one process can miss objects written since.
    """
    fs.invalidate_cache(path)
    try:
        return sorted(fs.ls(path, detail=False, refresh=True))
    except TypeError:  # filesystems whose ls takes no refresh argument
        return sorted(fs.ls(path, detail=False))
    except FileNotFoundError:
        return []


def clean_orphans(fs: fsspec.AbstractFileSystem, path: str) -> int:
    """Delete temporary files left under ``path`` by interrupted local atomic writes.

    Returns how many were removed. Only names starting with :data:`TMP_PREFIX` are touched;
    run it before a sweep writes there (one writer per output folder).
    """
    orphans = [p for p in list_fresh(fs, path) if posixpath.basename(p).startswith(TMP_PREFIX)]
    for orphan in orphans:
        fs.rm(orphan)
    return len(orphans)


class StorageError(RuntimeError):
    """A store stayed unreachable after the client's retries (a runtime failure: re-run)."""


#: Packages whose exceptions are a store's transport failing (not a bad path or argument).
_STORE_PACKAGES = frozenset(
    {"botocore", "aiobotocore", "aiohttp", "urllib3", "requests", "fsspec", "s3fs", "gcsfs",
     "adlfs", "google", "azure"}
)  # fmt: skip
_TRANSPORT = re.compile(
    r"Connect|Connection|Timeout|Disconnected|ClientOSError|ServiceUnavailable|"
    r"ServiceRequest|ProtocolError|IncompleteRead|ResponseStreamingError"
)


def exception_classes(exc: BaseException) -> Iterator[tuple[type, BaseException]]:
    """(class, exception) for every class of ``exc`` and of each exception in its chain.

    The one walk over causes and contexts that tells what kind of failure an error is.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        for cls in type(current).__mro__:
            yield cls, current
        current = current.__cause__ or current.__context__


def _transport_error(exc: BaseException) -> BaseException | None:
    """The first exception in ``exc``'s chain that is a store's connection failing, if any."""
    for cls, current in exception_classes(exc):
        if cls.__module__.split(".")[0] in _STORE_PACKAGES and _TRANSPORT.search(cls.__name__):
            return current
    return None


def storage_failure(exc: BaseException, *urls: str) -> StorageError | None:
    """A one-line :class:`StorageError` if ``exc`` is a store's connection failing, else None.

    The message names the endpoint (from the error, else ``urls``) without credentials, the
    error's type, and what to do: every write is atomic, so a re-run resumes.
    """
    cause = _transport_error(exc)
    if cause is None:
        return None
    details = getattr(cause, "kwargs", None)  # botocore errors carry their endpoint here
    endpoint = details.get("endpoint_url") if isinstance(details, dict) else None
    named = [str(safe_url(u)) for u in urls if u]
    where = safe_url(endpoint) if endpoint else " or ".join(named)
    during = f" while working on {' and '.join(named)}" if endpoint and named else ""
    return StorageError(
        f"lost the connection to the store at {where} ({type(cause).__name__}, after "
        f"retries){during}; everything already committed is kept: re-run the same command to "
        "resume once the store answers"
    )
