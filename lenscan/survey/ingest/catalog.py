"""Catalogue side of ingest: reading FITS / Parquet catalogues and placing rows on a tile."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import fsspec
import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from lenscan.survey.formats import TileInputError
from lenscan.survey.ingest.presets import IngestPreset, patch_words

__all__ = [
    "CATALOG_EXTENSIONS",
    "FLUX_UNIT_ZERO_POINTS",
    "NJY_AB_ZERO_POINT",
    "TileInputError",
    "catalog_for_tile",
    "catalog_header_value",
    "catalog_tile_ids",
    "check_catalog_tile",
    "flux_to_mag",
    "glob_catalogs",
    "is_parquet",
    "needed_catalog_columns",
    "place_sources",
    "read_catalog_file",
    "resolve_catalog_glob",
]

#: Catalogue file extensions understood by ingest.
CATALOG_EXTENSIONS = (".fits", ".fit", ".fits.gz", ".parquet", ".pq")

#: AB magnitude of a 1 nJy flux (Rubin: AB = 31.4 - 2.5 log10 f).
NJY_AB_ZERO_POINT = 31.4

#: AB magnitude of a flux of 1 in each catalogue flux unit (Euclid MER: uJy, 23.9).
FLUX_UNIT_ZERO_POINTS = {"nJy": NJY_AB_ZERO_POINT, "uJy": 23.9}


def _band_kinds(preset: IngestPreset) -> tuple[str, str]:
    return ("flux", "fluxerr") if preset.catalog_flux_unit else ("mag", "magerr")


def needed_catalog_columns(preset: IngestPreset, bands: Sequence[str]) -> list[str]:
    """The survey catalogue columns ingest reads for ``bands`` (ids, positions, mags, flags,
    and the tract / patch / primary columns of presets that have them)."""
    cols = [preset.catalog_columns[k] for k in ("id", "ra", "dec")]
    if "extended_class" in preset.catalog_columns:
        cols.append(preset.catalog_columns["extended_class"])
    cols += [*preset.catalog_extra_columns.values(), *preset.catalog_match_columns.values()]
    for extra in (
        preset.catalog_extendedness,
        preset.catalog_tract_column,
        preset.catalog_patch_column,
        preset.catalog_primary_column,
    ):
        if extra:
            cols.append(extra)
    value, error = _band_kinds(preset)
    for b in bands:
        cols += [preset.band_column(value, b), preset.band_column(error, b)]
        if preset.catalog_flag_columns:
            cols.append(preset.band_column("flags", b))
    return cols


def flux_to_mag(
    flux: np.ndarray, flux_err: np.ndarray, zero_point: float = NJY_AB_ZERO_POINT
) -> tuple[np.ndarray, np.ndarray]:
    """Fluxes and errors -> AB magnitudes and errors (float32); nJy unless ``zero_point``
    (the AB magnitude of a flux of 1: :data:`FLUX_UNIT_ZERO_POINTS`) says otherwise.

    A flux that is zero, negative or not finite has no magnitude: NaN (such a source fails
    every colour cut); so does the error of a flux without a finite, non-negative error.

    Examples
    --------
    >>> import numpy as np
    >>> mag, err = flux_to_mag(np.array([1.0, 100.0, 0.0, -5.0]), np.array([0.1, 1, 1, 1]))
    >>> [round(float(m), 3) for m in mag], [round(float(e), 4) for e in err[:2]]
    ([31.4, 26.4, nan, nan], [0.1086, 0.0109])
    """
    f = np.asarray(flux, dtype=np.float64)
    e = np.asarray(flux_err, dtype=np.float64)
    good = np.isfinite(f) & (f > 0)
    mag = np.full(f.shape, np.nan)
    err = np.full(f.shape, np.nan)
    mag[good] = zero_point - 2.5 * np.log10(f[good])
    ok_err = good & np.isfinite(e) & (e >= 0)
    err[ok_err] = 2.5 / np.log(10.0) * e[ok_err] / f[ok_err]
    return mag.astype(np.float32), err.astype(np.float32)


def catalog_tile_ids(raw: Mapping[str, np.ndarray], preset: IngestPreset) -> np.ndarray:
    """The store tile id of every catalogue row (tile column, or tract and patch columns)."""
    if not preset.uses_tract_patch:
        assert preset.catalog_tile_column is not None
        return np.asarray(raw[preset.catalog_tile_column]).astype(str)
    assert preset.catalog_tract_column and preset.catalog_patch_column
    tracts = np.asarray(raw[preset.catalog_tract_column])
    patches = patch_words(raw[preset.catalog_patch_column], preset.catalog_patch_format)
    if tracts.dtype.kind == "f":
        tracts = tracts.astype(np.int64)
    return np.array(
        [preset.tile_id(t, p) for t, p in zip(tracts.tolist(), patches.tolist(), strict=True)],
        dtype=str,
    )


def is_parquet(path: str) -> bool:
    """True if ``path`` names a Parquet file (by extension)."""
    return path.lower().endswith((".parquet", ".pq"))


def read_catalog_file(
    path: str,
    columns: Sequence[str],
    *,
    tile_column: str | None = None,
    tile: str | None = None,
    equals: Sequence[tuple[str, Any]] = (),
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """Read ``columns`` of a FITS or Parquet catalogue, optionally only the rows of one tile.

    Column names match case-insensitively (FITS column names are case-insensitive). String
    columns come back as stripped ``str`` arrays. ``equals`` keeps only rows where each
    ``(column, value)`` holds (pushed down into Parquet reads).

    Raises
    ------
    TileInputError
        If the file cannot be read or lacks a needed column (the message names the file).
    """
    wanted = list(
        dict.fromkeys([*columns, *([tile_column] if tile_column else []), *(c for c, _ in equals)])
    )
    fs, p = fsspec.core.url_to_fs(path, **dict(storage_options or {}))
    try:
        if is_parquet(p):
            import pyarrow.parquet as pq

            schema = pq.read_schema(p, filesystem=fs)
            names = {n.upper(): n for n in schema.names}
            _check_columns(path, wanted, names)
            real = [names[c.upper()] for c in wanted]
            conds = [(names[c.upper()], "==", v) for c, v in equals]
            if tile is not None and tile_column is not None:
                conds.append((names[tile_column.upper()], "==", tile))
            filters = conds or None
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
    if not is_parquet(p):
        pairs = [*equals, *([(tile_column, tile)] if tile is not None and tile_column else [])]
        for col, value in pairs:
            keep = out[col] == value
            out = {c: v[keep] for c, v in out.items()}
    return out


def _check_columns(path: str, wanted: Sequence[str], names: Mapping[str, str]) -> None:
    missing = [c for c in wanted if c.upper() not in names]
    if missing:
        have = sorted(names.values())
        shown = ", ".join(have[:20]) + (f", ... ({len(have)} in all)" if len(have) > 20 else "")
        raise TileInputError(
            f"catalogue {path} lacks column(s) {missing[:8]}{' ...' if len(missing) > 8 else ''}"
            f" needed by the ingest preset{_preset_hint(names)}; it has {shown}"
        )


def _preset_hint(names: Mapping[str, str]) -> str:
    """``" (its columns are those of ingest preset 'hsc-pdr3')"`` when a shipped one fits."""
    from lenscan.survey.ingest.presets import list_ingest_presets, load_ingest_preset

    fits_ = []
    for name in list_ingest_presets():
        p = load_ingest_preset(name)
        # Ids, positions and tile columns tell the surveys apart; bands may be a subset.
        needed = [p.catalog_columns[k] for k in ("id", "ra", "dec")]
        needed += [c for c in (p.catalog_tile_column, p.catalog_tract_column) if c]
        if all(c.upper() in names for c in needed):
            fits_.append(name)
    if not fits_:
        return ""
    return f" (its columns are those of ingest preset(s) {fits_}: pass --preset {fits_[0]}?)"


def catalog_for_tile(
    raw: Mapping[str, np.ndarray], preset: IngestPreset, bands: Sequence[str], source: str
) -> dict[str, np.ndarray]:
    """Map survey columns to lenscan's (without x, y).

    Non-primary rows (the preset's ``primary_column`` false: patch-overlap duplicates) are
    dropped; nJy fluxes become AB magnitudes (:func:`flux_to_mag`); a 0-1 extendedness
    becomes ``extended_class``.
    """
    cm = preset.catalog_columns
    raw = _primary_rows(raw, preset, source)
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
    cat.update(_band_columns(raw, preset, bands))
    cat["extended_class"] = _extended_class(raw, preset, n)
    cat.update(_extra_columns(raw, preset, source))
    return cat


def _extra_columns(
    raw: Mapping[str, np.ndarray], preset: IngestPreset, source: str
) -> dict[str, np.ndarray]:
    """The preset's extra columns (numbers, as they are) and match flags (1 where an id > 0)."""
    out: dict[str, np.ndarray] = {}
    for name, col in preset.catalog_extra_columns.items():
        v = np.asarray(raw[col])
        if v.dtype.kind not in "biuf":
            raise TileInputError(f"catalogue {source}: column {col} must be numeric, got {v.dtype}")
        out[name] = v.astype(np.float64) if v.dtype.kind == "f" else v
    for name, col in preset.catalog_match_columns.items():
        v = np.asarray(raw[col])
        if v.dtype.kind not in "iuf":
            raise TileInputError(f"catalogue {source}: column {col} must hold ids, got {v.dtype}")
        with np.errstate(invalid="ignore"):
            out[name] = (np.isfinite(v.astype(np.float64)) & (v > 0)).astype(np.int8)
    return out


def _primary_rows(
    raw: Mapping[str, np.ndarray], preset: IngestPreset, source: str
) -> Mapping[str, np.ndarray]:
    col = preset.catalog_primary_column
    if not col:
        return raw
    flag = np.asarray(raw[col])
    if flag.dtype.kind not in "biu" and flag.size:
        raise TileInputError(f"catalogue {source}: column {col} must be boolean, got {flag.dtype}")
    keep = flag.astype(bool)
    return {c: np.asarray(v)[keep] for c, v in raw.items()}


def _band_columns(
    raw: Mapping[str, np.ndarray], preset: IngestPreset, bands: Sequence[str]
) -> dict[str, np.ndarray]:
    n = len(raw[preset.catalog_columns["id"]])
    out: dict[str, np.ndarray] = {}
    flags = np.zeros(n, dtype=np.int32)
    value, error = _band_kinds(preset)
    for b in bands:
        v = np.asarray(raw[preset.band_column(value, b)], dtype=np.float64)
        e = np.asarray(raw[preset.band_column(error, b)], dtype=np.float64)
        if preset.catalog_flux_unit:
            zp = FLUX_UNIT_ZERO_POINTS[preset.catalog_flux_unit]
            out[f"mag_{b}"], out[f"magerr_{b}"] = flux_to_mag(v, e, zp)
        else:
            out[f"mag_{b}"], out[f"magerr_{b}"] = v.astype(np.float32), e.astype(np.float32)
        if preset.catalog_flag_columns:
            flags |= np.asarray(raw[preset.band_column("flags", b)]).astype(np.int32)
    out["flags"] = flags
    return out


def _extended_class(raw: Mapping[str, np.ndarray], preset: IngestPreset, n: int) -> np.ndarray:
    cm = preset.catalog_columns
    if "extended_class" in cm:
        return np.asarray(raw[cm["extended_class"]]).astype(np.int16)
    if preset.catalog_extendedness:
        ext = np.asarray(raw[preset.catalog_extendedness], dtype=np.float64)
        cls = np.where(ext >= 0.5, 3, 0).astype(np.int16)
        cls[~np.isfinite(ext)] = -9
        return cls
    return np.full(n, -9, dtype=np.int16)


def glob_catalogs(path: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """The files a catalogue path with ``*`` names, sorted (none is an error naming it)."""
    fs, p = fsspec.core.url_to_fs(path, **dict(storage_options or {}))
    try:
        matches = sorted(fs.glob(p))
    except Exception as err:
        raise TileInputError(f"catalogue {path}: cannot list ({err})") from None
    if not matches:
        raise TileInputError(f"catalogue {path}: no file matches")
    return [str(fs.unstrip_protocol(m)) for m in matches]


def resolve_catalog_glob(path: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """The one file a per-tile catalogue path with ``*`` names (Euclid:
    ``..._TILE<tile>-*.fits``); of several, the last in name order (the newest timestamp)."""
    return glob_catalogs(path, storage_options)[-1]


def catalog_header_value(
    path: str, key: str, storage_options: Mapping[str, Any] | None = None
) -> str | None:
    """Header ``key`` of a FITS catalogue (any HDU; the first found), or None (Parquet too)."""
    if is_parquet(path):
        return None
    fs, p = fsspec.core.url_to_fs(path, **dict(storage_options or {}))
    try:
        with fs.open(p, "rb") as f, fits.open(f, memmap=False, lazy_load_hdus=True) as hdul:
            values = [h.header[key] for h in hdul if key in h.header]
    except Exception as err:
        raise TileInputError(f"catalogue {path} could not be read: {err}") from None
    return str(values[0]).strip() if values else None


def check_catalog_tile(
    path: str, preset: IngestPreset, tile: str, storage_options: Mapping[str, Any] | None = None
) -> None:
    """Fail when a per-tile FITS catalogue's header names another tile (``TILEID``)."""
    key = preset.catalog_tile_keyword
    value = catalog_header_value(path, key, storage_options) if key else None
    if value is not None and value != tile:
        raise TileInputError(
            f"catalogue {path}: header {key}={value} but it was given for tile {tile}: "
            "the catalogue of another tile"
        )


def place_sources(
    catalog: Mapping[str, np.ndarray],
    wcs: WCS,
    shape_yx: tuple[int, int],
    *,
    margin: int = 0,
) -> tuple[dict[str, np.ndarray], int, int]:
    """Add 0-based pixel ``x``, ``y`` from ``wcs`` and drop rows outside the tile.

    A row is inside when ``-0.5 + margin <= x < nx - 0.5 - margin`` and likewise for ``y``
    (its pixel exists; ``margin`` > 0 keeps only the inner footprint of overlapping tiles, so
    a catalogue spanning several tiles gives each object to one tile). Rows without finite
    RA/Dec are dropped too, and counted apart: they are not outside the tile, they have no
    position at all (a catalogue problem to fix, not an overlap).

    Returns
    -------
    catalog : dict
        The kept rows with ``x`` and ``y`` added.
    n_outside : int
        Rows with a valid position outside the tile.
    n_no_coords : int
        Rows without finite RA/Dec.
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
        lo, hx, hy = margin - 0.5, nx - 0.5 - margin, ny - 0.5 - margin
        inside = finite & (x >= lo) & (x < hx) & (y >= lo) & (y < hy)
    out = {c: np.asarray(v)[inside] for c, v in catalog.items()}
    out["x"] = x[inside]
    out["y"] = y[inside]
    return out, int((finite & ~inside).sum()), int((~finite).sum())
