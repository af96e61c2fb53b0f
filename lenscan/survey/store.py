"""The lenscan survey store: a versioned Zarr v3 layout at any fsspec URL.

One store holds a survey: a root group whose attributes identify it as a lenscan survey, and a
``tiles/<tile_id>/`` group per tile with the multi-band image, optional weight and mask, the
tile's WCS and its source catalogue. The layout is specified in ``docs/survey-format.md``.

Local paths (``/path``, ``file://``) use :class:`zarr.storage.LocalStore`; every other URL
(``memory://``, ``s3://``, ``gs://``, ``az://`` ...) goes through
:meth:`zarr.storage.FsspecStore.from_url`, so remote stores share one code path.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import json
import math
import os
import re
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning
from zarr.abc.store import Store
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore

from lenscan.survey.remote import limit_retries, network_options, storage_errors, store_class

__all__ = [
    "CODECS",
    "PIXEL_ARRAYS",
    "SCHEMA_VERSION",
    "SURVEY_ATTR",
    "TILE_ATTR",
    "TILE_INDEX_COLUMNS",
    "TILE_INDEX_VERSION",
    "NotQuantisableError",
    "SurveyFormatError",
    "SurveyStore",
    "Tile",
    "TileWriter",
    "create_survey",
    "open_survey",
    "quantise_step_for",
    "required_catalog_columns",
    "validate_tile_id",
]

#: Version of the on-disk layout written by this lenscan; readers refuse newer stores.
SCHEMA_VERSION = 1

#: Root-group attribute that marks a lenscan survey.
SURVEY_ATTR = "lenscan_survey"
#: Tile-group attribute holding the tile metadata (and the ``complete`` flag).
TILE_ATTR = "lenscan_tile"

#: Root attribute (under ``lenscan_survey``) marking a store that keeps a tile index.
TILE_INDEX_VERSION = 1
#: Per-tile index entries (one small JSON object per complete tile) and their consolidation.
_INDEX_ENTRIES = "index/tiles"
_INDEX_CONSOLIDATED = "index/tiles.parquet"
#: Columns of :meth:`SurveyStore.tile_index`.
#: ``survey_tile`` is the tile in the survey's own words (HSC ``9813-4,4`` for tile ``9813-4.4``).
TILE_INDEX_COLUMNS = (
    "tile",
    "write_id",
    "n_sources",
    "ny",
    "nx",
    "pixel_scale_arcsec",
    "survey_tile",
)

#: Names of a tile's pixel arrays (each optional but the image).
PIXEL_ARRAYS = ("image", "weight", "mask", "zero_weight")

#: Image compression options for :meth:`SurveyStore.write_tile`.
CODECS = ("none", "zstd")

_SAFE_NAME = re.compile(r"^[A-Za-z0-9_+\-][A-Za-z0-9_.+\-]*$")
_BAND_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_MAX_NAME_LEN = 200
# Rows per chunk of a catalogue column: one chunk for any realistic tile catalogue.
_CATALOG_CHUNK_ROWS = 1 << 20


class NotQuantisableError(ValueError):
    """Pixels that a quantised image cannot hold (NaN, inf, or beyond int32 steps)."""


class SurveyFormatError(ValueError):
    """The URL does not hold a lenscan survey this version of lenscan can read."""


def required_catalog_columns(bands: Sequence[str]) -> dict[str, np.dtype]:
    """Return the required catalogue columns of a survey with ``bands`` and their dtypes.

    Parameters
    ----------
    bands : sequence of str
        The survey's band names.

    Returns
    -------
    dict
        Column name to stored numpy dtype, in the documented order.
    """
    cols: dict[str, np.dtype] = {
        "id": np.dtype(np.int64),
        "ra": np.dtype(np.float64),
        "dec": np.dtype(np.float64),
        "x": np.dtype(np.float64),
        "y": np.dtype(np.float64),
    }
    for band in bands:
        cols[f"mag_{band}"] = np.dtype(np.float32)
        cols[f"magerr_{band}"] = np.dtype(np.float32)
    cols["flags"] = np.dtype(np.int32)
    cols["extended_class"] = np.dtype(np.int16)
    return cols


# --------------------------------------------------------------------------------------------
# Opening stores
# --------------------------------------------------------------------------------------------


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _local_path(url: str) -> Path:
    if url.startswith("file://"):
        url = url[len("file://") :]
    return Path(url).expanduser()


def _make_store(url: str, storage_options: Mapping[str, Any] | None, *, read_only: bool) -> Store:
    """Build the zarr store for ``url`` (LocalStore for local paths, FsspecStore otherwise)."""
    if _is_local(url):
        # storage_options only configure remote filesystems; a local path ignores them so the
        # same call works for local tests and cloud runs.
        return LocalStore(_local_path(url), read_only=read_only)
    # Timeouts and a bounded retry: an endpoint that never answers fails in seconds.
    with storage_errors(url):
        store = store_class(url).from_url(
            url, storage_options=network_options(url, storage_options), read_only=read_only
        )
    limit_retries(store.fs)
    return store


async def _get_json(store: Store, key: str) -> dict[str, Any] | None:
    buf = await store.get(key, prototype=default_buffer_prototype())
    if buf is None:
        return None
    return json.loads(buf.to_bytes())


def _normalise_url(url: str | os.PathLike[str]) -> str:
    if isinstance(url, os.PathLike):
        return os.fspath(url)
    if not isinstance(url, str) or not url:
        raise TypeError(f"survey url must be a non-empty str or path, got {url!r}")
    return url.rstrip("/") if len(url) > 1 else url


def _check_survey_meta(url: str, root_meta: dict[str, Any] | None, store: Store) -> dict:
    """Validate the root ``zarr.json`` of ``url`` and return its lenscan_survey attrs."""
    if root_meta is None:
        hint = ""
        if sync(store.exists(".zgroup")):
            hint = " (it is a Zarr v2 group; lenscan surveys are Zarr v3)"
        raise SurveyFormatError(
            f"{url} is not a lenscan survey: no Zarr v3 group found there{hint}. "
            "Create one with lenscan.survey.create_survey or check the URL."
        )
    if root_meta.get("zarr_format") != 3 or root_meta.get("node_type") != "group":
        raise SurveyFormatError(
            f"{url} is not a lenscan survey: its root is a Zarr "
            f"{root_meta.get('node_type', 'node')} (zarr_format={root_meta.get('zarr_format')}), "
            "not a Zarr v3 group"
        )
    meta = (root_meta.get("attributes") or {}).get(SURVEY_ATTR)
    if not isinstance(meta, dict):
        raise SurveyFormatError(
            f"{url} is a Zarr group but not a lenscan survey: its attributes have no "
            f"{SURVEY_ATTR!r} entry"
        )
    version = meta.get("schema_version")
    if not isinstance(version, int) or version < 1:
        raise SurveyFormatError(f"{url}: invalid lenscan schema_version {version!r}")
    if version > SCHEMA_VERSION:
        from lenscan._version import __version__

        raise SurveyFormatError(
            f"{url} uses lenscan survey schema_version {version}, but this lenscan "
            f"({__version__}) supports schema_version {SCHEMA_VERSION} at most; "
            "upgrade lenscan to read it"
        )
    for key in ("name", "bands"):
        if key not in meta:
            raise SurveyFormatError(f"{url}: lenscan_survey attributes lack {key!r}")
    return meta


def open_survey(
    url: str | os.PathLike[str],
    storage_options: Mapping[str, Any] | None = None,
    *,
    mode: Literal["r", "a"] = "r",
) -> SurveyStore:
    """Open an existing lenscan survey store.

    Parameters
    ----------
    url : str or path
        A local path or any fsspec URL (``file://``, ``memory://``, ``s3://``, ``gs://`` ...).
    storage_options : mapping, optional
        Options for the fsspec filesystem (credentials, ``client_kwargs`` ...); ignored for
        local paths.
    mode : {"r", "a"}
        ``"r"`` (default) opens read-only; ``"a"`` opens for appending or replacing tiles, e.g.
        to resume an interrupted ingest.

    Returns
    -------
    SurveyStore

    Raises
    ------
    SurveyFormatError
        If nothing, or something other than a lenscan survey, is at ``url``, or the store was
        written with a newer schema version than this lenscan supports.
    """
    if mode not in ("r", "a"):
        raise ValueError(f"open_survey mode must be 'r' or 'a', got {mode!r}")
    url = _normalise_url(url)
    if _is_local(url) and not _local_path(url).exists():
        raise SurveyFormatError(f"{url} is not a lenscan survey: no such file or directory")
    store = _make_store(url, storage_options, read_only=(mode == "r"))
    with storage_errors(url):
        root_meta = sync(_get_json(store, "zarr.json"))
    meta = _check_survey_meta(url, root_meta, store)
    return SurveyStore(url, store, meta, storage_options=storage_options, mode=mode)


def create_survey(
    url: str | os.PathLike[str],
    *,
    name: str,
    bands: Sequence[str],
    storage_options: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    survey: str | None = None,
    info: Mapping[str, Any] | None = None,
) -> SurveyStore:
    """Create an empty, writable lenscan survey store.

    Parameters
    ----------
    url : str or path
        Local path or fsspec URL of the new store.
    name : str
        Survey name (e.g. ``"des-dr2"``), recorded in the root attributes.
    bands : sequence of str
        Lower-case band names in image-plane order, e.g. ``("g", "r", "i")``.
    storage_options : mapping, optional
        fsspec filesystem options; ignored for local paths.
    overwrite : bool
        Replace an existing lenscan survey at ``url``. Anything at ``url`` that is not a
        lenscan survey is never deleted.
    survey : str, optional
        The survey the data come from (``"des"``, ``"lsst"``, ``"hsc"``); the scan picks its
        default model and colour cut by it.
    info : mapping, optional
        JSON-able facts recorded beside it (ingest writes ``ingest_preset`` and
        ``scan_defaults``); keys of the layout itself cannot be overridden.

    Returns
    -------
    SurveyStore
        Open in mode ``"a"``.

    Raises
    ------
    FileExistsError
        If a survey exists at ``url`` and ``overwrite`` is False, or ``url`` holds other data.
    """
    url = _normalise_url(url)
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"create_survey({url!r}): name must be a non-empty string, got {name!r}")
    bands = _validate_bands(bands, url)
    meta = _new_survey_meta(url, name, bands, survey, info)
    store = _make_store(url, storage_options, read_only=False)
    if _is_local(url) and _local_path(url).is_file():
        raise FileExistsError(f"cannot create a survey at {url}: it is an existing file")
    with storage_errors(url):
        existing = sync(_get_json(store, "zarr.json"))
    if existing is not None:
        is_survey = SURVEY_ATTR in (existing.get("attributes") or {})
        if not is_survey:
            raise FileExistsError(
                f"cannot create a survey at {url}: it holds Zarr data that is not a lenscan "
                "survey; choose another URL"
            )
        if not overwrite:
            raise FileExistsError(
                f"a lenscan survey already exists at {url}; pass overwrite=True to replace it, "
                "or open_survey(url, mode='a') to add tiles to it"
            )
        sync(store.clear())
    elif not sync(store.is_empty("")):
        raise FileExistsError(
            f"cannot create a survey at {url}: the location is not empty and is not a lenscan "
            "survey; choose an empty or new URL"
        )
    root = zarr.create_group(store, zarr_format=3, attributes={SURVEY_ATTR: meta})
    root.create_group("tiles")
    return SurveyStore(url, store, meta, storage_options=storage_options, mode="a")


def _new_survey_meta(
    url: str,
    name: str,
    bands: tuple[str, ...],
    survey: str | None,
    info: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The ``lenscan_survey`` root attributes of a new store."""
    from lenscan._version import __version__

    meta: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "bands": list(bands),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "lenscan_version": __version__,
        # Identity of this store: a survey rewritten at the same URL is another survey.
        "uuid": uuid.uuid4().hex,
        "tile_index": TILE_INDEX_VERSION,
    }
    if survey is not None:
        meta["survey"] = str(survey)
    clash = sorted(set(info or {}) & {*meta, "survey"})
    if clash:
        raise ValueError(f"create_survey({url!r}): info may not set {clash}")
    meta.update(_check_json(info or {}, "info", f"create_survey({url!r})"))
    return meta


