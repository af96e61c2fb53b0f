"""Catalogue side of ingest: reading FITS / Parquet catalogues and placing rows on a tile."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import fsspec
import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from lenscan.survey.ingest.presets import IngestPreset

__all__ = [
    "CATALOG_EXTENSIONS",
    "TileInputError",
    "catalog_for_tile",
    "is_parquet",
    "needed_catalog_columns",
    "place_sources",
    "read_catalog_file",
]

#: Catalogue file extensions understood by ingest.
CATALOG_EXTENSIONS = (".fits", ".fit", ".fits.gz", ".parquet", ".pq")


class TileInputError(ValueError):
    """Bad input for one tile (the message names the file)."""


def needed_catalog_columns(preset: IngestPreset, bands: Sequence[str]) -> list[str]:
    """The survey catalogue columns ingest reads for ``bands`` (ids, positions, mags, flags)."""
    cols = [preset.catalog_columns[k] for k in ("id", "ra", "dec")]
    if "extended_class" in preset.catalog_columns:
        cols.append(preset.catalog_columns["extended_class"])
    for b in bands:
        cols += [preset.band_column("mag", b), preset.band_column("magerr", b)]
        if preset.catalog_flag_columns:
            cols.append(preset.band_column("flags", b))
    return cols


def is_parquet(path: str) -> bool:
    """True if ``path`` names a Parquet file (by extension)."""
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
        if is_parquet(p):
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
    if tile is not None and tile_column is not None and not is_parquet(p):
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


def catalog_for_tile(
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
) -> tuple[dict[str, np.ndarray], int, int]:
    """Add 0-based pixel ``x``, ``y`` from ``wcs`` and drop rows outside the tile.

    A row is inside when ``-0.5 <= x < nx - 0.5`` and likewise for ``y`` (its pixel exists).
    Rows without finite RA/Dec are dropped too, and counted apart: they are not outside the
    tile, they have no position at all (a catalogue problem to fix, not an overlap).

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
        inside = finite & (x >= -0.5) & (x < nx - 0.5) & (y >= -0.5) & (y < ny - 0.5)
    out = {c: np.asarray(v)[inside] for c, v in catalog.items()}
    out["x"] = x[inside]
    out["y"] = y[inside]
    return out, int((finite & ~inside).sum()), int((~finite).sum())
