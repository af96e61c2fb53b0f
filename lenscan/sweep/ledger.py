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
from collections.abc import Collection, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lenscan._io import atomic_write_bytes, list_fresh
from lenscan.sweep.columns import TileColumn, TileIds, as_tile_array

__all__ = [
    "FAILURE_SCHEMA",
    "KEY_COLUMNS",
    "RECORD_SCHEMA",
    "Ledger",
    "LedgerState",
    "TileRecord",
    "TileRecords",
    "load_ledger",
]

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
    """One tile's newest ledger record, made on access from :attr:`LedgerState.records`.

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


#: The ``.tiles`` columns a :class:`TileRecord` keeps (``batch`` is the file it came from), with
#: their types and the value a batch written before the column existed reads as.
_RECORD_COLUMNS: dict[str, tuple[pa.DataType, Any]] = {
    "write_id": (pa.string(), None),
    "reduce_floor": (pa.float64(), None),
    **{c: (pa.int64(), 0) for c in _COUNTS},
    "seconds": (pa.float64(), 0.0),
    "stage_seconds": (pa.string(), "{}"),
    "committed": (pa.float64(), 0.0),
}
#: One row per tile: the newest record, in the order the ledger first lists each tile.
RECORD_SCHEMA = pa.schema(
    [("tile", pa.string())]
    + [(name, dtype) for name, (dtype, _) in _RECORD_COLUMNS.items()]
    + [("batch", pa.dictionary(pa.int32(), pa.string()))]
)


class TileRecords(Mapping[str, TileRecord]):
    """``LedgerState.tiles``: the records table read as tile id -> :class:`TileRecord`.

    Iterates in the table's order; a lookup bisects a sorted copy of the ids, made on the first.
    """

    __slots__ = ("_by_id", "_records")

    def __init__(self, records: pa.Table) -> None:
        self._records = records
        self._by_id: tuple[TileIds, np.ndarray] | None = None

    def __getitem__(self, tile: str) -> TileRecord:
        if self._by_id is None:
            order = pc.sort_indices(self._records["tile"])
            ids = TileIds(self._records["tile"].take(order), is_sorted=True)
            self._by_id = (ids, order.to_numpy())
        ids, order = self._by_id
        i = ids.position(tile) if isinstance(tile, str) else -1
        if i < 0:
            raise KeyError(tile)
        return _record(self._records.slice(int(order[i]), 1).to_pylist()[0])

    def __iter__(self) -> Iterator[str]:
        return iter(TileIds(self._records["tile"]))

    def __len__(self) -> int:
        return self._records.num_rows

    def values(self) -> Iterator[TileRecord]:  # type: ignore[override]
        """The records in the table's order (made one step at a time)."""
        for _, record in self.items():
            yield record

    def items(self) -> Iterator[tuple[str, TileRecord]]:  # type: ignore[override]
        """(tile, record) in the table's order, made one step at a time, not by lookup."""
        for batch in self._records.to_batches(max_chunksize=8192):
            for row in batch.to_pylist():
                tile = row["tile"]
                yield tile, _record(row)


def _record(row: dict[str, Any]) -> TileRecord:
    row.pop("tile")
    return TileRecord(**row)


@dataclass
class LedgerState:
    """What the ledger holds for a set of tiles (the newest commit of each).

    Attributes
    ----------
    records : pyarrow.Table
        One row per tile (:data:`RECORD_SCHEMA`: ``tile``, ``write_id``, ``reduce_floor``,
        counts, timings, ``committed``, ``batch``), in the order the ledger first lists each
        tile. Columns, not an object per tile: a sweep of 10^5-10^6 tiles holds the values only.
    rows : pyarrow.Table or None
        Reduce rows of those tiles (of no other tile: :meth:`current` relies on it).
    failures : pyarrow.Table
        Sources of those tiles that could not be scored.
    """

    records: pa.Table = field(default_factory=RECORD_SCHEMA.empty_table)
    rows: pa.Table | None = None
    failures: pa.Table = field(default_factory=FAILURE_SCHEMA.empty_table)

    @cached_property
    def tiles(self) -> TileRecords:
        """Tile id -> its :class:`TileRecord` (a view of :attr:`records`)."""
        return TileRecords(self.records)

    @property
    def tile_ids(self) -> pa.Array:
        """The tiles' ids, in :attr:`records` order."""
        return as_tile_array(self.records["tile"])

    def current(self, write_ids: Mapping[str, str]) -> LedgerState:
        """Only the records of the tiles as they are now (``write_ids``: tile -> write id).

        A tile rewritten in the survey since it was scored keeps no rows here until it is
        scored again: stale pixels never reach the candidate table.
        """
        if isinstance(write_ids, TileColumn):
            ids, now = write_ids.ids.arrow, write_ids.values_arrow
        else:
            ids = pa.array(list(write_ids), pa.string())
            now = pa.array([write_ids[t] for t in ids.to_pylist()], pa.string())
        where = pc.index_in(self.records["tile"], value_set=ids)
        same = pc.fill_null(pc.equal(self.records["write_id"], pc.take(now, where)), False)
        if pc.all(same).as_py() is not False:  # all current: the same tables, not copies
            return LedgerState(records=self.records, rows=self.rows, failures=self.failures)
        records = self.records.filter(same)
        names = as_tile_array(records["tile"])

        def only(table: pa.Table | None) -> pa.Table | None:
            return None if table is None else table.filter(pc.is_in(table["tile"], names))

        return LedgerState(records=records, rows=only(self.rows), failures=only(self.failures))

    def totals(self) -> dict[str, int]:
        """Counts summed over the tiles (sources, selected, scored, edge, failed sources)."""
        return {k: int(pc.sum(self.records[k]).as_py() or 0) for k in _COUNTS}