def _validate_bands(bands: Sequence[str], url: str) -> tuple[str, ...]:
    if isinstance(bands, str) or not isinstance(bands, Sequence) or len(bands) == 0:
        raise ValueError(
            f"create_survey({url!r}): bands must be a non-empty sequence of band names such as "
            f"('g', 'r', 'i'), got {bands!r}"
        )
    for band in bands:
        if not isinstance(band, str) or not _BAND_NAME.match(band):
            raise ValueError(
                f"create_survey({url!r}): band {band!r} is not a lower-case name ([a-z][a-z0-9_]*)"
            )
    if len(set(bands)) != len(bands):
        raise ValueError(f"create_survey({url!r}): bands must be unique, got {list(bands)}")
    return tuple(bands)


def _reopen(url: str, storage_options: Mapping[str, Any] | None, mode: str) -> SurveyStore:
    return open_survey(url, storage_options, mode=mode)  # type: ignore[arg-type]


def _reopen_tile(url: str, storage_options: Mapping[str, Any] | None, tile_id: str) -> Tile:
    return open_survey(url, storage_options).tile(tile_id)


# --------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------


def validate_tile_id(tile_id: str) -> str:
    """Return ``tile_id`` if it is a safe tile identifier, else raise ValueError.

    Tile ids become path components in every backend, so they are limited to ``[A-Za-z0-9_.+-]``,
    must not start with ``.`` and are at most 200 characters long.
    """
    if not isinstance(tile_id, str) or not _SAFE_NAME.match(tile_id) or len(tile_id) > 200:
        raise ValueError(
            f"invalid tile id {tile_id!r}: use 1-{_MAX_NAME_LEN} characters from "
            "[A-Za-z0-9_.+-], not starting with '.'"
        )
    return tile_id


