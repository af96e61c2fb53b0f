"""The scan's ledger: what each scored tile contributed, committed in batches under ``OUT/ledger``.

Workers commit every scored row to ``OUT/scored/tile-<id>.parquet``; what the reduce needs
travels back with the task result and the client commits it here, a few hundred tiles per batch:

* ``<batch>.rows.parquet``: the rows that can become candidates (score at or above the run's
  ``reduce_floor``, all columns) and the keys (tile, id, ra, dec, edge, score) of the other rows
  in tile-overlap zones, which the sky-position merge needs;
* ``<batch>.failures.parquet``: sources that could not be scored, with the reason;
* ``<batch>.tiles.parquet``: one row per tile with its write id and counts. Written last, it is
  the batch's commit record: a batch without it is ignored.

A tile scored again (a re-run after its survey tile changed, or after a crash between the part
and the ledger) appears in several batches; the newest commit wins. The client's memory holds one
batch at a time while scanning, and the reduce reads the ledger, not the parts.
"""

from __future__ import annotations

import io
import json
import posixpath
import time
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lenscan._io import atomic_write_bytes, list_fresh

__all__ = ["FAILURE_SCHEMA", "KEY_COLUMNS", "Ledger", "LedgerState", "TileRecord", "load_ledger"]

#: Columns kept for overlap-zone rows below the floor (all the merge looks at).
KEY_COLUMNS = ("tile", "id", "ra", "dec", "edge", "score")
#: Schema of failure records (``id`` is -1 when the whole tile failed).
FAILURE_SCHEMA = pa.schema(
    [
        ("tile", pa.string()),
        ("id", pa.int64()),
        ("stage", pa.string()),
        ("error_type", pa.string()),
        ("message", pa.string()),
    ]
)
_COUNTS = ("n_sources", "n_selected", "n_scored", "n_edge", "n_source_failures")


class Ledger:
    """Collects tile results on the client and commits them in batches.

    Parameters
    ----------
    fs, out_path : fsspec filesystem and path of the scan's output folder.
    run_token : str
        Unique per run; batch names start with it.
    storage_options : dict
        For the atomic writes.
    batch_tiles, batch_seconds : int, float
        Commit when this many tiles are pending, or this long after the last commit.
    """

    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        out_path: str,
        run_token: str,
        *,
        storage_options: dict[str, Any],
        batch_tiles: int = 500,
        batch_seconds: float = 30.0,
    ) -> None:
        self.fs, self.path = fs, posixpath.join(out_path, "ledger")
        self.run_token = run_token
        self.storage_options = storage_options
        self.batch_tiles, self.batch_seconds = batch_tiles, batch_seconds
        self._seq = 0
        self._last_commit = time.monotonic()
        self._tiles: list[dict[str, Any]] = []
        self._rows: list[pa.Table] = []
        self._failures: list[dict[str, Any]] = []

    def add(self, result: Any, reduce_floor: float) -> None:
        """Queue one :class:`~lenscan.sweep.worker.TileResult`; commit if a batch is full."""
        self._tiles.append(
            {
                "tile": result.tile,
                "write_id": result.write_id,
                "reduce_floor": float(reduce_floor),
                "n_sources": result.n_sources,
                "n_selected": result.n_selected,
                "n_scored": result.n_scored,
                "n_edge": result.n_edge,
                "n_source_failures": len(result.source_failures),
                "seconds": result.seconds,
                "stage_seconds": json.dumps(result.stage_seconds),
            }
        )
        if result.reduce_rows is not None:
            self._rows.append(_slim(result.reduce_rows, reduce_floor))
        self._failures.extend(result.source_failures)
        due = time.monotonic() - self._last_commit >= self.batch_seconds
        if len(self._tiles) >= self.batch_tiles or due:
            self.commit()

    def commit(self) -> None:
        """Write the pending tiles as one batch (rows and failures first, the tile list last)."""
        if not self._tiles:
            return
        stem = posixpath.join(self.path, f"{self.run_token}-{self._seq:06d}")
        committed = time.time()
        tiles = pa.Table.from_pylist([{**t, "committed": committed} for t in self._tiles])
        rows = pa.concat_tables(self._rows, promote_options="default") if self._rows else None
        failures = pa.Table.from_pylist(self._failures, schema=FAILURE_SCHEMA)
        for suffix, table in (("rows", rows), ("failures", failures), ("tiles", tiles)):
            if table is not None:
                self._write(f"{stem}.{suffix}.parquet", table)
        self._seq += 1
        self._last_commit = time.monotonic()
        self._tiles, self._rows, self._failures = [], [], []

    def _write(self, path: str, table: pa.Table) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf)
        atomic_write_bytes(
            self.fs.unstrip_protocol(path), buf.getvalue(), storage_options=self.storage_options
        )


def _slim(rows: pa.Table, floor: float) -> pa.Table:
    """Full rows at or above the floor; only the merge keys of the overlap-zone rest."""
    high = pc.greater_equal(rows["score"], floor)
    full = rows.filter(high)
    keys = rows.filter(pc.invert(high)).select(list(KEY_COLUMNS))
    return pa.concat_tables([full, keys], promote_options="default")


