"""The one atomic write and the fresh listing (lenscan._io), on a local disk and a real S3 API."""

from __future__ import annotations

import fsspec

from lenscan._io import atomic_write_bytes, clean_orphans, list_fresh


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