class SurveyStore:
    """A lenscan survey opened from a URL (see :func:`open_survey`, :func:`create_survey`).

    Attributes
    ----------
    url : str
        The URL the store was opened from.
    mode : str
        ``"r"`` (read-only) or ``"a"`` (tiles can be written).
    """

    def __init__(
        self,
        url: str,
        store: Store,
        meta: Mapping[str, Any],
        *,
        storage_options: Mapping[str, Any] | None,
        mode: str,
    ) -> None:
        self.url = url
        self.mode = mode
        self._store = store
        self._meta = dict(meta)
        self._storage_options = dict(storage_options) if storage_options else None
        self._root = zarr.open_group(store, mode="r" if mode == "r" else "r+", zarr_format=3)

    def __reduce__(self) -> tuple[Any, ...]:
        # Reopen by URL on unpickling (e.g. on a Dask worker) instead of shipping store handles.
        return (_reopen, (self.url, self._storage_options, self.mode))

    def __repr__(self) -> str:
        return (
            f"<SurveyStore {self.name!r} at {self.url!r}, bands={self.bands}, mode={self.mode!r}>"
        )

    @property
    def bands(self) -> tuple[str, ...]:
        """Band names in image-plane order."""
        return tuple(self._meta["bands"])

    @property
    def name(self) -> str:
        """Survey name."""
        return str(self._meta["name"])

    @property
    def survey(self) -> str | None:
        """The survey the data come from (``"lsst"``, ``"hsc"``, ...), None if not recorded."""
        value = self._meta.get("survey")
        return str(value) if value else None

    @property
    def info(self) -> dict[str, Any]:
        """The ``lenscan_survey`` root attributes (a copy): name, bands, survey, ingest facts."""
        return dict(self._meta)

    @property
    def schema_version(self) -> int:
        """Layout version the store was written with."""
        return int(self._meta["schema_version"])

    @property
    def attrs(self) -> dict[str, Any]:
        """The root group's attributes (a copy)."""
        return dict(self._root.attrs)

    @property
    def zarr_store(self) -> Store:
        """The underlying zarr store (for engines that read chunks directly)."""
        return self._store

    @property
    def uuid(self) -> str | None:
        """Identity of the store, written at creation (None for stores written by lenscan 0.1)."""
        value = self._meta.get("uuid")
        return str(value) if value else None

    @property
    def tile_ids(self) -> list[str]:
        """Ids of the complete tiles, sorted. Tiles whose write did not finish are left out."""
        return sorted(self.tile_index())

    def tile_index(self) -> dict[str, dict[str, Any]]:
        """Map tile id -> index entry (``write_id``, ``n_sources``, ``ny``, ``nx``, ...).

        Read from the consolidated index (one object) when it is current, else from the
        per-tile entries (one fresh listing plus one small read per tile); stores written by
        lenscan 0.1 have neither and are read tile group by tile group. Only complete tiles
        are listed. ``write_id`` changes whenever a tile is written again.
        """
        table = self.tile_index_table(consolidated_only=True)
        if table is not None:
            return {row["tile"]: row for row in table.to_pylist()}
        if not self._meta.get("tile_index"):
            return self._legacy_tile_index()
        return sync(_read_index_entries(self._store))

    def tile_index_table(
        self, *, consolidated_only: bool = False, columns: Sequence[str] | None = None
    ) -> pa.Table | None:
        """The tile index as one Arrow table (columns :data:`TILE_INDEX_COLUMNS`, one row a tile).

        Columnar: what a sweep's planning reads for 10^5-10^6 tiles without one Python dict
        per tile. ``consolidated_only``: None where the store has no current consolidated
        index, instead of building the table from the per-tile entries. ``columns``: only
        those the index has of these (an index consolidated before ``survey_tile`` existed
        lacks it).
        """
        if self._meta.get("tile_index"):
            raw = sync(self._store.get(_INDEX_CONSOLIDATED, prototype=default_buffer_prototype()))
            if raw is not None:  # the bytes as read, not a copy: 10^6 tiles are ~40 MB
                index = pq.ParquetFile(pa.BufferReader(pa.py_buffer(raw.as_numpy_array())))
                have = index.schema_arrow.names
                return index.read(
                    columns=None if columns is None else [c for c in columns if c in have]
                )
        if consolidated_only:
            return None
        rows = sorted(self.tile_index().values(), key=lambda r: r["tile"])
        for r in rows:  # entries written before survey_tile existed
            r.setdefault("survey_tile", r["tile"])
        wanted = (
            TILE_INDEX_COLUMNS
            if columns is None
            else [c for c in TILE_INDEX_COLUMNS if c in columns]
        )
        return pa.table({c: [r[c] for r in rows] for c in wanted})

    def _legacy_tile_index(self) -> dict[str, dict[str, Any]]:
        tiles = self._tiles_group()
        if tiles is None:
            return {}
        index = {}
        for name, group in tiles.groups():
            meta = group.attrs.get(TILE_ATTR) or {}
            if isinstance(meta, Mapping) and meta.get("complete") is True:
                index[name] = _index_entry(name, meta)
        return index

    def consolidate_index(self) -> int:
        """Write the tile index as one object, so that planning a sweep is one read.

        Writers call this after their last tile (``make_survey``, ``ingest``); writing or
        deleting a tile afterwards drops the consolidated index, and readers fall back to the
        per-tile entries until it is consolidated again. On a store written by lenscan 0.1
        this also adds the per-tile entries (an upgrade in place). Returns the tile count.
        """
        self._require_writable("consolidate its tile index")
        index = self._legacy_tile_index() if not self._meta.get("tile_index") else None
        if index is not None:
            sync(_write_index_entries(self._store, index.values()))
            self._meta["tile_index"] = TILE_INDEX_VERSION
            self._root.attrs.update({SURVEY_ATTR: self._meta})
        else:
            sync(self._store.delete(_INDEX_CONSOLIDATED))
            index = sync(_read_index_entries(self._store))
        rows = [index[t] for t in sorted(index)]
        for r in rows:  # entries written before survey_tile existed
            r.setdefault("survey_tile", r["tile"])
        table = pa.table({c: [r[c] for r in rows] for c in TILE_INDEX_COLUMNS})
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        buf = default_buffer_prototype().buffer.from_bytes(sink.getvalue().to_pybytes())
        sync(self._store.set(_INDEX_CONSOLIDATED, buf))
        return len(rows)

    def _require_writable(self, action: str) -> None:
        if self.mode == "r":
            raise PermissionError(
                f"survey {self.url} is open read-only; use open_survey(url, mode='a') to {action}"
            )

    def _tiles_group(self) -> zarr.Group | None:
        try:
            node = self._root["tiles"]
        except KeyError:
            return None
        return node if isinstance(node, zarr.Group) else None

    def _tile_meta(self, tile_id: str) -> dict[str, Any] | None:
        meta = sync(_get_json(self._store, f"tiles/{tile_id}/zarr.json"))
        if meta is None:
            return None
        return (meta.get("attributes") or {}).get(TILE_ATTR)

    def has_tile(self, tile_id: str) -> bool:
        """True if tile ``tile_id`` exists and its write completed."""
        meta = self._tile_meta(validate_tile_id(tile_id))
        return bool(meta and meta.get("complete") is True)

    def tile(self, tile_id: str) -> Tile:
        """Return the complete tile ``tile_id``.

        Raises
        ------
        KeyError
            If the tile does not exist or its write never completed.
        """
        meta = self._tile_meta(validate_tile_id(tile_id))
        if not meta or meta.get("complete") is not True:
            state = "its write did not complete" if meta else "it does not exist"
            raise KeyError(f"no tile {tile_id!r} in survey {self.url}: {state}")
        group = zarr.open_group(self._store, path=f"tiles/{tile_id}", mode="r", zarr_format=3)
        return Tile(self, tile_id, group, meta)

    def __iter__(self):
        for tile_id in self.tile_ids:
            yield self.tile(tile_id)

    def __len__(self) -> int:
        return len(self.tile_ids)

    def __contains__(self, tile_id: object) -> bool:
        return (
            isinstance(tile_id, str) and bool(_SAFE_NAME.match(tile_id)) and self.has_tile(tile_id)
        )

    # ---------------------------------------------------------------------------------- writes

    def write_tile(  # long-function: numpydoc of 15 parameters; the body is 30 lines
        self,
        tile_id: str,
        *,
        image: np.ndarray,
        wcs_header: fits.Header | WCS | str,
        catalog: Mapping[str, Any],
        pixel_scale_arcsec: float,
        zero_point: float,
        weight: np.ndarray | None = None,
        mask: np.ndarray | None = None,
        chunk_pix: int = 128,
        shard_pix: int | None = 2048,
        codec: Literal["none", "zstd"] = "none",
        aux_codec: Literal["none", "zstd"] = "zstd",
        quantise: float | None = None,
        extra_attrs: Mapping[str, Any] | None = None,
    ) -> Tile:
        """Write (or replace) one tile.

        Any existing tile ``tile_id``, complete or not, is deleted first. The tile's
        ``complete`` flag is written last, so a write that is interrupted leaves a tile that
        :attr:`tile_ids` and :meth:`has_tile` ignore; writing it again replaces it. To write a
        tile that does not fit in memory, use :meth:`begin_tile` (row blocks).

        Parameters
        ----------
        tile_id : str
            Tile identifier, characters ``[A-Za-z0-9_.+-]``.
        image : ndarray, shape (band, y, x)
            Floating-point pixels in counts, one plane per survey band in the survey's order.
        wcs_header : astropy.io.fits.Header, astropy.wcs.WCS or str
            The tile's celestial WCS. A header (or its text) is stored verbatim, so distortion
            keywords (TPV, SIP) survive; a WCS object is stored as ``to_header(relax=True)``.
        catalog : mapping of str to 1-D array, or astropy Table
            Source catalogue with the required columns (:func:`required_catalog_columns`);
            extra numeric or boolean columns are kept.
        pixel_scale_arcsec : float
            Pixel scale in arcsec per pixel (> 0).
        zero_point : float
            Photometric zero point: ``mag = zero_point - 2.5 log10(counts)``.
        weight : ndarray, optional
            Inverse variance (>= 0), same shape as ``image``.
        mask : ndarray, optional
            Integer or boolean mask bits, same shape as ``image``; stored as uint8 (bool,
            uint8) or int32.
        chunk_pix : int
            Side of the inner chunks, each one band by ``chunk_pix`` squared.
        shard_pix : int or None
            Side of the Zarr v3 shards (a multiple of ``chunk_pix``, clipped to the image),
            or None for unsharded chunks.
        codec : {"none", "zstd"}
            Compression of the image. Float sky noise hardly compresses, so none is the default.
        aux_codec : {"none", "zstd"}
            Compression of the weight and mask planes. They are smooth or constant and compress
            many times over (``benchmarks/bench_storage.py``), so zstd is the default.
        quantise : float, optional
            Store the image lossily, like fpack: pixels rounded to a step of at most
            ``sigma / quantise`` (sigma: the robust noise of the least noisy band, the step a
            power of two), so no pixel moves by more than ``sigma / (2 quantise)``. Stored as
            int32 steps (Zarr's ``numcodecs.fixedscaleoffset``) compressed with bit-shuffled
            Blosc-zstd; reads return float32 as usual. Needs finite pixels. Default: lossless.
        extra_attrs : mapping, optional
            JSON-serialisable extra tile metadata (stored under ``extra``).

        Returns
        -------
        Tile
            The written tile.
        """
        ctx = f"write_tile({tile_id!r}) in {self.url}"
        image, weight, mask = _check_planes(image, weight, mask, len(self.bands), self.bands, ctx)
        step = None if quantise is None else 1.0 / _quantise_scale(image, quantise, ctx)
        writer = self.begin_tile(
            tile_id,
            shape_yx=image.shape[1:],
            wcs_header=wcs_header,
            catalog=catalog,
            pixel_scale_arcsec=pixel_scale_arcsec,
            zero_point=zero_point,
            weight=weight is not None,
            mask_dtype=None if mask is None else mask.dtype,
            chunk_pix=chunk_pix,
            shard_pix=shard_pix,
            codec=codec,
            aux_codec=aux_codec,
            quantise_step=step,
            extra_attrs=extra_attrs,
        )
        # One band at a time keeps the write's temporary buffers to one plane.
        for b in range(len(self.bands)):
            writer.write_rows(
                0,
                band=b,
                image=image[b],
                weight=None if weight is None else weight[b],
                mask=None if mask is None else mask[b],
            )
        return writer.commit()

    def begin_tile(
        self,
        tile_id: str,
        *,
        shape_yx: tuple[int, int],
        wcs_header: fits.Header | WCS | str,
        catalog: Mapping[str, Any],
        pixel_scale_arcsec: float,
        zero_point: float,
        weight: bool = False,
        mask_dtype: Any = None,
        chunk_pix: int = 128,
        shard_pix: int | None = 2048,
        codec: Literal["none", "zstd"] = "none",
        aux_codec: Literal["none", "zstd"] = "zstd",
        quantise_step: float | None = None,
        extra_attrs: Mapping[str, Any] | None = None,
    ) -> TileWriter:
        """Start writing a tile in row blocks (a streaming :meth:`write_tile`).

        Creates the tile's (still incomplete, so invisible) group, its empty pixel arrays and
        its catalogue. Fill the planes with :meth:`TileWriter.write_rows`, then call
        :meth:`TileWriter.commit`, which writes the ``complete`` flag. Blocks whose rows start
        and end on shard boundaries write whole shards (no read-modify-write).

        Parameters
        ----------
        tile_id, wcs_header, catalog, pixel_scale_arcsec, zero_point, chunk_pix, shard_pix, \
codec, aux_codec, extra_attrs
            As in :meth:`write_tile`.
        shape_yx : tuple of int
            Image size ``(ny, nx)``.
        weight : bool
            Whether the tile has a weight plane (float32).
        mask_dtype : numpy dtype, optional
            Dtype of the mask plane (bool / uint8 are stored as uint8, other integers as
            int32); None for no mask.
        quantise_step : float, optional
            Store the image as integer multiples of this step (a power of two, > 0); see
            ``quantise`` in :meth:`write_tile`, which picks the step from the pixels.

        Returns
        -------
        TileWriter
        """
        self._require_writable("write tiles")
        validate_tile_id(tile_id)
        ctx = f"write_tile({tile_id!r}) in {self.url}"
        spec = _PixelSpec.check(
            shape_yx, chunk_pix, shard_pix, codec, aux_codec, quantise_step, mask_dtype, ctx
        )
        meta = self._tile_meta_for(
            tile_id,
            spec,
            wcs_header=wcs_header,
            catalog=catalog,
            pixel_scale_arcsec=pixel_scale_arcsec,
            zero_point=zero_point,
            weight=weight,
            extra_attrs=extra_attrs,
            ctx=ctx,
        )
        columns = meta.pop("_columns")
        self._forget_tile(tile_id)
        group = zarr.create_group(
            self._store,
            path=f"tiles/{tile_id}",
            zarr_format=3,
            attributes={TILE_ATTR: meta},
            overwrite=True,
        )
        arrays = _create_pixel_arrays(group, spec, len(self.bands), weight=weight)
        band = group.create_array("band", shape=(len(self.bands),), dtype=str,
                                  dimension_names=("band",))  # fmt: skip
        band[:] = np.array(self.bands, dtype=object)  # the "band" coordinate (xarray reads it)
        # Columns are independent objects: create and fill them concurrently, one round trip
        # of latency on object stores instead of two per column.
        sync(_write_columns(group.create_group("catalog")._async_group, columns))
        return TileWriter(self, tile_id, group, meta, arrays, spec, ctx)

    def _tile_meta_for(
        self,
        tile_id: str,
        spec: _PixelSpec,
        *,
        wcs_header: fits.Header | WCS | str,
        catalog: Mapping[str, Any],
        pixel_scale_arcsec: float,
        zero_point: float,
        weight: bool,
        extra_attrs: Mapping[str, Any] | None,
        ctx: str,
    ) -> dict[str, Any]:
        """Validate a tile's metadata and build its ``lenscan_tile`` attributes (incomplete).

        The validated catalogue columns come back under the ``_columns`` key.
        """
        columns = _check_catalog(catalog, self.bands, ctx)
        ny, nx = spec.shape_yx
        return {
            # Changes with every write: a scan's resume ledger compares it to what it scored.
            "write_id": uuid.uuid4().hex,
            "bands": list(self.bands),
            "shape": [ny, nx],
            "pixel_scale_arcsec": _finite(
                pixel_scale_arcsec, "pixel_scale_arcsec", ctx, positive=True
            ),
            "zero_point": _finite(zero_point, "zero_point", ctx),
            "wcs_header": _wcs_header_text(wcs_header, ctx, shape_yx=(ny, nx)),
            "chunk_pix": spec.chunk_pix,
            "shard_pix": list(spec.shard_yx) if spec.shard_yx else None,
            "codec": "blosc-zstd" if spec.quantise_step is not None else spec.codec,
            "quantise_step": spec.quantise_step,
            "arrays": ["image"]
            + (["weight"] if weight else [])
            + (["mask"] if spec.mask_dtype is not None else [])
            + (["zero_weight"] if weight and spec.mask_dtype is None else []),
            "catalog_columns": list(columns),
            "n_sources": len(next(iter(columns.values()))),
            "extra": _check_json(extra_attrs or {}, "extra_attrs", ctx),
            "written": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "complete": False,
            "_columns": columns,
        }

    def delete_tile(self, tile_id: str) -> None:
        """Delete tile ``tile_id`` (complete or not); a missing tile is not an error."""
        self._require_writable("delete tiles")
        self._forget_tile(validate_tile_id(tile_id))

    def _forget_tile(self, tile_id: str) -> None:
        """Remove a tile, its index entry and the (now stale) consolidated index."""
        sync(self._store.delete(f"{_INDEX_ENTRIES}/{tile_id}.json"))
        sync(self._store.delete(_INDEX_CONSOLIDATED))
        sync(self._store.delete_dir(f"tiles/{tile_id}"))


