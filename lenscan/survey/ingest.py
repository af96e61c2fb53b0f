"""Ingest survey coadd tiles (FITS) and their object catalogue into a lenscan survey store.

The graph is one Dask task per tile: the task opens the tile's band files through fsspec with
astropy (plain ``.fits`` or fpack ``.fits.fz`` via :class:`astropy.io.fits.CompImageHDU`),
checks shapes, WCS and pixel scale, reads the science / weight / mask planes section by section
(row blocks aligned with the store's shards) into one pre-allocated tile buffer, places the
catalogue rows on the tile with its WCS, and writes the tile with
:meth:`lenscan.survey.SurveyStore.write_tile`, whose ``complete`` flag is written last. Tiles
already complete in the store are skipped, so ingest can be rerun after an interruption. A
problem with one tile's input fails that tile only, with a message naming the file; the summary
lists the failures.

Survey conventions (file names, bands, HDUs, catalogue columns, pixel scale, zero point) are data:
an :class:`IngestPreset`, loaded from a YAML file (``lenscan/survey/presets/des-dr2.yaml``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import posixpath
import re
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import yaml
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning

from lenscan.survey.store import create_survey, open_survey, validate_tile_id

#: Catalogue file extensions understood by ingest.
CATALOG_EXTENSIONS = (".fits", ".fit", ".fits.gz", ".parquet", ".pq")

_PRESET_DIR = "presets"


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IngestPreset:
    """Survey conventions for ingest, loaded from YAML (see ``docs/ingest.md``).

    Attributes
    ----------
    name : str
        Preset name (``"des-dr2"``).
    survey_name : str
        Name given to a store that ingest creates.
    bands : tuple of str
        Lower-case bands, in store order.
    file_patterns : tuple of str
        File-name patterns with ``{tilename}`` and ``{band}``, tried in order.
    tilename_regex : str
        Regular expression a tile name matches (no anchors; it must not contain ``_`` if the
        patterns separate fields with ``_``).
    band_tokens : dict
        Band -> the token used in file names and ``{BAND}`` column templates.
    hdu_science, hdu_weight, hdu_mask : str, int or None
        EXTNAME or index of each plane; weight and mask may be None (not read).
    shape_yx : tuple of int or None
        Expected image shape, or None for any.
    pixel_scale_arcsec : float or None
        Nominal pixel scale, checked against the WCS within ``pixel_scale_rtol``.
    pixel_scale_rtol : float
        Relative tolerance of that check.
    zero_point : float
        Photometric zero point of the images.
    catalog_tile_column : str
        Catalogue column holding the tile name.
    catalog_columns : dict
        lenscan column -> survey column (``id``, ``ra``, ``dec``, ``extended_class``).
    catalog_band_columns : dict
        lenscan prefix (``mag``, ``magerr``) -> survey template with ``{BAND}`` / ``{band}``.
    catalog_flag_columns : str or None
        Template of the per-band flag columns, combined by bitwise OR into ``flags``.
    description : str
        Free text.
    zero_point_keyword : str or None
        Science-header keyword holding the zero point; when a file has it, it must equal
        ``zero_point`` (a tile on another photometric scale fails instead of being mislabelled).
    """

    name: str
    survey_name: str
    bands: tuple[str, ...]
    file_patterns: tuple[str, ...]
    tilename_regex: str
    band_tokens: dict[str, str]
    hdu_science: str | int
    hdu_weight: str | int | None
    hdu_mask: str | int | None
    shape_yx: tuple[int, int] | None
    pixel_scale_arcsec: float | None
    pixel_scale_rtol: float
    zero_point: float
    catalog_tile_column: str
    catalog_columns: dict[str, str]
    catalog_band_columns: dict[str, str]
    catalog_flag_columns: str | None
    description: str = ""
    zero_point_keyword: str | None = None

    def __post_init__(self) -> None:
        ctx = f"ingest preset {self.name!r}"
        if not self.bands:
            raise ValueError(f"{ctx}: bands must not be empty")
        for p in self.file_patterns:
            if "{tilename}" not in p or "{band}" not in p:
                raise ValueError(f"{ctx}: file pattern {p!r} needs {{tilename}} and {{band}}")
        missing = [b for b in self.bands if b not in self.band_tokens]
        if missing:
            raise ValueError(f"{ctx}: files.band_tokens lacks bands {missing}")
        for key in ("id", "ra", "dec"):
            if key not in self.catalog_columns:
                raise ValueError(f"{ctx}: catalog.columns must map {key!r}")
        for key in ("mag", "magerr"):
            if key not in self.catalog_band_columns:
                raise ValueError(f"{ctx}: catalog.band_columns must map {key!r}")
        if self.shape_yx is not None and (len(self.shape_yx) != 2 or min(self.shape_yx) < 1):
            raise ValueError(f"{ctx}: image.shape_yx must be two positive integers or null")
        if not math.isfinite(self.zero_point):
            raise ValueError(f"{ctx}: image.zero_point must be finite")
        re.compile(self.tilename_regex)

    def band_column(self, kind: str, band: str) -> str:
        """Survey column of ``kind`` (``"mag"``, ``"magerr"``, ``"flags"``) in ``band``."""
        template = self.catalog_flag_columns if kind == "flags" else self.catalog_band_columns[kind]
        if template is None:
            raise ValueError(f"ingest preset {self.name!r} has no flag columns")
        token = self.band_tokens[band]
        return template.format(BAND=token.upper(), band=token.lower())


def list_ingest_presets() -> list[str]:
    """Names of the ingest presets shipped with lenscan."""
    folder = resources.files("lenscan.survey") / _PRESET_DIR
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_ingest_preset(name_or_path: str | os.PathLike[str]) -> IngestPreset:
    """Load an ingest preset by name (``"des-dr2"``) or from a YAML file path.

    Parameters
    ----------
    name_or_path : str or path
        A shipped preset name (see :func:`list_ingest_presets`) or a path to a YAML file with
        the same fields.

    Returns
    -------
    IngestPreset
    """
    text: str
    source = os.fspath(name_or_path)
    if source.endswith((".yaml", ".yml")) or os.sep in source:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"ingest preset file {source} does not exist")
        text = path.read_text()
    else:
        res = resources.files("lenscan.survey") / _PRESET_DIR / f"{source}.yaml"
        if not res.is_file():
            raise ValueError(
                f"unknown ingest preset {source!r}; known: {list_ingest_presets()} "
                "(or pass the path of a YAML preset file)"
            )
        text = res.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"ingest preset {source}: not valid YAML ({err})") from None
    return _preset_from_dict(data, source)


def _preset_from_dict(data: Any, source: str) -> IngestPreset:
    if not isinstance(data, Mapping):
        raise ValueError(f"ingest preset {source}: top level must be a mapping")
    try:
        files, hdus, image, cat = data["files"], data["hdus"], data["image"], data["catalog"]
        shape = image.get("shape_yx")
        scale = image.get("pixel_scale_arcsec")
        flags = cat.get("flags") or {}
        if flags and flags.get("combine", "or") != "or":
            raise ValueError(f"ingest preset {source}: catalog.flags.combine must be 'or'")
        return IngestPreset(
            name=str(data["name"]),
            survey_name=str(data.get("survey_name", data["name"])),
            description=str(data.get("description", "")),
            bands=tuple(str(b) for b in data["bands"]),
            file_patterns=tuple(str(p) for p in files["patterns"]),
            tilename_regex=str(files["tilename_regex"]),
            band_tokens={str(k): str(v) for k, v in files["band_tokens"].items()},
            hdu_science=hdus["science"],
            hdu_weight=hdus.get("weight"),
            hdu_mask=hdus.get("mask"),
            shape_yx=None if shape is None else (int(shape[0]), int(shape[1])),
            pixel_scale_arcsec=None if scale is None else float(scale),
            pixel_scale_rtol=float(image.get("pixel_scale_rtol", 0.01)),
            zero_point=float(image["zero_point"]),
            zero_point_keyword=image.get("zero_point_keyword"),
            catalog_tile_column=str(cat["tile_column"]),
            catalog_columns={str(k): str(v) for k, v in cat["columns"].items()},
            catalog_band_columns={str(k): str(v) for k, v in cat["band_columns"].items()},
            catalog_flag_columns=flags.get("columns"),
        )
    except (KeyError, TypeError, IndexError) as err:
        raise ValueError(f"ingest preset {source}: missing or malformed field ({err!r})") from None


# --------------------------------------------------------------------------------------------
# Summary and per-tile plan
# --------------------------------------------------------------------------------------------


@dataclass
class IngestSummary:
    """Outcome of :func:`ingest`.

    Attributes
    ----------
    out : str
        The store URL.
    ingested : list of str
        Tiles written by this run.
    skipped : list of str
        Tiles already complete in the store (not read again).
    failed : dict
        Tile -> message (the message names the file at fault).
    dropped_outside : dict
        Tile -> number of catalogue rows outside the tile (or without finite RA/Dec), dropped.
    n_sources : dict
        Tile -> number of catalogue rows written.
    bytes_read : int
        Bytes of FITS image files read (their size on storage).
    seconds : float
        Wall-clock time of the run.
    """

    out: str
    ingested: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    dropped_outside: dict[str, int] = field(default_factory=dict)
    n_sources: dict[str, int] = field(default_factory=dict)
    bytes_read: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when no tile failed."""
        return not self.failed

    def __str__(self) -> str:
        mb = self.bytes_read / 1e6
        rate = mb / self.seconds if self.seconds > 0 else float("nan")
        lines = [
            f"ingest into {self.out}: {len(self.ingested)} tile(s) ingested, "
            f"{len(self.skipped)} skipped (already complete), {len(self.failed)} failed; "
            f"{sum(self.n_sources.values())} sources kept, "
            f"{sum(self.dropped_outside.values())} dropped outside their tile; "
            f"{mb:.1f} MB of FITS read in {self.seconds:.1f} s ({rate:.1f} MB/s)"
        ]
        lines += [f"  FAILED {tile}: {msg}" for tile, msg in sorted(self.failed.items())]
        return "\n".join(lines)