@dataclass(slots=True)
class TileRecord:
    """One tile's newest ledger record. Slots, not a dict: the client holds one per tile.

    Read as ``record["write_id"]`` or ``record.write_id``.
    """

    write_id: str
    reduce_floor: float
    n_sources: int = 0
    n_selected: int = 0
    n_scored: int = 0
    n_edge: int = 0
    n_source_failures: int = 0
    seconds: float = 0.0
    stage_seconds: str = "{}"
    committed: float = 0.0
    batch: str = ""

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)


#: The ``.tiles`` columns a :class:`TileRecord` keeps (``batch`` is the file it came from).
_RECORD_FIELDS = (
    "write_id",
    "reduce_floor",
    *_COUNTS,
    "seconds",
    "stage_seconds",
    "committed",
)


@dataclass
class LedgerState:
    """What the ledger holds for a set of tiles (the newest commit of each).

    Attributes
    ----------
    tiles : dict
        Tile id -> its :class:`TileRecord` (``write_id``, ``reduce_floor``, counts, timings).
    rows : pyarrow.Table or None
        Reduce rows of those tiles.
    failures : pyarrow.Table
        Sources of those tiles that could not be scored.
    """

    tiles: dict[str, TileRecord] = field(default_factory=dict)
    rows: pa.Table | None = None
    failures: pa.Table = field(default_factory=FAILURE_SCHEMA.empty_table)

    def current(self, write_ids: dict[str, str]) -> LedgerState:
        """Only the records of the tiles as they are now (``write_ids``: tile -> write id).

        A tile rewritten in the survey since it was scored keeps no rows here until it is
        scored again: stale pixels never reach the candidate table.
        """
        keep = {t: r for t, r in self.tiles.items() if r.write_id == write_ids.get(t)}
        names = pa.array(sorted(keep), pa.string())

        def only(table: pa.Table | None) -> pa.Table | None:
            return None if table is None else table.filter(pc.is_in(table["tile"], names))

        return LedgerState(tiles=keep, rows=only(self.rows), failures=only(self.failures))

    def totals(self) -> dict[str, int]:
        """Counts summed over the tiles (sources, selected, scored, edge, failed sources)."""
        return {k: int(sum(getattr(t, k) for t in self.tiles.values())) for k in _COUNTS}


def load_ledger(
    fs: fsspec.AbstractFileSystem, out_path: str, *, tiles: Collection[str] | None = None
) -> LedgerState:
    """Read the committed ledger under ``out_path`` (fresh listing), for ``tiles`` or all.

    The client holds one compact :class:`TileRecord` per tile and one batch's records as
    Python objects at a time: a survey of 10^5-10^6 tiles is read in bounded overhead.
    """
    path = posixpath.join(out_path, "ledger")
    names = [p for p in list_fresh(fs, path) if p.endswith(".tiles.parquet")]
    if not names:
        return LedgerState()
    wanted = None if tiles is None else set(tiles)
    newest: dict[str, TileRecord] = {}
    with ThreadPoolExecutor(max_workers=16) as pool:
        batches = pool.map(lambda p: pq.read_table(p, filesystem=fs), names)
        for name, batch in zip(names, batches, strict=True):
            _keep_newest(newest, batch, name[: -len(".tiles.parquet")], wanted)
    by_batch: dict[str, set[str]] = {}
    for tile, rec in newest.items():
        by_batch.setdefault(rec.batch, set()).add(tile)
    with ThreadPoolExecutor(max_workers=16) as pool:
        rows = [
            t
            for t in pool.map(lambda b: _read_part_of(fs, b, "rows", by_batch[b]), by_batch)
            if t is not None
        ]
        failures = [
            t
            for t in pool.map(lambda b: _read_part_of(fs, b, "failures", by_batch[b]), by_batch)
            if t is not None
        ]
    return LedgerState(
        tiles=newest,
        rows=pa.concat_tables(rows, promote_options="default") if rows else None,
        failures=pa.concat_tables([FAILURE_SCHEMA.empty_table(), *failures]),
    )


def _keep_newest(
    newest: dict[str, TileRecord], batch: pa.Table, stem: str, wanted: set[str] | None
) -> None:
    """Fold one ``.tiles`` batch into ``newest`` (tile -> its most recently committed record)."""
    columns = {f: batch[f].to_pylist() for f in _RECORD_FIELDS if f in batch.column_names}
    for i, tile in enumerate(batch["tile"].to_pylist()):
        if wanted is not None and tile not in wanted:
            continue
        old = newest.get(tile)
        if old is None or columns["committed"][i] >= old.committed:
            newest[tile] = TileRecord(**{f: v[i] for f, v in columns.items()}, batch=stem)


def _read_part_of(
    fs: fsspec.AbstractFileSystem, stem: str, suffix: str, tiles: set[str]
) -> pa.Table | None:
    try:
        table = pq.read_table(f"{stem}.{suffix}.parquet", filesystem=fs)
    except FileNotFoundError:
        return None
    keep = np.isin(table["tile"].to_numpy(zero_copy_only=False), list(tiles))
    return table.filter(pa.array(keep))