# --------------------------------------------------------------------------------------------
# Writing pixels
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _PixelSpec:
    """The checked pixel layout of a tile being written."""

    shape_yx: tuple[int, int]
    chunk_pix: int
    shard_yx: tuple[int, int] | None
    codec: str
    aux_codec: str
    quantise_step: float | None
    mask_dtype: np.dtype | None

    @classmethod
    def check(
        cls,
        shape_yx: Sequence[int],
        chunk_pix: int,
        shard_pix: int | None,
        codec: str,
        aux_codec: str,
        quantise_step: float | None,
        mask_dtype: Any,
        ctx: str,
    ) -> _PixelSpec:
        """Validate the layout options of :meth:`SurveyStore.begin_tile`."""
        ny, nx = (int(v) for v in shape_yx)
        if ny < 1 or nx < 1:
            raise ValueError(f"{ctx}: image has an empty axis, shape (y, x) = ({ny}, {nx})")
        chunk_pix, shard_yx = _check_chunking(chunk_pix, shard_pix, (ny, nx), ctx)
        for name, value in (("codec", codec), ("aux_codec", aux_codec)):
            if value not in CODECS:
                raise ValueError(f"{ctx}: {name} must be one of {CODECS}, got {value!r}")
        if quantise_step is not None:
            step = _finite(quantise_step, "quantise_step", ctx, positive=True)
            if math.frexp(step)[0] != 0.5:
                raise ValueError(f"{ctx}: quantise_step must be a power of two, got {step!r}")
        if mask_dtype is not None:
            kind = np.dtype(mask_dtype)
            if kind.kind not in "biu":
                raise TypeError(f"{ctx}: mask must be integer or boolean, got dtype {kind}")
            mask_dtype = np.dtype(np.uint8 if kind.kind == "b" or kind == np.uint8 else np.int32)
        return cls((ny, nx), chunk_pix, shard_yx, codec, aux_codec, quantise_step, mask_dtype)


