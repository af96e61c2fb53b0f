"""Bulk stamp reader: many stamps from one tile, reading each touched chunk once.

Calling a zarr array once per stamp costs a store round trip (and, in zarr-python 3.1, a
sequential read per inner chunk of a shard) for every stamp. :func:`read_stamps` instead works
out the set of inner chunks that all the stamps touch, fetches them with concurrent range reads
(one read per shard index, one per run of touched inner chunks stored back to back), decodes
them on a thread pool and cuts the stamps from the decoded chunks in numpy. It is the only entry
point, so a faster engine (tensorstore, kvikio) can serve it later.

Two engines sit behind it:

* ``direct``: for the layouts lenscan writes (inner chunks of ``bytes`` + optional ``zstd``,
  sharded with the index at the end, or unsharded). It issues the store's own async ``get``
  calls with byte ranges, all under one event loop.
* ``zarr``: any other layout; reads runs of touched chunks per chunk row through zarr's async
  array API, concurrently.
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.abc.store import RangeByteRequest, Store, SuffixByteRequest
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

from lenscan.stamps import mask_stamps, paste_stamps, stamp_edge_flags, stamp_origins
from lenscan.survey.store import Tile

__all__ = [
    "DECODE_SLICE",
    "DEFAULT_BATCH_BYTES",
    "MAX_COALESCED_BYTES",
    "MAX_CONCURRENT_REQUESTS",
    "READER_THREADS",
    "read_model_stamps",
    "read_stamps",
]

_EMPTY = 2**64 - 1  # shard-index marker of a chunk that holds only the fill value
#: Concurrent store requests in flight at once (object stores favour many small parallel GETs).
MAX_CONCURRENT_REQUESTS = 64
#: Threads of the reader's pool (concurrent reads and decompression).
READER_THREADS = min(8, os.cpu_count() or 1)
#: Fewest chunks a decode task of the pool gets.
DECODE_SLICE = 16
#: Default bound on decoded chunk bytes held at once by :func:`read_stamps`.
DEFAULT_BATCH_BYTES = 256 * 2**20


def read_stamps(
    tile: Tile,
    x: np.ndarray,
    y: np.ndarray,
    size_pix: int,
    *,
    array: str = "image",
    bands: Sequence[str] | None = None,
    max_batch_bytes: int = DEFAULT_BATCH_BYTES,
) -> tuple[np.ndarray, np.ndarray]:
    """Read square multi-band stamps centred on pixel positions of a tile, in bulk.

    Stamps are placed like :class:`astropy.nddata.Cutout2D` (``mode="partial"``): a stamp of
    side ``S`` centred on ``(x, y)`` starts at ``ceil(pos - S / 2)`` (see
    :func:`lenscan.stamps.stamp_origins`). Each inner chunk touched by any stamp is read once,
    and pasted into the stamps it touches by :func:`lenscan.stamps.paste_stamps`.

    Parameters
    ----------
    tile : Tile
        The tile to read from.
    x, y : array_like, shape (n,)
        0-based pixel coordinates of the stamp centres; positions off the tile are allowed
        (their stamps are all fill).
    size_pix : int
        Stamp side length in pixels.
    array : {"image", "weight", "mask", "zero_weight"}
        Which pixel array to read.
    bands : sequence of str, optional
        Read only these bands, in this order (e.g. a model's bands); default all, in the
        tile's order. Chunks of other bands are never read.
    max_batch_bytes : int
        Upper bound on decoded chunk bytes held in memory at once; stamps are processed in
        batches (sorted by position) that stay under it.

    Returns
    -------
    stamps : ndarray, shape (n, len(bands), size_pix, size_pix)
        float32 with NaN outside the tile for ``image`` and ``weight``; the mask's integer dtype
        with 0 outside the tile for ``mask``.
    edge_flag : ndarray of bool, shape (n,)
        True where the stamp extends beyond the tile.

    Examples
    --------
    >>> stamps, edge = read_stamps(tile, cat["x"], cat["y"], 100)  # doctest: +SKIP
    """
    x, y, arr, band_index = _check_read(tile, x, y, size_pix, array, bands, max_batch_bytes)
    if len(set(band_index)) < len(band_index):  # a band asked twice: read it once
        unique = list(dict.fromkeys(bands or ()))
        stamps, edge = read_stamps(
            tile, x, y, size_pix, array=array, bands=unique, max_batch_bytes=max_batch_bytes
        )
        return stamps[:, [unique.index(b) for b in bands or ()]], edge
    size_pix = int(size_pix)
    x0, y0 = stamp_origins(x, y, size_pix)
    edge = stamp_edge_flags(x0, y0, size_pix, tile.shape_yx)
    is_float = arr.dtype.kind == "f"
    stamps = np.full(
        (len(x), len(band_index), size_pix, size_pix),
        np.nan if is_float else 0,
        dtype=np.dtype(np.float32) if is_float else arr.dtype,
    )
    engine = _engine_for(arr)
    plan = _StampPlan.make(x0, y0, size_pix, tile.shape_yx, engine.chunk_yx)
    if plan is None:
        return stamps, edge  # no stamp overlaps the tile
    chunk_bytes = len(band_index) * engine.chunk_yx[0] * engine.chunk_yx[1] * arr.dtype.itemsize
    for batch in plan.batches(max(1, max_batch_bytes // chunk_bytes)):
        touching = plan.chunks_of(batch)
        blocks = engine.read(sorted(touching), band_index)
        for (r, c), ks in touching.items():
            origin = (r * engine.chunk_yx[0], c * engine.chunk_yx[1])
            paste_stamps(stamps, blocks[(r, c)], x0[ks], y0[ks], origin_yx=origin,
                         full_shape_yx=tile.shape_yx, rows=ks)  # fmt: skip
        del blocks
    if engine.post_scale is not None:
        stamps *= np.float32(engine.post_scale)  # NaN outside the tile stays NaN
    return stamps, edge


def _check_read(
    tile: Tile,
    x: Any,
    y: Any,
    size_pix: Any,
    array: str,
    bands: Sequence[str] | None,
    max_batch_bytes: int,
) -> tuple[np.ndarray, np.ndarray, zarr.Array, list[int]]:
    """Validate :func:`read_stamps`' arguments; return x, y, the array and the band indices."""
    if not isinstance(tile, Tile):
        raise TypeError(f"read_stamps: tile must be a lenscan Tile, got {type(tile).__name__}")
    if isinstance(size_pix, bool) or not isinstance(size_pix, int | np.integer) or size_pix < 1:
        raise ValueError(f"read_stamps: size_pix must be a positive integer, got {size_pix!r}")
    x = np.atleast_1d(np.asarray(x, dtype=np.float64))
    y = np.atleast_1d(np.asarray(y, dtype=np.float64))
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(
            f"read_stamps: x and y must be 1-D of equal length, got shapes {x.shape}, {y.shape}"
        )
    arr = tile._array(array)
    if arr is None:
        raise ValueError(f"read_stamps: tile {tile.id!r} has no {array!r} array")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError(f"read_stamps: tile {tile.id!r}: stamp centres must be finite")
    if max_batch_bytes < 1:
        raise ValueError(f"read_stamps: max_batch_bytes must be positive, got {max_batch_bytes}")
    if bands is None:
        return x, y, arr, list(range(int(arr.shape[0])))
    unknown = [b for b in bands if b not in tile.bands]
    if unknown or isinstance(bands, str):
        raise ValueError(
            f"read_stamps: tile {tile.id!r} has bands {list(tile.bands)}; "
            f"cannot read {unknown or bands!r}"
        )
    return x, y, arr, [tile.bands.index(b) for b in bands]


@dataclass(frozen=True)
class _StampPlan:
    """The inner chunks each stamp overlaps: rows ``r0..r1`` and columns ``c0..c1``."""

    order: list[int]  # stamps that overlap the tile, sorted by (first chunk row, column)
    r0: list[int]
    r1: list[int]
    c0: list[int]
    c1: list[int]

    @classmethod
    def make(
        cls,
        x0: np.ndarray,
        y0: np.ndarray,
        size_pix: int,
        shape_yx: tuple[int, int],
        chunk_yx: tuple[int, int],
    ) -> _StampPlan | None:
        """Plan the stamps at ``(x0, y0)``; None when none of them overlaps the tile."""
        ny, nx = shape_yx
        cy, cx = chunk_yx
        ya, yb = np.maximum(y0, 0), np.minimum(y0 + size_pix, ny)
        xa, xb = np.maximum(x0, 0), np.minimum(x0 + size_pix, nx)
        inside = np.flatnonzero((ya < yb) & (xa < xb))
        if inside.size == 0:
            return None
        r0, r1 = ya // cy, (yb - 1) // cy
        c0, c1 = xa // cx, (xb - 1) // cx
        order = inside[np.lexsort((c0[inside], r0[inside]))]
        # Plain Python ints: the per-stamp loops index these thousands of times.
        return cls(order.tolist(), r0.tolist(), r1.tolist(), c0.tolist(), c1.tolist())

    def touched(self, k: int) -> set[tuple[int, int]]:
        """The chunks ``(row, col)`` stamp ``k`` overlaps."""
        return {
            (r, c)
            for r in range(self.r0[k], self.r1[k] + 1)
            for c in range(self.c0[k], self.c1[k] + 1)
        }

    def batches(self, budget_chunks: int) -> list[list[int]]:
        """Group stamps (in plan order) so that each group touches <= ``budget_chunks``."""
        return _batches(self.order, self.r0, self.r1, self.c0, self.c1, budget_chunks)

    def chunks_of(self, batch: list[int]) -> dict[tuple[int, int], list[int]]:
        """Chunk ``(row, col)`` -> the stamps of ``batch`` that overlap it."""
        out: dict[tuple[int, int], list[int]] = {}
        for k in batch:
            for rc in self.touched(k):
                out.setdefault(rc, []).append(k)
        return out


def read_model_stamps(
    tile: Tile, x: np.ndarray, y: np.ndarray, size_pix: int, *, bands: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image stamps as a model sees them: masked pixels blanked (NaN), as in training.

    Reads the image stamps and the tile's mask plane (where it has none: its ``zero_weight``
    plane, uint8, or in stores written before that plane existed its float weight plane;
    weight 0 = no data) with :func:`read_stamps`, and blanks masked pixels with
    :func:`lenscan.stamps.mask_stamps`. The scan and the web service both call this.

    Returns
    -------
    stamps : ndarray, shape (n, len(bands), size_pix, size_pix)
        float32, NaN outside the tile and at masked pixels.
    edge_flag : ndarray of bool, shape (n,)
    masked_fraction : ndarray of float32, shape (n,)
        Fraction of each stamp's in-tile pixels that are masked.
    """
    stamps, edge = read_stamps(tile, x, y, size_pix, bands=bands)
    # zero_weight is exactly masked_pixels(weight=...) of a weight that write_tile accepted
    # (finite or NaN, >= 0; 0 outside the tile), read at a quarter of the bytes.
    plane = next((p for p in ("mask", "zero_weight", "weight") if tile._array(p) is not None), None)
    if plane is None:
        return stamps, edge, np.zeros(len(stamps), np.float32)
    aux, _ = read_stamps(tile, x, y, size_pix, array=plane, bands=bands)
    kind = "weight" if plane == "weight" else "mask"
    stamps, masked = mask_stamps(stamps, **{kind: aux})
    return stamps, edge, masked


def _batches(
    order: list[int],
    r0: list[int],
    r1: list[int],
    c0: list[int],
    c1: list[int],
    budget_chunks: int,
) -> list[list[int]]:
    """Group stamps (in ``order``) so that each group touches at most ``budget_chunks`` chunks."""
    batches: list[list[int]] = []
    current: list[int] = []
    touched: set[tuple[int, int]] = set()
    for k in order:
        mine = {(r, c) for r in range(r0[k], r1[k] + 1) for c in range(c0[k], c1[k] + 1)}
        if current and len(touched | mine) > budget_chunks:
            batches.append(current)
            current, touched = [], set()
        current.append(k)
        touched |= mine
    if current:
        batches.append(current)
    return batches


# --------------------------------------------------------------------------------------------
# Engines
# --------------------------------------------------------------------------------------------


class _Engine:
    """Reads the planes of a set of inner chunks ``(row, col)``: ``{(r, c): [plane per band]}``."""

    chunk_yx: tuple[int, int]
    #: When set, planes hold integer steps: the caller multiplies the stamps by it at the end.
    post_scale: float | None = None

    def read(
        self, chunks: list[tuple[int, int]], bands: list[int]
    ) -> dict[tuple[int, int], list[Any]]:
        """Planes of ``bands`` (array indices), in that order, for each chunk ``(row, col)``."""
        raise RuntimeError("engine subclasses implement read")  # pragma: no cover


def _engine_for(arr: zarr.Array) -> _Engine:
    direct = _DirectEngine.from_array(arr)
    return direct if direct is not None else _ZarrEngine(arr)


@dataclass(frozen=True)
class _ShardLayout:
    """Where inner chunks sit in the shards of a (band, y, x) array."""

    chunks_per_shard: tuple[int, int, int]  # (bands, rows, cols) of inner chunks in a shard
    index_at_end: bool
    index_crc: bool

    @property
    def index_bytes(self) -> int:
        sb, sy, sx = self.chunks_per_shard
        return 16 * sb * sy * sx + (4 if self.index_crc else 0)


def _little_endian_bytes(codec: Any) -> bool:
    return isinstance(codec, BytesCodec) and (
        codec.endian is None or codec.endian.value == "little"
    )


def _inner_codecs(codecs: tuple[Any, ...]) -> str | None:
    """The compression of a ``bytes`` (+ ``zstd`` or ``blosc``) chain; None if another chain."""
    if not codecs or not _little_endian_bytes(codecs[0]):
        return None
    if len(codecs) == 1:
        return "none"
    if len(codecs) == 2 and isinstance(codecs[1], ZstdCodec):
        return "zstd"
    if len(codecs) == 2 and isinstance(codecs[1], BloscCodec):
        return "blosc"  # a Blosc frame describes itself (shuffle, typesize, inner codec)
    return None


def _decompressor(kind: str) -> Any:
    """The numcodecs decoder of ``kind`` ("zstd" or "blosc"); both release the GIL."""
    if kind == "zstd":
        from numcodecs.zstd import Zstd

        return Zstd()
    from numcodecs.blosc import Blosc

    return Blosc()


@dataclass(frozen=True)
class _Dequantise:
    """A ``numcodecs.fixedscaleoffset`` filter (quantised float32 image): how to undo it."""

    scale: float
    offset: float
    stored: np.dtype

    @property
    def exact_step(self) -> float | None:
        """The step when decoding is ``float32(q) * step`` exactly (a power-of-two scale)."""
        step = 1.0 / self.scale
        exact = self.offset == 0 and math.frexp(self.scale)[0] == 0.5
        return step if exact and np.finfo(np.float32).tiny < step else None

    def __call__(self, raw: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        q = raw.view(self.stored).reshape(shape)
        step = 1.0 / self.scale
        if self.exact_step is not None:
            # scale a power of two: float32(q) * step is exact scaling of one rounding, so it
            # equals numcodecs' float64 (q / scale) rounded to float32, bit for bit, and is
            # twice as fast. One pass: cast and scale straight into the output plane.
            out = np.empty(shape, np.float32)
            np.multiply(q, np.float32(step), out=out, dtype=np.float32, casting="unsafe")
            return out
        # numcodecs' own decode, step for step: (int / scale) + offset in float64, then float32.
        return ((q / self.scale) + self.offset).astype(np.float32)


def _split_dequantise(
    codecs: tuple[Any, ...], dtype: np.dtype
) -> tuple[tuple[Any, ...], _Dequantise | None] | None:
    """Strip a leading scale-offset filter; None if it is one the direct engine cannot undo."""
    if not codecs or type(codecs[0]).__name__ != "FixedScaleOffset":
        return codecs, None
    cfg = dict(codecs[0].codec_config)
    try:
        source = np.dtype(cfg.get("dtype", "<f4"))
        stored = np.dtype(cfg.get("astype", cfg.get("dtype", "<f4")))
        scale, offset = float(cfg.get("scale", 1)), float(cfg.get("offset", 0))
    except (TypeError, ValueError):
        return None
    if source != np.dtype("<f4") or dtype != np.float32 or stored.kind not in "iu":
        return None
    if stored.itemsize > 1 and stored.byteorder == ">":
        return None
    return codecs[1:], _Dequantise(scale, offset, stored.newbyteorder("<"))


def _shard_layout(arr: zarr.Array, sharding: ShardingCodec) -> _ShardLayout | None:
    """The shard layout if the direct engine can read it exactly, else None.

    Checked, not assumed: one band per inner chunk, a shard shape that is a whole number of
    inner chunks, an index of little-endian uint64 pairs with an optional CRC32C and nothing
    else, at the start or the end of the shard.
    """
    inner = tuple(int(v) for v in sharding.chunk_shape)
    shard = tuple(int(v) for v in (arr.shards or ()))
    index = tuple(sharding.index_codecs)
    if len(inner) != 3 or len(shard) != 3 or inner[0] != 1:
        return None
    if any(s % c for s, c in zip(shard, inner, strict=True)):
        return None
    if not index or not _little_endian_bytes(index[0]) or getattr(index[0], "endian", None) is None:
        return None
    if len(index) > 2 or (len(index) == 2 and not isinstance(index[1], Crc32cCodec)):
        return None
    return _ShardLayout(
        chunks_per_shard=(shard[0], shard[1] // inner[1], shard[2] // inner[2]),
        index_at_end=sharding.index_location == ShardingCodecIndexLocation.end,
        index_crc=len(index) == 2,
    )


class _DirectEngine(_Engine):
    """Concurrent byte-range reads of lenscan's own layouts, decoded with numpy."""

    def __init__(
        self,
        arr: zarr.Array,
        *,
        chunk_yx: tuple[int, int],
        shards: _ShardLayout | None,
        compression: str,
        dequantise: _Dequantise | None = None,
    ) -> None:
        self.arr = arr
        self.store: Store = arr.store_path.store
        self.prefix = f"{arr.store_path.path}/" if arr.store_path.path else ""
        self.chunk_yx = chunk_yx
        self.shards = shards
        self.compression = compression
        self.decompressor = None if compression == "none" else _decompressor(compression)
        self.dequantise = dequantise
        # With a power-of-two step the integer steps themselves are pasted into the float32
        # stamps (the cast is numpy's astype) and the stamps are scaled once: a quarter of the
        # pixels of scaling every decoded chunk, with the same bits.
        self.post_scale = None if dequantise is None else dequantise.exact_step
        self.dtype = arr.dtype.newbyteorder("<") if arr.dtype.itemsize > 1 else arr.dtype
        # Chunks never written (all fill value) come back as this constant plane.
        self.fill_plane = np.full(chunk_yx, arr.fill_value, dtype=self.dtype)
        if self.post_scale is not None and dequantise is not None:
            self.fill_plane = np.zeros(chunk_yx, dtype=dequantise.stored)  # 0 steps = 0.0

    @classmethod
    def from_array(cls, arr: zarr.Array) -> _DirectEngine | None:
        """The direct engine for ``arr``, or None when its layout is not one it reads exactly."""
        meta = arr.metadata
        if arr.ndim != 3 or getattr(meta, "zarr_format", None) != 3 or arr.dtype.kind not in "fiub":
            return None
        codecs = tuple(getattr(meta, "codecs", ()))
        sharded = len(codecs) == 1 and isinstance(codecs[0], ShardingCodec)
        split = _split_dequantise(tuple(codecs[0].codecs) if sharded else codecs, arr.dtype)
        if split is None:
            return None
        inner, dequantise = split
        kind = _inner_codecs(inner)
        if kind is None:
            return None
        if sharded:
            layout = _shard_layout(arr, codecs[0])
            if layout is None:
                return None
            _, cy, cx = codecs[0].chunk_shape
            return cls(arr, chunk_yx=(int(cy), int(cx)), shards=layout, compression=kind,
                       dequantise=dequantise)  # fmt: skip
        if arr.chunks[0] != 1:
            return None
        chunk_yx = (int(arr.chunks[1]), int(arr.chunks[2]))
        return cls(arr, chunk_yx=chunk_yx, shards=None, compression=kind,
                   dequantise=dequantise)  # fmt: skip

    def _key(self, b: int, r: int, c: int) -> str:
        return self.prefix + self.arr.metadata.encode_chunk_key((b, r, c))

    def _decode(self, raw: np.ndarray) -> np.ndarray:
        if self.decompressor is not None:
            # Decompress straight into a chunk-sized buffer of the stored dtype (no copy).
            stored = self.dequantise.stored if self.dequantise is not None else self.dtype
            buf = np.empty(self.chunk_yx, stored)
            self.decompressor.decode(raw, out=buf)
            raw = buf.reshape(-1).view(np.uint8)
        if self.dequantise is not None:
            if self.post_scale is not None:
                return raw.view(self.dequantise.stored).reshape(self.chunk_yx)
            return self.dequantise(raw, self.chunk_yx)
        return raw.view(self.dtype).reshape(self.chunk_yx)

    def read(
        self, chunks: list[tuple[int, int]], bands: list[int]
    ) -> dict[tuple[int, int], list[Any]]:
        raw = self._fetch(chunks, bands)
        items = [(rc, i, p) for rc, planes in raw.items() for i, p in enumerate(planes)]
        items = [it for it in items if it[2] is not None]
        decoded = self._decode_all([p for _, _, p in items])
        out = {rc: [self.fill_plane] * len(planes) for rc, planes in raw.items()}
        for (rc, i, _), plane in zip(items, decoded, strict=True):
            out[rc][i] = plane
        return out

    def _decode_all(self, payloads: list[np.ndarray]) -> list[np.ndarray]:
        """Decode chunk payloads; compressed ones in a few slices on the reader's thread pool.

        Decompression releases the GIL. One pool task per slice, not per chunk: a task costs
        ~20 us of dispatch, as much as decoding a small chunk.
        """
        if (self.decompressor or self.dequantise) is None or len(payloads) < 2 * DECODE_SLICE:
            return [self._decode(p) for p in payloads]
        n = min(READER_THREADS, -(-len(payloads) // DECODE_SLICE))
        slices = [payloads[i::n] for i in range(n)]
        parts = list(_pool().map(lambda part: [self._decode(p) for p in part], slices))
        out: list[np.ndarray] = [None] * len(payloads)  # type: ignore[list-item]
        for i, part in enumerate(parts):
            out[i::n] = part
        return out

    def _get_many(self, requests: list[tuple[str, Any]]) -> list[np.ndarray | None]:
        """Fetch ``(key, byte_range)`` requests concurrently; None for a missing object."""
        # Only the exact LocalStore is read with os.pread (20x faster than one asyncio.to_thread
        # per chunk); subclasses and every other store keep their own get() semantics.
        if type(self.store) is LocalStore:
            return _local_get_many(Path(self.store.root), requests)
        return sync(_store_get_many(self.store, requests))

    def _fetch(
        self, chunks: list[tuple[int, int]], bands: list[int]
    ) -> dict[tuple[int, int], list[Any]]:
        slot = {b: i for i, b in enumerate(bands)}  # array band index -> output position
        out: dict[tuple[int, int], list[Any]] = {rc: [None] * len(bands) for rc in chunks}
        if self.shards is None:
            wanted = [(b, r, c) for (r, c) in chunks for b in bands]
            got = self._get_many([(self._key(*brc), None) for brc in wanted])
            for (b, r, c), data in zip(wanted, got, strict=True):
                out[(r, c)][slot[b]] = data
            return out

        # Phase 1: the index of every touched shard (one read each, at its start or end).
        sb, sy, sx = self.shards.chunks_per_shard
        shards = sorted({(b // sb, r // sy, c // sx) for (r, c) in chunks for b in bands})
        n = self.shards.index_bytes
        where = SuffixByteRequest(n) if self.shards.index_at_end else RangeByteRequest(0, n)
        raw_index = self._get_many([(self._key(*s), where) for s in shards])
        index = {
            shard: None if data is None else self._parse_index(data, shard)
            for shard, data in zip(shards, raw_index, strict=True)
        }
        # Phase 2: one range read per touched, non-empty inner chunk.
        wanted_ranges = []
        for r, c in chunks:
            for b in bands:
                shard = (b // sb, r // sy, c // sx)
                offsets = index[shard]
                if offsets is None:
                    continue  # shard never written: all fill
                start, length = offsets[b % sb, r % sy, c % sx]
                if start == _EMPTY:
                    continue
                wanted_ranges.append((b, r, c, shard, int(start), int(start + length)))
        merged = _coalesce([(sh, s, e) for _, _, _, sh, s, e in wanted_ranges])
        got = self._get_many([(self._key(*sh), RangeByteRequest(s, e)) for sh, s, e, _ in merged])
        for (_, start, _, members), data in zip(merged, got, strict=True):
            for i in members:
                b, r, c, _, s, e = wanted_ranges[i]
                out[(r, c)][slot[b]] = None if data is None else data[s - start : e - start]
        return out

    def _parse_index(self, data: np.ndarray, shard: tuple[int, int, int]) -> np.ndarray:
        layout = self.shards
        assert layout is not None
        n_entries = 16 * int(np.prod(layout.chunks_per_shard))
        if data.size != layout.index_bytes:
            raise OSError(
                f"shard {self._key(*shard)} of {self.store} is shorter than its index "
                f"({data.size} of {layout.index_bytes} bytes)"
            )
        body = data[:n_entries]
        if layout.index_crc:
            import google_crc32c

            stored = int.from_bytes(data[n_entries:].tobytes(), "little")
            if google_crc32c.value(body.tobytes()) != stored:
                raise OSError(
                    f"corrupt shard index in {self._key(*shard)} of {self.store}: checksum mismatch"
                )
        return body.view("<u8").reshape(*layout.chunks_per_shard, 2)


#: Largest single ranged read made by merging adjacent inner chunks.
MAX_COALESCED_BYTES = 16 * 2**20


def _coalesce(
    ranges: list[tuple[Any, int, int]],
) -> list[tuple[Any, int, int, list[int]]]:
    """Merge byte ranges of one object that touch end to start into one read.

    Returns ``(object, start, end, [indices of the input ranges it covers])``; no byte outside
    the requested ranges is read. Inner chunks that neighbour each other in a shard row are
    stored back to back, so a stamp across two chunk columns costs one request, not two.
    """
    order = sorted(range(len(ranges)), key=lambda i: (ranges[i][0], ranges[i][1]))
    out: list[tuple[Any, int, int, list[int]]] = []
    obj0: Any = None
    start0, end0, members0 = 0, 0, list[int]()  # the read being grown (members in place)
    for i in order:
        obj, start, end = ranges[i]
        if members0 and obj == obj0:
            if start == end0 and end - start0 <= MAX_COALESCED_BYTES:
                end0 = end
                members0.append(i)
                continue
            if start >= start0 and end <= end0:
                members0.append(i)  # the same chunk twice
                continue
        if members0:
            out.append((obj0, start0, end0, members0))
        obj0, start0, end0, members0 = obj, start, end, [i]
    if members0:
        out.append((obj0, start0, end0, members0))
    return out


class _ZarrEngine(_Engine):
    """Any zarr layout: one async zarr read per run of touched chunks in a chunk row."""

    def __init__(self, arr: zarr.Array) -> None:
        self.arr = arr
        chunks = arr.chunks
        self.chunk_yx = (int(chunks[1]), int(chunks[2]))

    def read(
        self, chunks: list[tuple[int, int]], bands: list[int]
    ) -> dict[tuple[int, int], list[Any]]:
        cy, cx = self.chunk_yx
        ny, nx = self.arr.shape[1:]
        runs: list[tuple[int, int, int]] = []  # (row, first col, last col)
        for r, c in chunks:  # chunks are sorted by (row, col)
            if runs and runs[-1][0] == r and runs[-1][2] == c - 1:
                runs[-1] = (r, runs[-1][1], c)
            else:
                runs.append((r, c, c))

        async def read_all() -> list[Any]:
            sem = asyncio.Semaphore(MAX_CONCURRENT_REQUESTS)
            aarr = self.arr.async_array

            async def one(r: int, ca: int, cb: int) -> Any:
                sel = (
                    slice(min(bands), max(bands) + 1),
                    slice(r * cy, min((r + 1) * cy, ny)),
                    slice(ca * cx, min((cb + 1) * cx, nx)),
                )
                async with sem:
                    return await aarr.getitem(sel)

            return await asyncio.gather(*(one(*run) for run in runs))

        out: dict[tuple[int, int], list[Any]] = {}
        first = min(bands)
        for (r, ca, cb), block in zip(runs, sync(read_all()), strict=True):
            block = np.asarray(block)[[b - first for b in bands]]
            for c in range(ca, cb + 1):
                piece = block[:, :, (c - ca) * cx : (c - ca + 1) * cx]
                out[(r, c)] = list(piece)
        return out


async def _store_get_many(store: Store, requests: list[tuple[str, Any]]) -> list[Any]:
    sem = asyncio.Semaphore(MAX_CONCURRENT_REQUESTS)
    proto = default_buffer_prototype()

    async def get(key: str, byte_range: Any) -> np.ndarray | None:
        async with sem:
            buf = await store.get(key, prototype=proto, byte_range=byte_range)
        return None if buf is None else buf.as_numpy_array()

    return await asyncio.gather(*(get(key, rng) for key, rng in requests))


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _local_get_many(root: Path, requests: list[tuple[str, Any]]) -> list[np.ndarray | None]:
    """Read byte ranges of local files with ``os.pread``, one task per file."""
    by_file: dict[str, list[int]] = {}
    for i, (key, _) in enumerate(requests):
        by_file.setdefault(key, []).append(i)
    out: list[np.ndarray | None] = [None] * len(requests)

    def read_file(key: str) -> None:
        try:
            fd = os.open(root / key, os.O_RDONLY)
        except FileNotFoundError:
            return  # never written: the caller fills
        try:
            for i in by_file[key]:
                rng = requests[i][1]
                if rng is None:
                    start, size = 0, os.fstat(fd).st_size
                elif isinstance(rng, SuffixByteRequest):
                    total = os.fstat(fd).st_size
                    start, size = max(total - rng.suffix, 0), min(rng.suffix, total)
                elif isinstance(rng, RangeByteRequest):
                    start, size = rng.start, rng.end - rng.start
                else:
                    raise TypeError(f"unsupported byte range {rng!r}")
                data = os.pread(fd, size, start)
                if len(data) != size:
                    raise OSError(f"short read of {root / key}: {len(data)} of {size} bytes")
                out[i] = np.frombuffer(data, dtype=np.uint8)
        finally:
            os.close(fd)

    if len(by_file) == 1:
        read_file(next(iter(by_file)))
    else:
        # Threads overlap I/O latency on cold or network file systems; pread releases the GIL.
        list(_pool().map(read_file, by_file))
    return out


def _pool() -> ThreadPoolExecutor:
    """The reader's thread pool (reads and decompression), created once per process."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="lenscan-read")
    return _POOL