@dataclass(frozen=True)
class _TileJob:
    """Everything one task needs (small and picklable)."""

    tile: str
    files: dict[str, str]  # band -> URL
    bands: tuple[str, ...]
    preset: IngestPreset
    expected_shape_yx: tuple[int, int] | None
    out: str
    storage_options: dict[str, Any] | None
    source_storage_options: dict[str, Any] | None
    catalog_file: str  # single file, or a template with {tilename} (one file per tile)
    catalog_rows: dict[str, np.ndarray] | None  # the tile's rows, read by the client
    chunk_pix: int
    shard_pix: int | None


@dataclass(frozen=True)
class _TileResult:
    tile: str
    ok: bool
    message: str = ""
    n_sources: int = 0
    dropped: int = 0
    bytes_read: int = 0


class TileInputError(ValueError):
    """Bad input for one tile (the message names the file)."""


# --------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------


def _pattern_regex(pattern: str, preset: IngestPreset, bands: Sequence[str]) -> re.Pattern[str]:
    parts = re.split(r"(\{tilename\}|\{band\})", pattern)
    token_alt = "|".join(re.escape(preset.band_tokens[b]) for b in bands)
    out = []
    for part in parts:
        if part == "{tilename}":
            out.append(f"(?P<tilename>{preset.tilename_regex})")
        elif part == "{band}":
            out.append(f"(?P<band>{token_alt})")
        else:
            out.append(re.escape(part))
    return re.compile("^" + "".join(out) + "$")