#: CF-style ``units`` and ``long_name`` attributes of the arrays (xarray shows them as each
#: variable's ``attrs``); units as in the candidate tables (deg, pix, mag; UDUNITS reads them).
_ARRAY_ATTRS: dict[str, dict[str, str]] = {
    "image": {"units": "count", "long_name": "flux; mag = zero_point - 2.5 log10(count)"},
    "weight": {"units": "count-2", "long_name": "inverse variance of the image"},
    "mask": {"long_name": "mask bits, 0 = good"},
    "zero_weight": {"long_name": "1 where the weight is 0"},
    "id": {"long_name": "source id, unique within the survey"},
    "ra": {"units": "deg", "long_name": "right ascension (ICRS)"},
    "dec": {"units": "deg", "long_name": "declination (ICRS)"},
    "x": {"units": "pix", "long_name": "0-based pixel column in this tile"},
    "y": {"units": "pix", "long_name": "0-based pixel row in this tile"},
    "flags": {"long_name": "catalogue extraction flags, 0 = clean"},
    "extended_class": {"long_name": "star/galaxy class (DES EXTENDED_CLASS: 0 star ... 3 galaxy)"},
}


def _array_attrs(name: str) -> dict[str, Any]:
    """The ``units`` / ``long_name`` attributes of a pixel plane or catalogue column."""
    for prefix, kind in (("mag_", "AB magnitude"), ("magerr_", "magnitude error")):
        if name.startswith(prefix):
            return {"units": "mag", "long_name": f"{kind} in band {name[len(prefix) :]}"}
    return dict(_ARRAY_ATTRS.get(name, {}))


def _create_pixel_arrays(
    group: zarr.Group, spec: _PixelSpec, nb: int, *, weight: bool
) -> dict[str, zarr.Array]:
    """Create the tile's empty image (and weight, mask) arrays with the spec's codecs."""
    planes: list[tuple[str, np.dtype]] = [("image", np.dtype(np.float32))]
    if weight:
        planes.append(("weight", np.dtype(np.float32)))
    if spec.mask_dtype is not None:
        planes.append(("mask", spec.mask_dtype))
    elif weight:
        # Where the weight is 0, as uint8: what the scan needs of a weight plane, at a quarter
        # of its bytes before compression and almost none after (chunks of 0 are not stored).
        planes.append(("zero_weight", np.dtype(np.uint8)))
    quantised = spec.quantise_step is not None
    arrays = {}
    with _numcodecs_quiet():  # the quantised image uses a numcodecs codec
        for name, dtype in planes:
            image_q = name == "image" and quantised
            if image_q:
                compressors: Any = _QUANTISED_COMPRESSOR
            else:
                chosen = spec.codec if name == "image" else spec.aux_codec
                if name == "zero_weight":
                    chosen = "zstd"
                compressors = ZstdCodec(level=3) if chosen == "zstd" else None
            arrays[name] = group.create_array(
                name,
                shape=(nb, *spec.shape_yx),
                dtype=dtype,
                chunks=(1, spec.chunk_pix, spec.chunk_pix),
                shards=(1, *spec.shard_yx) if spec.shard_yx else None,
                filters=_quantiser(1.0 / spec.quantise_step) if image_q else None,  # type: ignore[operator]
                compressors=compressors,
                # A quantised image has finite pixels only; 0 pads its edge chunks.
                fill_value=np.nan if dtype.kind == "f" and not image_q else 0,
                dimension_names=("band", "y", "x"),
                attributes=_array_attrs(name),
            )
    return arrays


