"""The one atomic write and the fresh listing (lenscan._io), on a local disk and a real S3 API."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import urllib.parse

import fsspec
import pytest

from lenscan._io import TMP_PREFIX, atomic_write_bytes, clean_orphans, list_fresh


def test_local_write_is_a_rename_and_leaves_no_temporary(tmp_path):
    url = str(tmp_path / "a" / "part.parquet")
    atomic_write_bytes(url, b"one")
    atomic_write_bytes(url, b"two")
    assert (tmp_path / "a" / "part.parquet").read_bytes() == b"two"
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["part.parquet"]


def test_orphans_of_a_crashed_write_are_cleaned(tmp_path):
    (tmp_path / ".tmp-dead-part.parquet").write_bytes(b"half")
    (tmp_path / "keep.parquet").write_bytes(b"whole")
    fs = fsspec.filesystem("file")
    assert clean_orphans(fs, str(tmp_path)) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["keep.parquet"]


def test_object_store_write_is_one_put_and_listings_are_fresh(s3_url):
    prefix, options = s3_url
    fs, _ = fsspec.core.url_to_fs(prefix, **options)
    calls: list[str] = []
    fs.s3.meta.events.register("before-call.s3", lambda model, **kw: calls.append(model.name))
    atomic_write_bytes(f"{prefix}/scored/tile-a.parquet", b"x" * 1000, storage_options=options)
    assert calls == ["PutObject"], "one PUT, no temporary object, no copy + delete"
    # Another client writes behind this one's back; a cached listing would miss it.
    assert len(list_fresh(fs, f"{prefix}/scored")) == 1
    other = fsspec.filesystem("s3", skip_instance_cache=True, **options)
    other.pipe_file(f"{prefix}/scored/tile-b.parquet", b"y")
    assert len(fs.ls(f"{prefix}/scored", detail=False)) == 1  # fsspec's cache: stale
    names = sorted(p.rsplit("/", 1)[-1] for p in list_fresh(fs, f"{prefix}/scored"))
    assert names == ["tile-a.parquet", "tile-b.parquet"]


def test_missing_folder_lists_empty(tmp_path):
    assert list_fresh(fsspec.filesystem("file"), str(tmp_path / "nothing")) == []


def test_a_local_write_that_fails_midway_keeps_the_old_content(tmp_path, monkeypatch):
    # The disk fills up (fsync raises) while the new bytes are being written: readers must still
    # see the old object, and the half-written temporary is the next run's cleanup's to remove.
    target = tmp_path / "candidates.parquet"
    atomic_write_bytes(str(target), b"old content")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_bytes(str(target), b"new content that never lands")
    monkeypatch.undo()
    assert target.read_bytes() == b"old content"
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p != target)
    assert len(leftovers) == 1 and leftovers[0].startswith(TMP_PREFIX)
    assert clean_orphans(fsspec.filesystem("file"), str(tmp_path)) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["candidates.parquet"]


def _cutting_proxy(upstream_port: int, cut_after: int) -> tuple[int, threading.Event]:
    """A loopback TCP proxy that drops any connection once it has forwarded ``cut_after`` bytes
    upstream: an object store whose connection dies in the middle of an upload."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def pump(src, dst, budget):
        sent = 0
        try:
            while not stop.is_set() and (chunk := src.recv(65536)):
                if budget is not None and sent + len(chunk) > budget:
                    break
                dst.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def serve():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            upstream = socket.create_connection(("127.0.0.1", upstream_port))
            threading.Thread(target=pump, args=(client, upstream, cut_after), daemon=True).start()
            threading.Thread(target=pump, args=(upstream, client, None), daemon=True).start()
        listener.close()

    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1], stop


def test_an_object_store_upload_cut_midway_keeps_the_old_object(s3_url, s3_server):
    prefix, options = s3_url
    url = f"{prefix}/candidates.parquet"
    atomic_write_bytes(url, b"old content", storage_options=options)
    endpoint = urllib.parse.urlsplit(s3_server[0])
    port, stop = _cutting_proxy(endpoint.port, cut_after=256 * 1024)
    cut = {
        **options,
        "client_kwargs": {**options.get("client_kwargs", {}),
                          "endpoint_url": f"http://127.0.0.1:{port}"},
        "config_kwargs": {"retries": {"max_attempts": 1}},
        "retries": 1,
        "skip_instance_cache": True,
    }  # fmt: skip
    try:
        with pytest.raises(Exception):  # noqa: B017 - whichever error the client raises
            atomic_write_bytes(url, os.urandom(4 * 1024 * 1024), storage_options=cut)
    finally:
        stop.set()
    fs, _ = fsspec.core.url_to_fs(prefix, skip_instance_cache=True, **options)
    assert fs.cat_file(url) == b"old content"
    assert [p.rsplit("/", 1)[-1] for p in list_fresh(fs, prefix)] == ["candidates.parquet"]