def discover_tiles(
    source: str,
    preset: IngestPreset,
    *,
    bands: Sequence[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, str]]:
    """List the tile files under ``source`` and group them by tile.

    Parameters
    ----------
    source : str
        Folder or fsspec URL, searched recursively.
    preset : IngestPreset
        File-name patterns and band tokens.
    bands : sequence of str, optional
        Bands to look for (default: all the preset's bands).
    storage_options : mapping, optional
        fsspec options for ``source``.

    Returns
    -------
    dict
        Tile name -> {band: file URL}, sorted by tile name. A tile/band matched by several
        patterns keeps the first pattern's file (``.fits.fz`` before ``.fits`` for DES).
    """
    use = list(preset.bands if bands is None else bands)
    fs, root = fsspec.core.url_to_fs(source, **dict(storage_options or {}))
    if not fs.exists(root):
        raise FileNotFoundError(f"ingest source {source} does not exist")
    if not fs.isdir(root):
        raise NotADirectoryError(f"ingest source {source} is not a folder")
    token_to_band = {preset.band_tokens[b]: b for b in use}
    regexes = [_pattern_regex(p, preset, use) for p in preset.file_patterns]
    found: dict[str, dict[str, tuple[int, str]]] = {}
    for path in sorted(fs.find(root)):
        name = posixpath.basename(path)
        for rank, rx in enumerate(regexes):
            m = rx.match(name)
            if m is None:
                continue
            band = token_to_band[m.group("band")]
            slot = found.setdefault(m.group("tilename"), {})
            if band not in slot or rank < slot[band][0]:
                slot[band] = (rank, fs.unstrip_protocol(path))
            break
    return {t: {b: v[1] for b, v in sorted(found[t].items())} for t in sorted(found)}


def _infer_bands(preset: IngestPreset, tiles: Mapping[str, Mapping[str, str]]) -> tuple[str, ...]:
    present = {b for files in tiles.values() for b in files}
    return tuple(b for b in preset.bands if b in present)


# --------------------------------------------------------------------------------------------
# Catalogue reading
# --------------------------------------------------------------------------------------------


def _needed_catalog_columns(preset: IngestPreset, bands: Sequence[str]) -> list[str]:
    cols = [preset.catalog_columns[k] for k in ("id", "ra", "dec")]
    if "extended_class" in preset.catalog_columns:
        cols.append(preset.catalog_columns["extended_class"])
    for b in bands:
        cols += [preset.band_column("mag", b), preset.band_column("magerr", b)]
        if preset.catalog_flag_columns:
            cols.append(preset.band_column("flags", b))
    return cols


def _is_parquet(path: str) -> bool:
    return path.lower().endswith((".parquet", ".pq"))