def load_ledger(
    fs: fsspec.AbstractFileSystem,
    out_path: str,
    *,
    tiles: Collection[str] | None = None,
    rows: bool = True,
) -> LedgerState:
    """Read the committed ledger under ``out_path`` (fresh listing), for ``tiles`` or all.

    The records stay Arrow columns from file to :class:`LedgerState` (no Python object per
    tile): a survey of 10^5-10^6 tiles costs the bytes of its records. ``rows=False`` reads the
    records only (what planning needs), leaving ``rows`` None and ``failures`` empty.
    """
    path = posixpath.join(out_path, "ledger")
    names = [p for p in list_fresh(fs, path) if p.endswith(".tiles.parquet")]
    stems = [p[: -len(".tiles.parquet")] for p in names]
    if not stems:
        return LedgerState()
    wanted = None if tiles is None else as_tile_array(tiles)
    with ThreadPoolExecutor(max_workers=16) as pool:
        batches = list(pool.map(lambda k: _tiles_batch(fs, stems, k), range(len(stems))))
    records = pa.concat_tables(batches)
    del batches
    if wanted is not None:  # one hash of the wanted ids, not one per batch
        records = records.filter(pc.is_in(records["tile"], value_set=wanted))
    records = _newest(records)
    groups = _tiles_by_batch(records) if rows else []
    records = records.set_column(
        records.schema.get_field_index("batch"),
        "batch",
        pa.DictionaryArray.from_arrays(records["batch"].combine_chunks(), pa.array(stems)),
    )
    if not rows:
        return LedgerState(records=records)

    def read(suffix: str) -> list[pa.Table]:
        with ThreadPoolExecutor(max_workers=16) as pool:
            parts = pool.map(lambda g: _read_part_of(fs, stems[g[0]], suffix, g[1]), groups)
            return [t for t in parts if t is not None]

    reduce_rows, failures = read("rows"), read("failures")
    return LedgerState(
        records=records,
        rows=pa.concat_tables(reduce_rows, promote_options="default") if reduce_rows else None,
        failures=pa.concat_tables([FAILURE_SCHEMA.empty_table(), *failures]),
    )


def _tiles_batch(fs: fsspec.AbstractFileSystem, stems: list[str], k: int) -> pa.Table:
    """Batch ``k``'s ``.tiles`` as record columns (missing ones at their defaults); ``batch``
    is ``k``."""
    table = pq.read_table(f"{stems[k]}.tiles.parquet", filesystem=fs)
    n = table.num_rows
    columns = [table["tile"].cast(pa.string())]
    for name, (dtype, default) in _RECORD_COLUMNS.items():
        have = name in table.column_names
        columns.append(table[name].cast(dtype) if have else pa.array([default] * n, dtype))
    columns.append(pa.array(np.full(n, k, np.int32)))
    return pa.table(columns, names=["tile", *_RECORD_COLUMNS, "batch"])


def _newest(records: pa.Table) -> pa.Table:
    """Each tile's most recently committed record (a tie: the later batch, then the later row),
    in the order the batches, in name order, first list each tile."""
    n = records.num_rows
    if n == 0:
        return records
    seq = pa.array(np.arange(n, dtype=np.int64))  # batches in name order, rows in file order
    keys = [("tile", "ascending"), ("committed", "descending"), ("seq", "descending")]
    order = pc.sort_indices(records.append_column("seq", seq), sort_keys=keys).to_numpy()
    tiles = records["tile"].take(order)
    differs = pc.not_equal(tiles.slice(1), tiles.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(np.r_[True, differs])
    first_seen = np.minimum.reduceat(order, starts)
    keep = order[starts][np.argsort(first_seen, kind="stable")]
    return records.take(pa.array(keep, pa.int64()))


def _tiles_by_batch(records: pa.Table) -> list[tuple[int, pa.Array]]:
    """(batch number, its tiles) for each batch holding a newest record, in the order the
    records first name each batch."""
    batch = records["batch"].to_numpy()
    order = np.argsort(batch, kind="stable")
    bounds = np.flatnonzero(np.diff(batch[order])) + 1
    tiles = as_tile_array(records["tile"])
    groups = [
        (int(batch[rows[0]]), tiles.take(pa.array(rows)), int(rows[0]))
        for rows in np.split(order, bounds)
        if rows.size
    ]
    return [(k, ids) for k, ids, _ in sorted(groups, key=lambda g: g[2])]


def _read_part_of(
    fs: fsspec.AbstractFileSystem, stem: str, suffix: str, tiles: pa.Array
) -> pa.Table | None:
    try:
        table = pq.read_table(f"{stem}.{suffix}.parquet", filesystem=fs)
    except FileNotFoundError:
        return None
    return table.filter(pc.is_in(table["tile"], value_set=tiles))
