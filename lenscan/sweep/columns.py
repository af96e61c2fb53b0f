"""A sweep's per-tile state as Arrow columns, read through light views.

A Rubin wide sweep plans 10^5-10^6 tiles. Holding each tile's id, write id, source count,
ledger record and "done" flag as Python objects costs ~1.5 kB a tile in the client; held as
Arrow columns it costs the bytes of the values. These views let the rest of the code (and users
of :class:`~lenscan.sweep.plan.ScanPlan`) read those columns as the sequences, sets and mappings
they were, without building one Python object per tile: values are made on access, lookups by
tile id bisect a sorted id column, and bulk work goes through :attr:`TileIds.arrow`.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Mapping, Sequence, Set
from typing import Any, Generic, TypeVar, overload

import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["TileColumn", "TileIds", "TileSet", "as_tile_array"]

V = TypeVar("V")
#: Values converted to Python objects per step when iterating (bounded, whatever the length).
_STEP = 8192


def as_tile_array(tiles: Any) -> pa.Array:
    """Tile ids as one Arrow string array: the view's own column, or a Python collection's."""
    if isinstance(tiles, TileIds | TileSet):
        return tiles.arrow
    if isinstance(tiles, pa.ChunkedArray):
        one = tiles.chunk(0) if tiles.num_chunks == 1 else tiles.combine_chunks()
        return one.cast(pa.string())
    if isinstance(tiles, pa.Array):
        return tiles.cast(pa.string())
    return pa.array(list(tiles), pa.string())


class TileIds(Sequence[str]):
    """Tile ids held as one Arrow string array, read as a sequence of ``str``.

    Parameters
    ----------
    ids : pyarrow.Array or ChunkedArray
        The ids, in the sequence's order.
    is_sorted : bool
        The ids are sorted and unique: membership and :meth:`position` then bisect
        (O(log n)) instead of scanning.
    """

    __slots__ = ("_ids", "_sorted")

    def __init__(self, ids: pa.Array | pa.ChunkedArray, *, is_sorted: bool = False) -> None:
        self._ids = as_tile_array(ids)
        self._sorted = is_sorted

    @property
    def arrow(self) -> pa.Array:
        """The ids as one Arrow string array (no copy)."""
        return self._ids

    def __len__(self) -> int:
        return len(self._ids)

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> TileIds: ...
    def __getitem__(self, i: int | slice) -> str | TileIds:
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self._ids))
            if step == 1:
                return TileIds(self._ids.slice(start, max(stop - start, 0)), is_sorted=self._sorted)
            return TileIds(self._ids.take(pa.array(range(start, stop, step), pa.int64())))
        n = len(self._ids)
        if not -n <= i < n:
            raise IndexError(f"tile index {i} out of range for {n} tiles")
        return str(self._ids[i % n].as_py())

    def __iter__(self) -> Iterator[str]:
        for start in range(0, len(self._ids), _STEP):
            yield from self._ids.slice(start, _STEP).to_pylist()

    def __contains__(self, tile: object) -> bool:
        return isinstance(tile, str) and self.position(tile) >= 0

    def position(self, tile: str) -> int:
        """Where ``tile`` is in the sequence, or -1."""
        if self._sorted:
            i = bisect.bisect_left(_Bisectable(self._ids), tile)
            return i if i < len(self._ids) and self._ids[i].as_py() == tile else -1
        return int(pc.index(self._ids, pa.scalar(tile, pa.string())).as_py())

    def index(self, value: Any, start: int = 0, stop: int | None = None) -> int:
        i = self.position(value) if isinstance(value, str) else -1
        if i < 0 or i < start or (stop is not None and i >= stop):
            raise ValueError(f"{value!r} is not a tile here")
        return i

    def __eq__(self, other: object) -> bool:
        if isinstance(other, TileIds):
            return self._ids.equals(other._ids)
        if isinstance(other, Sequence) and not isinstance(other, str | bytes):
            return len(self) == len(other) and list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        shown = ", ".join(repr(t) for t in self._ids.slice(0, 5).to_pylist())
        return f"TileIds([{shown}{', ...' if len(self) > 5 else ''}], {len(self)} tiles)"


class _Bisectable(Sequence[str]):
    """An Arrow string array indexed as ``str`` values, for :func:`bisect.bisect_left`."""

    __slots__ = ("_ids",)

    def __init__(self, ids: pa.Array) -> None:
        self._ids = ids

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, i: Any) -> Any:
        return self._ids[i].as_py()


class TileSet(Set[str]):
    """A set of tile ids held as one sorted Arrow string array (``plan.done``)."""

    __slots__ = ("_ids",)

    def __init__(self, ids: pa.Array | pa.ChunkedArray | None = None) -> None:
        ids = pa.array([], pa.string()) if ids is None else as_tile_array(ids)
        ids = pc.unique(ids)
        self._ids = TileIds(ids.take(pc.sort_indices(ids)), is_sorted=True)

    @property
    def arrow(self) -> pa.Array:
        """The ids, sorted, as one Arrow string array."""
        return self._ids.arrow

    def __contains__(self, tile: object) -> bool:
        return tile in self._ids

    def __iter__(self) -> Iterator[str]:
        return iter(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def __repr__(self) -> str:
        return f"TileSet({self._ids!r})"


class TileColumn(Mapping[str, V], Generic[V]):
    """One per-tile column read as a mapping tile id -> value (made on access).

    Parameters
    ----------
    ids : TileIds
        Sorted, unique tile ids.
    values : pyarrow.Array or ChunkedArray
        The column, row for row with ``ids``.
    """

    __slots__ = ("_ids", "_values")

    def __init__(self, ids: TileIds, values: pa.Array | pa.ChunkedArray) -> None:
        self._ids = ids
        self._values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values

    @property
    def ids(self) -> TileIds:
        """The keys, sorted."""
        return self._ids

    @property
    def values_arrow(self) -> pa.Array:
        """The values as one Arrow array, row for row with :attr:`ids`."""
        return self._values

    def __getitem__(self, tile: str) -> V:
        i = self._ids.position(tile) if isinstance(tile, str) else -1
        if i < 0:
            raise KeyError(tile)
        return self._values[i].as_py()

    def __iter__(self) -> Iterator[str]:
        return iter(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def __repr__(self) -> str:
        return f"TileColumn({len(self)} tiles, {self._values.type})"