class TileWriter:
    """Fills the pixel planes of a tile started with :meth:`SurveyStore.begin_tile`.

    Write every band's rows with :meth:`write_rows`, then :meth:`commit`. Until the commit the
    tile is incomplete: readers ignore it, and writing it again replaces it.
    """

    def __init__(
        self,
        survey: SurveyStore,
        tile_id: str,
        group: zarr.Group,
        meta: dict[str, Any],
        arrays: dict[str, zarr.Array],
        spec: _PixelSpec,
        ctx: str,
    ) -> None:
        self.survey = survey
        self.tile_id = tile_id
        self._group = group
        self._meta = meta
        self._arrays = arrays
        self._spec = spec
        self._ctx = ctx

    def write_rows(
        self,
        y0: int,
        *,
        band: int,
        image: np.ndarray,
        weight: np.ndarray | None = None,
        mask: np.ndarray | None = None,
    ) -> None:
        """Write rows ``y0 : y0 + len(image)`` of one band's planes.

        Parameters
        ----------
        y0 : int
            First row. Blocks starting and ending on shard rows write whole shards.
        band : int
            Band index (the survey's order).
        image : ndarray, shape (rows, nx)
            Floating-point pixels; with a quantised image they must be finite and within
            ``2**31`` steps.
        weight, mask : ndarray, shape (rows, nx), optional
            The same rows of the weight and mask planes (required when the tile has them).
        """
        ny, nx = self._spec.shape_yx
        rows = np.shape(image)[0] if np.ndim(image) == 2 else -1
        if rows < 1 or np.shape(image)[1] != nx or not 0 <= y0 <= ny - rows:
            raise ValueError(
                f"{self._ctx}: rows {y0}:{y0 + max(rows, 0)} of shape {np.shape(image)} do not "
                f"fit the tile's (y, x) = ({ny}, {nx})"
            )
        if not 0 <= band < len(self.survey.bands):
            raise ValueError(f"{self._ctx}: band index {band} out of range")
        for name, data in (("image", image), ("weight", weight), ("mask", mask)):
            arr = self._arrays.get(name)
            if (data is None) != (arr is None):
                state = "has no" if arr is None else "needs a"
                raise ValueError(f"{self._ctx}: the tile {state} {name} plane")
            if arr is not None:
                block = self._checked(name, data, rows)
                arr[band, y0 : y0 + rows] = block
                if name == "weight" and "zero_weight" in self._arrays:
                    self._arrays["zero_weight"][band, y0 : y0 + rows] = (block == 0).view(np.uint8)

    def _checked(self, name: str, data: Any, rows: int) -> np.ndarray:
        """One block of a plane, checked and cast to the stored dtype."""
        ctx, nx = self._ctx, self._spec.shape_yx[1]
        kind = "float" if name != "mask" else "int"
        block = _check_pixels(np.asarray(data)[None], name, ctx, kind=kind, shape=(1, rows, nx))[0]
        if name == "weight" and np.any(block < 0):
            raise ValueError(f"{ctx}: weight (inverse variance) has negative values")
        if name == "mask":
            return block.astype(self._spec.mask_dtype, copy=False)
        step = self._spec.quantise_step
        if name == "image" and step is not None:
            _check_quantisable(block, 1.0 / step, ctx)
        return block

    def commit(self) -> Tile:
        """Mark the tile complete (the last write), index it and return it."""
        meta = {**self._meta, "complete": True}
        self._group.attrs.update({TILE_ATTR: meta})
        store = self.survey
        if store._meta.get("tile_index"):
            sync(_write_index_entries(store._store, [_index_entry(self.tile_id, meta)]))
        return store.tile(self.tile_id)