def read_catalog_file(
    path: str,
    columns: Sequence[str],
    *,
    tile_column: str | None = None,
    tile: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """Read ``columns`` of a FITS or Parquet catalogue, optionally only the rows of one tile.

    Column names match case-insensitively (FITS column names are case-insensitive). String
    columns come back as stripped ``str`` arrays.

    Raises
    ------
    TileInputError
        If the file cannot be read or lacks a needed column (the message names the file).
    """
    wanted = list(dict.fromkeys([*columns, *([tile_column] if tile_column else [])]))
    fs, p = fsspec.core.url_to_fs(path, **dict(storage_options or {}))
    try:
        if _is_parquet(p):
            import pyarrow.parquet as pq

            schema = pq.read_schema(p, filesystem=fs)
            names = {n.upper(): n for n in schema.names}
            _check_columns(path, wanted, names)
            real = [names[c.upper()] for c in wanted]
            filters = None
            if tile is not None and tile_column is not None:
                filters = [(names[tile_column.upper()], "==", tile)]
            table = pq.read_table(p, columns=real, filesystem=fs, filters=filters)
            raw = {
                c: table.column(r).to_numpy(zero_copy_only=False)
                for c, r in zip(wanted, real, strict=True)
            }
        else:
            with fs.open(p, "rb") as f, fits.open(f, memmap=False) as hdul:
                hdu = next((h for h in hdul if isinstance(h, fits.BinTableHDU)), None)
                if hdu is None:
                    raise TileInputError(f"catalogue {path}: no binary table HDU found")
                names = {n.upper(): n for n in hdu.columns.names}
                _check_columns(path, wanted, names)
                data = hdu.data
                raw = {c: np.asarray(data[names[c.upper()]]) for c in wanted}
    except TileInputError:
        raise
    except Exception as err:
        raise TileInputError(f"catalogue {path} could not be read: {err}") from None
    out = {}
    for c, v in raw.items():
        v = np.asarray(v)
        if v.dtype.kind in "SUO":
            v = np.char.strip(v.astype(str))
        elif v.dtype.byteorder not in ("=", "|"):
            v = v.astype(v.dtype.newbyteorder("="))
        out[c] = v
    if tile is not None and tile_column is not None and not _is_parquet(p):
        keep = out[tile_column] == tile
        out = {c: v[keep] for c, v in out.items()}
    return out


def _check_columns(path: str, wanted: Sequence[str], names: Mapping[str, str]) -> None:
    missing = [c for c in wanted if c.upper() not in names]
    if missing:
        raise TileInputError(
            f"catalogue {path} lacks column(s) {missing} needed by the ingest preset; it has "
            f"{sorted(names.values())}"
        )


def _catalog_for_tile(
    raw: Mapping[str, np.ndarray], preset: IngestPreset, bands: Sequence[str], source: str
) -> dict[str, np.ndarray]:
    """Map survey columns to lenscan's (without x, y)."""
    cm = preset.catalog_columns
    n = len(raw[cm["id"]])
    ids = np.asarray(raw[cm["id"]])
    if ids.dtype.kind not in "iu":
        raise TileInputError(
            f"catalogue {source}: column {cm['id']} must be integer, got {ids.dtype}"
        )
    cat: dict[str, np.ndarray] = {
        "id": ids.astype(np.int64),
        "ra": np.asarray(raw[cm["ra"]], dtype=np.float64),
        "dec": np.asarray(raw[cm["dec"]], dtype=np.float64),
    }
    flags = np.zeros(n, dtype=np.int32)
    for b in bands:
        cat[f"mag_{b}"] = np.asarray(raw[preset.band_column("mag", b)], dtype=np.float32)
        cat[f"magerr_{b}"] = np.asarray(raw[preset.band_column("magerr", b)], dtype=np.float32)
        if preset.catalog_flag_columns:
            flags |= np.asarray(raw[preset.band_column("flags", b)]).astype(np.int32)
    cat["flags"] = flags
    if "extended_class" in cm:
        cat["extended_class"] = np.asarray(raw[cm["extended_class"]]).astype(np.int16)
    else:
        cat["extended_class"] = np.full(n, -9, dtype=np.int16)
    return cat


def place_sources(
    catalog: Mapping[str, np.ndarray], wcs: WCS, shape_yx: tuple[int, int]
) -> tuple[dict[str, np.ndarray], int]:
    """Add 0-based pixel ``x``, ``y`` from ``wcs`` and drop rows outside the tile.

    A row is inside when ``-0.5 <= x < nx - 0.5`` and likewise for ``y`` (its pixel exists).
    Rows without finite RA/Dec are dropped too.

    Returns
    -------
    catalog : dict
        The kept rows with ``x`` and ``y`` added.
    n_dropped : int
    """
    ra = np.asarray(catalog["ra"], dtype=np.float64)
    dec = np.asarray(catalog["dec"], dtype=np.float64)
    finite = np.isfinite(ra) & np.isfinite(dec)
    x = np.full(ra.shape, np.nan)
    y = np.full(ra.shape, np.nan)
    if finite.any():
        x[finite], y[finite] = wcs.world_to_pixel_values(ra[finite], dec[finite])
    ny, nx = shape_yx
    with np.errstate(invalid="ignore"):
        inside = finite & (x >= -0.5) & (x < nx - 0.5) & (y >= -0.5) & (y < ny - 0.5)
    out = {c: np.asarray(v)[inside] for c, v in catalog.items()}
    out["x"] = x[inside]
    out["y"] = y[inside]
    return out, int((~inside).sum())


# --------------------------------------------------------------------------------------------
# The per-tile task
# --------------------------------------------------------------------------------------------


def _hdu(hdul: fits.HDUList, key: str | int, path: str, what: str) -> Any:
    try:
        hdu = hdul[key]
    except (KeyError, IndexError):
        names = [h.name for h in hdul]
        raise TileInputError(f"{path}: no {what} HDU {key!r} (HDUs: {names})") from None
    if not hdu.is_image or hdu.shape is None or len(hdu.shape) != 2:
        raise TileInputError(f"{path}: {what} HDU {key!r} is not a 2-D image (shape {hdu.shape})")
    return hdu


def _wcs(header: fits.Header, path: str) -> WCS:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            wcs = WCS(header)
    except Exception as err:
        raise TileInputError(f"{path}: invalid WCS in the science header ({err})") from None
    if not wcs.has_celestial or wcs.pixel_n_dim != 2:
        raise TileInputError(f"{path}: the science header has no 2-D celestial WCS")
    return wcs


def _same_wcs(a: WCS, b: WCS) -> bool:
    return (
        list(a.wcs.ctype) == list(b.wcs.ctype)
        and np.allclose(a.wcs.crval, b.wcs.crval, rtol=0, atol=1e-9)
        and np.allclose(a.wcs.crpix, b.wcs.crpix, rtol=0, atol=1e-6)
        and np.allclose(a.pixel_scale_matrix, b.pixel_scale_matrix, rtol=1e-9, atol=1e-14)
    )


def _store_header(header: fits.Header) -> fits.Header:
    """Science header without the FITS structure / compression cards."""
    drop = {"XTENSION", "BITPIX", "PCOUNT", "GCOUNT", "EXTEND", "SIMPLE", "CHECKSUM", "DATASUM"}
    out = fits.Header()
    for card in header.cards:
        key = card.keyword
        if key in drop or key in ("", "COMMENT", "HISTORY") or key.startswith(("ZIMAGE", "ZTENS")):
            continue
        out.append(card)
    return out


def _read_plane(hdu: Any, out: np.ndarray, rows: int) -> None:
    """Stream a 2-D HDU into ``out`` by blocks of ``rows`` rows (sections, not the whole HDU)."""
    ny = out.shape[0]
    for y0 in range(0, ny, rows):
        y1 = min(ny, y0 + rows)
        out[y0:y1] = hdu.section[y0:y1, :]


def _ingest_tile(job: _TileJob) -> _TileResult:
    """Ingest one tile; every input problem becomes a failed result naming the file."""
    try:
        return _ingest_tile_unsafe(job)
    except TileInputError as err:
        return _TileResult(job.tile, False, str(err))
    except Exception as err:  # anything else still only fails this tile
        return _TileResult(job.tile, False, f"{type(err).__name__}: {err}")


def _ingest_tile_unsafe(job: _TileJob) -> _TileResult:
    preset = job.preset
    missing = [b for b in job.bands if b not in job.files]
    if missing:
        expected = [
            preset.file_patterns[0].format(tilename=job.tile, band=preset.band_tokens[b])
            for b in missing
        ]
        raise TileInputError(
            f"tile {job.tile}: missing band file(s) {expected} (band(s) {missing}) in the source"
        )
    rows = job.shard_pix or 2048
    opts = dict(job.source_storage_options or {})
    image = weight = mask = None
    ref_wcs: WCS | None = None
    ref_path = ""
    header: fits.Header | None = None
    nbytes = 0
    for b, band in enumerate(job.bands):
        path = job.files[band]
        fs, p = fsspec.core.url_to_fs(path, **opts)
        try:
            nbytes += int(fs.size(p))
            f = fs.open(p, "rb")
        except Exception as err:
            raise TileInputError(f"{path}: cannot open ({err})") from None
        with f:
            try:
                hdul = fits.open(f, memmap=False, lazy_load_hdus=True)
                sci = _hdu(hdul, preset.hdu_science, path, "science")
            except TileInputError:
                raise
            except Exception as err:
                raise TileInputError(f"{path}: not a readable FITS file ({err})") from None
            with hdul:
                shape = tuple(int(s) for s in sci.shape)
                if job.expected_shape_yx is not None and shape != tuple(job.expected_shape_yx):
                    raise TileInputError(
                        f"{path}: image shape {shape} differs from the expected "
                        f"{tuple(job.expected_shape_yx)} (override with expected_shape_yx / "
                        "--shape)"
                    )
                wcs = _wcs(sci.header, path)
                _check_zero_point(sci.header, preset, path)
                if ref_wcs is None:
                    ref_wcs, ref_path, header = wcs, path, _store_header(sci.header)
                    _check_pixel_scale(wcs, preset, path)
                    image = np.empty((len(job.bands), *shape), dtype=np.float32)
                elif shape != image.shape[1:] or not _same_wcs(ref_wcs, wcs):  # type: ignore[union-attr]
                    raise TileInputError(
                        f"{path}: WCS or shape {shape} does not match band {job.bands[0]} "
                        f"({ref_path}); all bands of a tile must share one pixel grid"
                    )
                try:
                    _read_plane(sci, image[b], rows)  # type: ignore[index]
                    if preset.hdu_weight is not None:
                        whdu = _hdu(hdul, preset.hdu_weight, path, "weight")
                        if tuple(whdu.shape) != shape:
                            raise TileInputError(
                                f"{path}: weight HDU shape {whdu.shape} != {shape}"
                            )
                        if weight is None:
                            weight = np.empty_like(image)
                        _read_plane(whdu, weight[b], rows)
                        if np.any(weight[b] < 0):
                            # An inverse variance is never negative: corrupt input.
                            raise TileInputError(f"{path}: the weight HDU has negative values")
                    if preset.hdu_mask is not None:
                        mhdu = _hdu(hdul, preset.hdu_mask, path, "mask")
                        if tuple(mhdu.shape) != shape:
                            raise TileInputError(f"{path}: mask HDU shape {mhdu.shape} != {shape}")
                        if mask is None:
                            mask = np.empty(image.shape, dtype=np.int32)  # type: ignore[union-attr]
                        _read_plane(mhdu, mask[b], rows)
                except TileInputError:
                    raise
                except Exception as err:
                    raise TileInputError(f"{path}: pixel data could not be read ({err})") from None
    assert image is not None and ref_wcs is not None and header is not None

    # Catalogue rows of this tile.
    needed = _needed_catalog_columns(preset, job.bands)
    per_tile = "{tilename}" in job.catalog_file
    cat_source = job.catalog_file.replace("{tilename}", job.tile)
    if job.catalog_rows is not None:
        raw = job.catalog_rows
    else:
        raw = read_catalog_file(
            cat_source,
            needed,
            tile_column=None if per_tile else preset.catalog_tile_column,
            tile=None if per_tile else job.tile,
            storage_options=job.source_storage_options,
        )
    catalog = _catalog_for_tile(raw, preset, job.bands, cat_source)
    catalog, dropped = place_sources(catalog, ref_wcs, image.shape[1:])

    store = open_survey(job.out, job.storage_options, mode="a")
    store.write_tile(
        job.tile,
        image=image,
        wcs_header=header,
        catalog=catalog,
        pixel_scale_arcsec=_pixel_scale(ref_wcs, preset),
        zero_point=preset.zero_point,
        weight=weight,
        mask=mask,
        chunk_pix=job.chunk_pix,
        shard_pix=job.shard_pix,
        extra_attrs={"ingest": {"preset": preset.name, "files": job.files, "catalog": cat_source}},
    )
    return _TileResult(job.tile, True, "", len(catalog["id"]), dropped, nbytes)


def _check_zero_point(header: fits.Header, preset: IngestPreset, path: str) -> None:
    key = preset.zero_point_keyword
    if not key or key not in header:
        return
    try:
        value = float(header[key])
    except (TypeError, ValueError):
        raise TileInputError(f"{path}: header {key}={header[key]!r} is not a number") from None
    if not math.isclose(value, preset.zero_point, abs_tol=1e-4):
        raise TileInputError(
            f"{path}: header {key}={value} differs from the preset's zero point "
            f"{preset.zero_point}; lenscan stores one zero point per survey preset"
        )


def _wcs_pixel_scale(wcs: WCS) -> float:
    from astropy.wcs.utils import proj_plane_pixel_scales

    return float(np.mean(proj_plane_pixel_scales(wcs.celestial)) * 3600.0)


def _check_pixel_scale(wcs: WCS, preset: IngestPreset, path: str) -> None:
    if preset.pixel_scale_arcsec is None:
        return
    got = _wcs_pixel_scale(wcs)
    if abs(got / preset.pixel_scale_arcsec - 1) > preset.pixel_scale_rtol:
        raise TileInputError(
            f"{path}: WCS pixel scale {got:.4f} arcsec differs from the preset's "
            f"{preset.pixel_scale_arcsec} arcsec by more than {preset.pixel_scale_rtol:.0%}"
        )


def _pixel_scale(wcs: WCS, preset: IngestPreset) -> float:
    return preset.pixel_scale_arcsec if preset.pixel_scale_arcsec else _wcs_pixel_scale(wcs)


# --------------------------------------------------------------------------------------------
# The graph
# --------------------------------------------------------------------------------------------


def _protocol(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def ingest(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    preset: str | IngestPreset = "des-dr2",
    catalog: str | os.PathLike[str] | None = None,
    client: Any = None,
    storage_options: Mapping[str, Any] | None = None,
    source_storage_options: Mapping[str, Any] | None = None,
    tiles: Sequence[str] | None = None,
    bands: Sequence[str] | None = None,
    expected_shape_yx: tuple[int, int] | str | None = "preset",
    chunk_pix: int = 128,
    shard_pix: int | None = 2048,
    n_workers: int | None = None,
) -> IngestSummary:
    """Convert coadd FITS tiles and their catalogue into a lenscan survey store.

    Parameters
    ----------
    source : str or path
        Folder or fsspec URL holding the tile files (searched recursively).
    out : str or path
        Store URL; created if absent, otherwise opened to add tiles (its bands must match).
    preset : str or IngestPreset
        Ingest preset name (``"des-dr2"``), YAML path, or a loaded preset.
    catalog : str or path
        The object catalogue (FITS or Parquet): one file for all tiles, rows grouped by the
        preset's tile column (``TILENAME``), or a template with ``{tilename}`` for one file per
        tile (e.g. ``"cats/{tilename}_cat.parquet"``). Required.
    client : distributed.Client, "sync" or None
        Where to run the one-task-per-tile graph. None starts a ``LocalCluster`` (worker
        processes with one thread each; threads in this process if ``source`` or ``out`` is
        ``memory://``, which only exists inside one process). ``"sync"`` runs the tasks one
        after the other in this process.
    storage_options, source_storage_options : mapping, optional
        fsspec options for ``out`` and for ``source`` / ``catalog``.
    tiles : sequence of str, optional
        Only these tile names.
    bands : sequence of str, optional
        Bands to ingest, in store order. Default: the store's bands if it exists, else the
        preset's bands that occur among the files found.
    expected_shape_yx : tuple, None or "preset"
        Image shape every band must have. ``"preset"`` (default) uses the preset's
        ``image.shape_yx`` (10000 x 10000 for DES DR2); None accepts any shape.
    chunk_pix, shard_pix : int
        Chunking of the store's image planes (see ``SurveyStore.write_tile``); pixels are read
        from the FITS files in blocks of ``shard_pix`` rows.
    n_workers : int, optional
        Workers of the LocalCluster started when ``client`` is None (default: one per CPU,
        at most one per tile).

    Returns
    -------
    IngestSummary
        Tiles ingested, skipped (already complete) and failed (with messages naming files),
        sources dropped outside their tile, bytes read and time taken.

    Examples
    --------
    >>> summary = ingest("s3://bucket/des/tiles", "s3://bucket/lenscan/des.zarr",
    ...                  catalog="s3://bucket/des/dr2_main.parquet")  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    source = os.fspath(source)
    out = os.fspath(out)
    p = preset if isinstance(preset, IngestPreset) else load_ingest_preset(preset)
    if catalog is None:
        raise ValueError(
            "ingest needs a catalogue: pass catalog= (a FITS or Parquet file with a "
            f"{p.catalog_tile_column} column, or a '{{tilename}}' template for one file per tile)"
        )
    catalog = os.fspath(catalog)
    if isinstance(expected_shape_yx, str):
        if expected_shape_yx != "preset":
            raise ValueError(
                f"expected_shape_yx must be (ny, nx), None or 'preset', got {expected_shape_yx!r}"
            )
        shape = p.shape_yx
    else:
        shape = None if expected_shape_yx is None else tuple(int(v) for v in expected_shape_yx)
    if bands is not None:
        unknown = [b for b in bands if b not in p.bands]
        if unknown:
            raise ValueError(f"bands {unknown} are not in ingest preset {p.name!r} ({p.bands})")
    src_opts = dict(source_storage_options or {})

    # Store first: an existing store fixes the bands.
    store = None
    try:
        store = open_survey(out, storage_options, mode="a")
    except ValueError:
        store = None
    if store is not None and bands is not None and tuple(bands) != store.bands:
        raise ValueError(f"store {out} has bands {store.bands}, but bands={tuple(bands)} was asked")
    found = discover_tiles(
        source, p, bands=store.bands if store is not None else bands, storage_options=src_opts
    )
    if tiles is not None:
        wanted = [str(t) for t in tiles]
        absent = [t for t in wanted if t not in found]
        found = {t: found.get(t, {}) for t in wanted}
        if absent and len(absent) == len(wanted):
            raise FileNotFoundError(f"none of tiles {absent} has files in {source}")
    if not found:
        raise FileNotFoundError(
            f"no tile files matching {list(p.file_patterns)} under {source} (preset {p.name!r})"
        )
    use_bands = store.bands if store is not None else tuple(bands or _infer_bands(p, found))
    if store is None:
        try:
            store = create_survey(
                out, name=p.survey_name, bands=use_bands, storage_options=storage_options
            )
        except FileExistsError:
            # Another process created it meanwhile, or it is something else: let open decide.
            store = open_survey(out, storage_options, mode="a")
    summary = IngestSummary(out=out)

    # Catalogue: a single FITS file is read once here and split by tile; Parquet files and
    # per-tile files are read by the tasks (Parquet with a row filter on the tile column).
    per_tile_rows: dict[str, dict[str, np.ndarray]] | None = None
    catalog_error: str | None = None
    needed_cols = _needed_catalog_columns(p, use_bands)
    if "{tilename}" not in catalog and not _is_parquet(catalog):
        try:
            rows = read_catalog_file(
                catalog,
                needed_cols,
                tile_column=p.catalog_tile_column,
                storage_options=src_opts,
            )
            tile_col = rows[p.catalog_tile_column]
            order = np.argsort(tile_col, kind="stable")
            names, starts = np.unique(tile_col[order], return_index=True)
            bounds = [*starts[1:], len(order)]
            per_tile_rows = {
                str(nm): {c: v[order[a:b]] for c, v in rows.items()}
                for nm, a, b in zip(names, starts, bounds, strict=True)
            }
        except TileInputError as err:
            catalog_error = str(err)

    jobs: list[_TileJob] = []
    for tile, files in found.items():
        try:
            validate_tile_id(tile)
        except ValueError as err:
            summary.failed[tile] = str(err)
            continue
        if store.has_tile(tile):
            summary.skipped.append(tile)
            continue
        if catalog_error is not None:
            summary.failed[tile] = catalog_error
            continue
        rows_here = None
        if per_tile_rows is not None:
            rows_here = per_tile_rows.get(tile)
            if rows_here is None:  # no catalogue rows for this tile: an empty catalogue
                rows_here = {c: np.zeros(0, dtype=np.float64) for c in needed_cols}
                rows_here[p.catalog_columns["id"]] = np.zeros(0, dtype=np.int64)
        jobs.append(
            _TileJob(
                tile=tile,
                files=dict(files),
                bands=tuple(use_bands),
                preset=p,
                expected_shape_yx=shape,  # type: ignore[arg-type]
                out=out,
                storage_options=dict(storage_options) if storage_options else None,
                source_storage_options=src_opts or None,
                catalog_file=catalog,
                catalog_rows=rows_here,
                chunk_pix=chunk_pix,
                shard_pix=shard_pix,
            )
        )

    for res in _run_jobs(jobs, client=client, n_workers=n_workers, source=source, out=out):
        summary.bytes_read += res.bytes_read
        if res.ok:
            summary.ingested.append(res.tile)
            summary.n_sources[res.tile] = res.n_sources
            summary.dropped_outside[res.tile] = res.dropped
        else:
            summary.failed[res.tile] = res.message
    summary.ingested.sort()
    if summary.ingested:
        open_survey(out, storage_options, mode="a").consolidate_index()
    summary.seconds = time.perf_counter() - t0
    return summary


def _run_jobs(
    jobs: list[_TileJob], *, client: Any, n_workers: int | None, source: str, out: str
) -> list[_TileResult]:
    if not jobs:
        return []
    if isinstance(client, str):
        if client != "sync":
            raise ValueError(f"client must be a distributed.Client, 'sync' or None, got {client!r}")
        return [_ingest_tile(job) for job in jobs]
    from distributed import Client, LocalCluster, as_completed

    own = None
    if client is None:
        in_process = "memory" in (_protocol(source), _protocol(out))
        workers = n_workers or max(1, min(len(jobs), os.cpu_count() or 1))
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=not in_process,
            dashboard_address=":0",
        )
        own = (cluster, Client(cluster))
        client = own[1]
    try:
        futures = {
            client.submit(
                _ingest_tile, job, pure=False, key=f"ingest-{job.tile}-{os.urandom(4).hex()}"
            ): job
            for job in jobs
        }
        results = []
        for fut in as_completed(futures):
            job = futures[fut]
            try:
                results.append(fut.result())
            except Exception as err:  # e.g. the worker died (out of memory)
                results.append(
                    _TileResult(job.tile, False, f"task failed: {type(err).__name__}: {err}")
                )
        return results
    finally:
        if own is not None:
            own[1].close()
            own[0].close()


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_ingest_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``lenscan ingest`` arguments to ``parser`` (a sub-command parser)."""
    parser.add_argument("source", help="folder or fsspec URL with the tile FITS files")
    parser.add_argument("out", help="survey store URL to create or add to")
    parser.add_argument("--preset", default="des-dr2", help="ingest preset name or YAML file")
    parser.add_argument(
        "--catalog",
        required=True,
        help="catalogue file (FITS or Parquet) or a template with {tilename} (one per tile)",
    )
    parser.add_argument("--tiles", default=None, help="comma-separated tile names (default: all)")
    parser.add_argument("--bands", default=None, help="comma-separated bands (default: found)")
    parser.add_argument(
        "--shape",
        default="preset",
        help="expected image shape NYxNX, 'any', or 'preset' (default: the preset's)",
    )
    parser.add_argument("--scheduler", default=None, help="Dask scheduler address (default: local)")
    parser.add_argument("--workers", type=int, default=None, help="local Dask worker processes")
    parser.add_argument("--sync", action="store_true", help="run tiles one by one in-process")
    parser.add_argument("--chunk-pix", type=int, default=128)
    parser.add_argument("--shard-pix", type=int, default=2048)
    parser.add_argument(
        "--storage-options", default=None, help="JSON fsspec options for OUT (e.g. credentials)"
    )
    parser.add_argument(
        "--source-storage-options", default=None, help="JSON fsspec options for SOURCE/CATALOG"
    )
    return parser


def _parse_shape(text: str) -> tuple[int, int] | str | None:
    if text in ("preset", "any"):
        return None if text == "any" else "preset"
    m = re.fullmatch(r"\s*(\d+)\s*[xX,]\s*(\d+)\s*", text)
    if not m:
        raise ValueError(f"--shape must be NYxNX, 'any' or 'preset', got {text!r}")
    return int(m.group(1)), int(m.group(2))


def _parse_json(text: str | None, flag: str) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{flag} must be a JSON object ({err})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag} must be a JSON object, got {text!r}")
    return value


def run_ingest_cli(args: argparse.Namespace) -> int:
    """Run ``lenscan ingest`` from parsed arguments; print the summary.

    Returns
    -------
    int
        0 if every tile was ingested or skipped, 1 if some tile failed, 2 on bad arguments.
    """
    import sys

    try:
        client: Any = "sync" if args.sync else None
        if args.scheduler:
            from distributed import Client

            client = Client(args.scheduler)
        summary = ingest(
            args.source,
            args.out,
            preset=args.preset,
            catalog=args.catalog,
            client=client,
            storage_options=_parse_json(args.storage_options, "--storage-options"),
            source_storage_options=_parse_json(
                args.source_storage_options, "--source-storage-options"
            ),
            tiles=args.tiles.split(",") if args.tiles else None,
            bands=args.bands.split(",") if args.bands else None,
            expected_shape_yx=_parse_shape(args.shape),
            chunk_pix=args.chunk_pix,
            shard_pix=args.shard_pix,
            n_workers=args.workers,
        )
    except (ValueError, FileNotFoundError, NotADirectoryError, FileExistsError) as err:
        print(f"lenscan ingest: error: {err}", file=sys.stderr)
        return 2
    print(summary)
    return 0 if summary.ok else 1
