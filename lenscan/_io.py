"""The one place lenscan writes and lists objects at fsspec URLs.

Every file lenscan commits (per-tile parts, ledgers, candidate tables, run records, galleries)
goes through :func:`atomic_write_bytes`; every listing that decides what is done goes through
:func:`list_fresh`.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from collections.abc import Mapping
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

__all__ = ["TMP_PREFIX", "atomic_write_bytes", "check_output_folder", "clean_orphans", "list_fresh"]

#: Name prefix of the temporary files that a local atomic write renames into place.
TMP_PREFIX = ".tmp-"


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