def _check_planes(
    image: Any, weight: Any, mask: Any, nb: int, bands: Sequence[str], ctx: str
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Validate whole-tile planes for :meth:`SurveyStore.write_tile`."""
    image = _check_pixels(image, "image", ctx, kind="float")
    if image.shape[0] != nb:
        raise ValueError(
            f"{ctx}: image has {image.shape[0]} planes but the survey has {nb} bands "
            f"{tuple(bands)}; pass one plane per band in that order (NaN for missing data)"
        )
    if image.shape[1] < 1 or image.shape[2] < 1:
        raise ValueError(f"{ctx}: image has an empty axis, shape {image.shape}")
    if weight is not None:
        weight = _check_pixels(weight, "weight", ctx, kind="float", shape=image.shape)
        if np.any(weight < 0):
            raise ValueError(f"{ctx}: weight (inverse variance) has negative values")
    if mask is not None:
        mask = _check_pixels(mask, "mask", ctx, kind="int", shape=image.shape)
    return image, weight, mask


def _index_entry(tile_id: str, meta: Mapping[str, Any]) -> dict[str, Any]:
    # Tiles written by lenscan 0.1 have no write id: their write time and size identify them.
    write_id = meta.get("write_id") or f"legacy-{meta.get('written')}-{meta.get('n_sources')}"
    ny, nx = meta["shape"]
    ingest = (meta.get("extra") or {}).get("ingest") or {}
    return {
        "survey_tile": str(ingest.get("survey_tile") or tile_id),
        "tile": tile_id,
        "write_id": str(write_id),
        "n_sources": int(meta["n_sources"]),
        "ny": int(ny),
        "nx": int(nx),
        "pixel_scale_arcsec": float(meta["pixel_scale_arcsec"]),
    }


async def _write_index_entries(store: Store, entries: Any) -> None:
    proto = default_buffer_prototype()

    async def put(entry: Mapping[str, Any]) -> None:
        data = json.dumps(dict(entry)).encode()
        await store.set(f"{_INDEX_ENTRIES}/{entry['tile']}.json", proto.buffer.from_bytes(data))

    await asyncio.gather(*(put(e) for e in entries))


async def _read_index_entries(store: Store) -> dict[str, dict[str, Any]]:
    """Read every per-tile index entry, listing the folder afresh (never from a cache)."""
    if isinstance(store, FsspecStore):
        store.fs.invalidate_cache(f"{store.path}/{_INDEX_ENTRIES}")
    names = [n async for n in store.list_dir(_INDEX_ENTRIES) if n.endswith(".json")]
    sem = asyncio.Semaphore(64)

    async def get(name: str) -> dict[str, Any] | None:
        async with sem:
            return await _get_json(store, f"{_INDEX_ENTRIES}/{name}")

    entries = await asyncio.gather(*(get(n) for n in names))
    return {e["tile"]: e for e in entries if e is not None}


async def _write_columns(group: Any, columns: Mapping[str, np.ndarray]) -> None:
    async def write(col: str, values: np.ndarray) -> None:
        arr = await group.create_array(
            col,
            shape=values.shape,
            dtype=values.dtype,
            chunks=(min(max(len(values), 1), _CATALOG_CHUNK_ROWS),),
            fill_value=0,
            dimension_names=("source",),
            attributes=_array_attrs(col),
        )
        if len(values):
            await arr.setitem(slice(None), values)

    await asyncio.gather(*(write(c, v) for c, v in columns.items()))


# --------------------------------------------------------------------------------------------
# Tiles
# --------------------------------------------------------------------------------------------


class Tile:
    """One tile of a survey: image planes, optional weight and mask, WCS and catalogue.

    Obtain tiles with :meth:`SurveyStore.tile`. Pixel arrays are zarr arrays ``(band, y, x)``
    read lazily; read many stamps with :func:`lenscan.survey.read_stamps`.
    """

    def __init__(
        self, survey: SurveyStore, tile_id: str, group: zarr.Group, meta: Mapping[str, Any]
    ) -> None:
        self.survey = survey
        self.id = tile_id
        self._group = group
        self._meta = dict(meta)
        self._arrays: dict[str, zarr.Array | None] = {}

    def __reduce__(self) -> tuple[Any, ...]:
        return (_reopen_tile, (self.survey.url, self.survey._storage_options, self.id))

    def __repr__(self) -> str:
        ny, nx = self.shape_yx
        return f"<Tile {self.id!r} {len(self.bands)}x{ny}x{nx} of {self.survey.url!r}>"

    @property
    def bands(self) -> tuple[str, ...]:
        """Band names of the image planes."""
        return tuple(self._meta["bands"])

    @property
    def shape_yx(self) -> tuple[int, int]:
        """Image size ``(ny, nx)`` in pixels."""
        ny, nx = self._meta["shape"]
        return int(ny), int(nx)

    @property
    def pixel_scale_arcsec(self) -> float:
        """Pixel scale in arcsec per pixel."""
        return float(self._meta["pixel_scale_arcsec"])

    @property
    def zero_point(self) -> float:
        """Photometric zero point (``mag = zero_point - 2.5 log10(counts)``)."""
        return float(self._meta["zero_point"])

    @property
    def attrs(self) -> dict[str, Any]:
        """All tile metadata (a copy), including ``extra``."""
        return dict(self._meta)

    @property
    def n_sources(self) -> int:
        """Number of catalogue rows."""
        return int(self._meta["n_sources"])

    @property
    def catalog_columns(self) -> list[str]:
        """Names of the catalogue columns."""
        return list(self._meta["catalog_columns"])

    @property
    def header(self) -> fits.Header:
        """The stored FITS header of the tile's WCS."""
        return fits.Header.fromstring(self._meta["wcs_header"], sep="\n")

    @property
    def wcs(self) -> WCS:
        """The tile's WCS as :class:`astropy.wcs.WCS` (distortion keywords included)."""
        return _header_wcs(self.header)

    def _array(self, name: str) -> zarr.Array | None:
        if name not in PIXEL_ARRAYS:
            raise ValueError(
                f"tile {self.id!r}: unknown array {name!r}; choose one of {PIXEL_ARRAYS}"
            )
        if name not in self._arrays:
            present = name in self._meta.get("arrays", ["image"])
            with _numcodecs_quiet():  # a quantised image names a numcodecs codec
                array = self._group[name] if present else None
            self._arrays[name] = array  # type: ignore[assignment]
        return self._arrays[name]

    @property
    def image(self) -> zarr.Array:
        """Pixels in counts, ``(band, y, x)`` float32."""
        arr = self._array("image")
        assert arr is not None  # every tile has an image
        return arr

    @property
    def weight(self) -> zarr.Array | None:
        """Inverse variance ``(band, y, x)`` float32, or None if the tile has none."""
        return self._array("weight")

    @property
    def mask(self) -> zarr.Array | None:
        """Mask bits ``(band, y, x)``, or None if the tile has none."""
        return self._array("mask")

    @property
    def zero_weight(self) -> zarr.Array | None:
        """uint8 ``(band, y, x)``, 1 where the weight is 0 (no data), or None.

        Written with a weight plane when the tile has no mask (since issue 10), so that a scan
        finds the pixels without data without reading the float weights.
        """
        return self._array("zero_weight")

    def read_region(
        self, y0: int, y1: int, x0: int, x1: int, *, array: str = "image"
    ) -> np.ndarray:
        """Read pixels ``[y0:y1, x0:x1]`` of all bands (only the chunks they touch).

        Parameters
        ----------
        y0, y1, x0, x1 : int
            Half-open pixel bounds, inside the tile.
        array : {"image", "weight", "mask", "zero_weight"}
            Which array to read.

        Returns
        -------
        ndarray, shape (band, y1 - y0, x1 - x0)
        """
        ny, nx = self.shape_yx
        bounds = [int(v) for v in (y0, y1, x0, x1)]
        y0, y1, x0, x1 = bounds
        if not (0 <= y0 < y1 <= ny and 0 <= x0 < x1 <= nx):
            raise ValueError(
                f"tile {self.id!r}: region y[{y0}:{y1}], x[{x0}:{x1}] is empty or outside the "
                f"tile of shape (y, x) = ({ny}, {nx})"
            )
        arr = self._array(array)
        if arr is None:
            raise ValueError(f"tile {self.id!r} of {self.survey.url} has no {array!r} array")
        return np.asarray(arr[:, y0:y1, x0:x1])

    def catalog(self, columns: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Read catalogue columns.

        Parameters
        ----------
        columns : sequence of str, optional
            Columns to read; all of them by default.

        Returns
        -------
        dict of str to ndarray
            One 1-D array per column, in the order asked for.

        Raises
        ------
        KeyError
            If a column does not exist (the message lists the available ones).
        """
        available = self.catalog_columns
        if columns is None:
            columns = available
        elif isinstance(columns, str):
            raise TypeError(f"tile {self.id!r}: columns must be a list of names, got {columns!r}")
        missing = [c for c in columns if c not in available]
        if missing:
            raise KeyError(
                f"tile {self.id!r} of {self.survey.url} has no catalogue column(s) {missing}; "
                f"available: {available}"
            )
        group = self._group["catalog"]._async_group  # type: ignore[union-attr]

        async def read_column(col: str) -> Any:
            arr = await group.getitem(col)
            return await arr.getitem(slice(None))  # type: ignore[arg-type]

        async def read_all() -> list[Any]:
            return await asyncio.gather(*(read_column(c) for c in columns))

        # All columns concurrently: one round trip of latency on object stores, not one per column.
        values = sync(read_all())
        return {c: np.asarray(v) for c, v in zip(columns, values, strict=True)}


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------


def _check_pixels(
    data: Any, name: str, ctx: str, *, kind: str, shape: tuple[int, ...] | None = None
) -> np.ndarray:
    arr = np.asarray(data)
    if arr.ndim != 3:
        raise ValueError(f"{ctx}: {name} must be 3-D (band, y, x), got shape {arr.shape}")
    if shape is not None and arr.shape != shape:
        raise ValueError(f"{ctx}: {name} shape {arr.shape} differs from the image shape {shape}")
    if kind == "float":
        if arr.dtype.kind != "f":
            raise TypeError(f"{ctx}: {name} must be floating point, got dtype {arr.dtype}")
        return arr.astype(np.float32, copy=False)
    if arr.dtype.kind == "b" or arr.dtype == np.uint8:
        return arr.astype(np.uint8, copy=False)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{ctx}: {name} must be integer or boolean, got dtype {arr.dtype}")
    if arr.size and (arr.min() < np.iinfo(np.int32).min or arr.max() > np.iinfo(np.int32).max):
        raise ValueError(f"{ctx}: {name} values do not fit in int32")
    return arr.astype(np.int32, copy=False)


def _finite(value: Any, name: str, ctx: str, *, positive: bool = False) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{ctx}: {name} must be a number, got {value!r}") from None
    if not math.isfinite(out) or (positive and out <= 0):
        need = "finite and > 0" if positive else "finite"
        raise ValueError(f"{ctx}: {name} must be {need}, got {value!r}")
    return out


def _check_json(value: Mapping[str, Any], name: str, ctx: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise TypeError(f"{ctx}: {name} must be a mapping, got {type(value).__name__}")
    try:
        return json.loads(json.dumps(dict(value), allow_nan=False))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{ctx}: {name} must be JSON-serialisable ({err})") from None


@contextlib.contextmanager
def _numcodecs_quiet() -> Iterator[None]:
    """Silence zarr's notice that numcodecs codecs are outside the Zarr v3 specification.

    lenscan writes one (``numcodecs.fixedscaleoffset``, quantised images) on purpose and
    documents it in ``docs/survey-format.md``.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr")
        yield


def _quantiser(scale: float) -> list[Any]:
    """The array-to-array codec of a quantised image: round(x * scale) as little-endian int32."""
    from zarr.codecs.numcodecs import FixedScaleOffset

    return [FixedScaleOffset(offset=0.0, scale=scale, dtype="<f4", astype="<i4")]


#: Compressor of quantised image chunks: bit-shuffled Blosc-zstd. The shuffle puts the int32
#: steps' constant high bits into runs, so the chunks come within ~1.2x of the entropy of
#: noise steps and decode 2-3x faster than plain zstd on the int32 bytes.
_QUANTISED_COMPRESSOR = BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle", typesize=4)


def quantise_step_for(sigma: float, quantise: float) -> float:
    """The largest power of two that is at most ``sigma / quantise``.

    Rounding to it moves no pixel by more than ``sigma / (2 quantise)``.

    Examples
    --------
    >>> quantise_step_for(3.0, 16)
    0.125
    """
    return 2.0 ** math.floor(math.log2(sigma / quantise))


def _quantise_scale(image: np.ndarray, quantise: float, ctx: str) -> float:
    """``1 / step``, a power of two with ``step <= sigma / quantise`` for every band's sigma."""
    q = _finite(quantise, "quantise", ctx, positive=True)
    if np.isnan(image).any():
        raise ValueError(
            f"{ctx}: quantise needs finite pixels, but the image has NaN; store it losslessly "
            "(quantise=None) or mark missing pixels with weight 0 instead of NaN"
        )
    sigmas = []
    for plane in image:
        sample = plane[::7, ::7].astype(np.float64)  # the step only needs a robust estimate
        sigma = 1.4826 * float(np.median(np.abs(sample - np.median(sample))))
        if sigma > 0:
            sigmas.append(sigma)
    scale = 1.0 / quantise_step_for(min(sigmas), q) if sigmas else 1.0
    _check_quantisable(image, scale, ctx, quantise=q)
    return scale


def _check_quantisable(
    pixels: np.ndarray, scale: float, ctx: str, *, quantise: float | None = None
) -> None:
    """Raise unless every pixel is finite and within int32 steps of ``1 / scale``."""
    if not np.isfinite(pixels).all():
        raise NotQuantisableError(
            f"{ctx}: quantise needs finite pixels, but the image has NaN or inf; store it "
            "losslessly (quantise=None) or mark missing pixels with weight 0 instead of NaN"
        )
    peak = float(np.abs(pixels).max(initial=0.0)) * scale
    if peak >= 2**31 - 1:
        level = f"quantise={quantise}" if quantise is not None else f"step {1 / scale:g}"
        raise NotQuantisableError(
            f"{ctx}: {level} needs {peak:.3g} quantisation steps for the brightest pixel, "
            "more than int32 holds; use a smaller quantise or store losslessly"
        )


def _check_chunking(
    chunk_pix: int, shard_pix: int | None, shape_yx: tuple[int, int], ctx: str
) -> tuple[int, tuple[int, int] | None]:
    if not isinstance(chunk_pix, int | np.integer) or chunk_pix < 1:
        raise ValueError(f"{ctx}: chunk_pix must be a positive integer, got {chunk_pix!r}")
    chunk_pix = int(chunk_pix)
    if shard_pix is None:
        return chunk_pix, None
    if not isinstance(shard_pix, int | np.integer) or shard_pix < 1 or shard_pix % chunk_pix:
        raise ValueError(
            f"{ctx}: shard_pix must be a positive multiple of chunk_pix={chunk_pix} (or None), "
            f"got {shard_pix!r}"
        )
    # A shard never needs to extend past the last chunk of the image.
    clipped = tuple(int(min(shard_pix, math.ceil(n / chunk_pix) * chunk_pix)) for n in shape_yx)
    return chunk_pix, clipped  # type: ignore[return-value]


def _header_wcs(header: fits.Header) -> WCS:
    with warnings.catch_warnings():
        # astropy "fixes" legacy keywords (DATE-OBS, RADECSYS ...) with an informational warning.
        warnings.simplefilter("ignore", FITSFixedWarning)
        return WCS(header)


def _wcs_header_text(
    wcs_header: fits.Header | WCS | str, ctx: str, *, shape_yx: tuple[int, int]
) -> str:
    if isinstance(wcs_header, WCS):
        header = wcs_header.to_header(relax=True)
    elif isinstance(wcs_header, fits.Header):
        header = wcs_header.copy()
    elif isinstance(wcs_header, str):
        try:
            header = fits.Header.fromstring(wcs_header, sep="\n" if "\n" in wcs_header else "")
        except Exception as err:
            raise ValueError(f"{ctx}: wcs_header text is not a FITS header ({err})") from None
    else:
        raise TypeError(
            f"{ctx}: wcs_header must be an astropy.io.fits.Header, astropy.wcs.WCS or header "
            f"text, got {type(wcs_header).__name__}"
        )
    try:
        wcs = _header_wcs(header)
    except Exception as err:
        raise ValueError(f"{ctx}: wcs_header does not define a valid WCS ({err})") from None
    if wcs.pixel_n_dim != 2 or not wcs.has_celestial:
        raise ValueError(
            f"{ctx}: wcs_header must describe a 2-D celestial WCS, got {wcs.pixel_n_dim} pixel "
            f"axes (celestial: {wcs.has_celestial})"
        )
    ny, nx = shape_yx
    for key, n in (("NAXIS1", nx), ("NAXIS2", ny)):
        if key in header and int(header[key]) != n:
            raise ValueError(f"{ctx}: wcs_header {key}={header[key]} but the image has {n} pixels")
    return header.tostring(sep="\n", endcard=False, padding=False)


def _check_catalog(catalog: Any, bands: Sequence[str], ctx: str) -> dict[str, np.ndarray]:
    if hasattr(catalog, "colnames"):  # astropy Table
        names = list(catalog.colnames)
        raw = {n: np.asarray(catalog[n]) for n in names}
    elif isinstance(catalog, Mapping):
        raw = {str(k): np.asarray(v) for k, v in catalog.items()}
    else:
        raise TypeError(
            f"{ctx}: catalog must be a mapping of column name to 1-D array or an astropy Table, "
            f"got {type(catalog).__name__}"
        )
    required = required_catalog_columns(bands)
    missing = [c for c in required if c not in raw]
    if missing:
        raise ValueError(f"{ctx}: catalog lacks required column(s) {missing}")
    lengths = {c: (v.shape[0] if v.ndim == 1 else None) for c, v in raw.items()}
    bad = [c for c, n in lengths.items() if n is None]
    if bad:
        raise ValueError(f"{ctx}: catalog column(s) {bad} are not 1-D")
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{ctx}: catalog columns have different lengths {lengths}")
    out: dict[str, np.ndarray] = {}
    for col, dtype in required.items():
        out[col] = _cast_column(raw[col], col, dtype, ctx)
    for col, values in raw.items():
        if col in required:
            continue
        if not _SAFE_NAME.match(col) or len(col) > _MAX_NAME_LEN:
            raise ValueError(
                f"{ctx}: catalog column name {col!r} must use characters [A-Za-z0-9_.+-]"
            )
        if values.dtype.kind not in "biuf":
            raise TypeError(
                f"{ctx}: catalog column {col!r} has dtype {values.dtype}; only numeric and "
                "boolean columns are stored (encode strings as integer codes)"
            )
        out[col] = values
    return out


def _cast_column(values: np.ndarray, col: str, dtype: np.dtype, ctx: str) -> np.ndarray:
    if dtype.kind in "iu":
        if values.dtype.kind not in "iu":
            raise TypeError(f"{ctx}: catalog column {col!r} must be integer, got {values.dtype}")
        info = np.iinfo(dtype)
        if values.size and (values.min() < info.min or values.max() > info.max):
            raise ValueError(f"{ctx}: catalog column {col!r} has values outside {dtype}")
        return values.astype(dtype, copy=False)
    if values.dtype.kind not in "iuf":
        raise TypeError(f"{ctx}: catalog column {col!r} must be numeric, got {values.dtype}")
    out = values.astype(dtype, copy=False)
    if col in ("ra", "dec", "x", "y") and not np.all(np.isfinite(out)):
        raise ValueError(f"{ctx}: catalog column {col!r} has non-finite values")
    return out
