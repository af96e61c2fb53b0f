"""Sky catalogues: reading any sky table, the known-lens catalogue, matching, HATS output.

Every published search ends by matching its candidates with the lenses already known, and on real
data the known lenses recovered are the only completeness a search can measure. This module

* reads any sky table (FITS, Parquet, CSV, ECSV, VOTable, or a HATS catalogue) with its RA/Dec
  columns found by name (:func:`read_sky_table`);
* ships the lenscat catalogue (Vujeva et al. 2024, MIT licence; a snapshot of ``lenscat`` 1.1.3
  from PyPI with 32,838 lenses and candidates) as the default known-lens list
  (:func:`load_known_lenses`);
* flags candidates that are known (:func:`flag_known`) and matches candidates with any other
  catalogue (:func:`crossmatch_catalog`; lsdb's crossmatch when the other side is HATS);
* writes HATS catalogues of the candidates or the scored rows (:func:`write_hats`,
  :func:`scored_to_hats`) for lsdb.

The report of how many known lenses a sweep recovered is :mod:`lenscan.crossmatch`.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import warnings
from collections.abc import Iterator, Mapping, Sequence
from importlib.resources import files
from typing import Any

import fsspec
import numpy as np
import pyarrow.parquet as pq
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.table import Table

from lenscan._secrets import safe_url

__all__ = [
    "DEFAULT_KNOWN_RADIUS_ARCSEC",
    "KNOWN_COLUMNS",
    "KNOWN_LENSES_DEFAULT",
    "crossmatch_catalog",
    "flag_known",
    "is_hats",
    "known_summary",
    "load_known_lenses",
    "nearest_within",
    "quiet_hats",
    "read_sky_table",
    "scored_to_hats",
    "write_hats",
]

#: The known-lens catalogue a scan flags its candidates with unless told otherwise.
KNOWN_LENSES_DEFAULT = "lenscat"
#: Match radius for known lenses: published positions are the lens galaxy's to ~0.1-1".
DEFAULT_KNOWN_RADIUS_ARCSEC = 3.0
#: Columns :func:`flag_known` adds to a candidate table.
KNOWN_COLUMNS = ("known_name", "known_type", "known_grading", "known_ref", "known_sep_arcsec")

_LENSCAT = "lenscat-1.1.3.parquet"
_RA_NAMES = ("ra", "ra_deg", "ra [deg]", "raj2000", "_raj2000", "ra_icrs", "coord_ra",
             "right_ascension", "alpha_j2000", "radeg", "ra_j2000")  # fmt: skip
_DEC_NAMES = ("dec", "dec_deg", "dec [deg]", "dej2000", "_dej2000", "decj2000", "de_icrs",
              "dec_icrs", "coord_dec", "declination", "delta_j2000", "dedeg",
              "dec_j2000")  # fmt: skip
_KNOWN_FIELDS = {
    "name": ("name", "id", "object", "system", "lens", "object_id", "objectid"),
    "type": ("type", "lens_type", "kind"),
    "grading": ("grading", "grade", "class", "quality"),
    "ref": ("ref", "reference", "bibcode", "source"),
}
_FORMATS = {".fits": "fits", ".fit": "fits", ".fz": "fits", ".parquet": "parquet",
            ".pq": "parquet", ".csv": "ascii.csv", ".ecsv": "ascii.ecsv", ".xml": "votable",
            ".vot": "votable", ".votable": "votable"}  # fmt: skip


def nearest_within(
    ra: np.ndarray, dec: np.ndarray, ra_cat: np.ndarray, dec_cat: np.ndarray, radius_arcsec: float
) -> tuple[np.ndarray, np.ndarray]:
    """For each position, the nearest catalogue row within ``radius_arcsec`` (-1 where none).

    Returns
    -------
    index : ndarray of int64
        Row of the catalogue, or -1.
    sep_arcsec : ndarray of float64
        Separation to it (NaN where there is none).

    Examples
    --------
    >>> nearest_within(np.array([10.0, 50.0]), np.array([0.0, 0.0]),
    ...                np.array([10.0, 10.0005]), np.array([0.0, 0.0]), 1.0)[0].tolist()
    [0, -1]
    """
    n = len(ra)
    index, sep = np.full(n, -1, np.int64), np.full(n, np.nan)
    if n == 0 or len(ra_cat) == 0:
        return index, sep
    here = SkyCoord(np.asarray(ra, float) * u.deg, np.asarray(dec, float) * u.deg)
    there = SkyCoord(np.asarray(ra_cat, float) * u.deg, np.asarray(dec_cat, float) * u.deg)
    idx, d2d, _ = here.match_to_catalog_sky(there)
    near = d2d.to_value(u.arcsec) <= radius_arcsec
    index[near], sep[near] = idx[near], d2d.to_value(u.arcsec)[near]
    return index, sep


def is_hats(source: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Whether ``source`` is a HATS catalogue or collection (``hats.properties`` or
    ``collection.properties`` in the folder)."""
    fs, path = fsspec.core.url_to_fs(source, **(storage_options or {}))
    if not fs.isdir(path):
        return False
    return any(
        fs.exists(posixpath.join(path, f)) for f in ("hats.properties", "collection.properties")
    )


def read_sky_table(
    source: str | os.PathLike[str] | Table,
    *,
    ra: str | None = None,
    dec: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Table:
    """A table with sky positions, as float64 degree columns ``ra`` and ``dec``.

    Parameters
    ----------
    source : str, path or Table
        FITS, Parquet, CSV, ECSV or VOTable file (by suffix), a HATS catalogue folder, or a table.
    ra, dec : str, optional
        Column names; by default the first of the usual spellings (``ra``, ``RAJ2000``,
        ``RA [deg]``, ``coord_ra``, ``RIGHT_ASCENSION``, ... case-insensitive).
    storage_options : mapping, optional
        fsspec options for a remote ``source``.
    """
    table = source if isinstance(source, Table) else _read_any(str(source), storage_options)
    name = source if isinstance(source, str | os.PathLike) else "the table"
    ra_col = ra or _find_column(table, _RA_NAMES, name, "RA")
    dec_col = dec or _find_column(table, _DEC_NAMES, name, "Dec")
    out = Table(table, copy=False)
    for std, col in (("ra", ra_col), ("dec", dec_col)):
        if col not in table.colnames:
            raise ValueError(f"{name}: no column {col!r}; columns are {table.colnames}")
        values = table[col]
        unit = getattr(values, "unit", None)
        try:
            deg = (values.quantity.to_value(u.deg) if unit is not None and unit != ""
                   else np.asarray(values, dtype=float))  # fmt: skip
        except (ValueError, TypeError, u.UnitConversionError) as err:
            raise ValueError(f"{name}: column {col!r} is not a number of degrees ({err})") from err
        if col != std and std in out.colnames:
            out.rename_column(std, f"{std}_orig")
        out[std] = np.asarray(deg, np.float64)
    return out


def _read_any(source: str, storage_options: Mapping[str, Any] | None) -> Table:
    if is_hats(source, storage_options):
        lsdb = _lsdb()
        with quiet_hats():
            frame = lsdb.open_catalog(source, storage_options=dict(storage_options or {}))
            frame = frame.compute()
        return Table.from_pandas(frame.reset_index(drop=True))
    suffix = os.path.splitext(source.rstrip("/").removesuffix(".gz"))[1].lower()
    fmt = _FORMATS.get(suffix)
    if fmt is None:
        raise ValueError(
            f"{source}: cannot tell the table format from the suffix {suffix!r}; use one of "
            f"{sorted(_FORMATS)} or a HATS catalogue folder"
        )
    with fsspec.open(source, "rb", **(storage_options or {})) as fh:
        return Table.read(fh, format=fmt)


def _find_column(table: Table, names: Sequence[str], source: Any, what: str) -> str:
    by_lower = {c.lower(): c for c in table.colnames}
    for candidate in names:
        if candidate in by_lower:
            return by_lower[candidate]
    raise ValueError(
        f"{source}: no {what} column among {table.colnames} (looked for {list(names)}); "
        f"name it with --ra/--dec"
    )


def load_known_lenses(
    source: str | os.PathLike[str] | Table = KNOWN_LENSES_DEFAULT,
    *,
    ra: str | None = None,
    dec: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Table:
    """Known lenses with ``name``, ``type``, ``grading``, ``ref``, ``ra``, ``dec``.

    ``"lenscat"`` is the bundled lenscat snapshot; anything else is read by
    :func:`read_sky_table`, and its name, type, grading and reference columns are found by their
    usual names (filled with ``""`` where the table has none; an unnamed lens is named by its
    position).
    """
    if isinstance(source, str) and source == KNOWN_LENSES_DEFAULT:
        path = files("lenscan").joinpath("data", "known_lenses", _LENSCAT)
        arrow = pq.read_table(str(path))
        # Object columns: fixed-width unicode would take 200 MB for the longest reference.
        table = Table({c: arrow[c].to_numpy(zero_copy_only=False) for c in arrow.column_names})
        table.meta = {"known_lenses": "lenscat 1.1.3 (bundled snapshot, MIT licence)"}
        return table
    table = read_sky_table(source, ra=ra, dec=dec, storage_options=storage_options)
    out = Table({"ra": table["ra"], "dec": table["dec"]})
    for std, names in _KNOWN_FIELDS.items():
        col = next((c for c in table.colnames if c.lower() in names and c not in ("ra", "dec")),
                   None)  # fmt: skip
        out[std] = [str(v) for v in table[col]] if col else [""] * len(table)
    unnamed = np.array([not n for n in out["name"]], bool)
    if unnamed.any():
        out["name"] = [
            f"J{r:.5f}{d:+.5f}" if blank else n
            for n, r, d, blank in zip(out["name"], out["ra"], out["dec"], unnamed, strict=True)
        ]
    out.meta = {"known_lenses": safe_url(str(source))}  # recorded in shared tables
    return out


def flag_known(
    candidates: Table, known: Table, *, radius_arcsec: float = DEFAULT_KNOWN_RADIUS_ARCSEC
) -> Table:
    """Add :data:`KNOWN_COLUMNS` to ``candidates`` (in place; returned for chaining).

    A candidate within ``radius_arcsec`` of a known lens takes the nearest one's name, type,
    grading and reference, and the separation; the others get empty strings and NaN.
    """
    index, sep = nearest_within(
        candidates["ra"], candidates["dec"], known["ra"], known["dec"], radius_arcsec
    )
    hit = index >= 0
    for col, src in zip(KNOWN_COLUMNS[:4], ("name", "type", "grading", "ref"), strict=True):
        values = np.full(len(candidates), "", dtype=object)
        values[hit] = [str(known[src][i]) for i in index[hit]]
        candidates[col] = values.astype(str)
    candidates["known_sep_arcsec"] = sep.astype(np.float32)
    candidates.meta["known_lenses"] = known.meta.get("known_lenses", "a user catalogue")
    candidates.meta["known_radius_arcsec"] = float(radius_arcsec)
    return candidates


def known_summary(candidates: Table) -> dict[str, Any]:
    """How many candidates are known, and how many new (for the run's summary)."""
    known = int(np.count_nonzero(np.asarray(candidates["known_name"], str) != ""))
    return {
        "catalogue": candidates.meta.get("known_lenses"),
        "radius_arcsec": candidates.meta.get("known_radius_arcsec"),
        "n_known": known,
        "n_new": len(candidates) - known,
    }


def crossmatch_catalog(
    candidates: Table,
    catalog: str | os.PathLike[str] | Table,
    *,
    radius_arcsec: float = 1.0,
    suffix: str = "_cat",
    ra: str | None = None,
    dec: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Table:
    """Every candidate with the nearest row of ``catalog`` within ``radius_arcsec``.

    The catalogue's columns are added with ``suffix`` and the separation as
    ``sep{suffix}_arcsec`` (NaN, and empty or masked values, where nothing matched). A HATS
    catalogue is matched by lsdb (partition by partition); a table by astropy.
    """
    if not isinstance(catalog, Table) and is_hats(str(catalog), storage_options):
        return _crossmatch_hats(candidates, str(catalog), radius_arcsec, suffix, storage_options)
    other = read_sky_table(catalog, ra=ra, dec=dec, storage_options=storage_options)
    index, sep = nearest_within(
        candidates["ra"], candidates["dec"], other["ra"], other["dec"], radius_arcsec
    )
    out = Table(candidates, copy=True)
    hit = index >= 0
    for col in other.colnames:
        values = other[col][np.where(hit, index, 0)]
        column = Table.Column(values) if not hasattr(values, "mask") else values
        out[f"{col}{suffix}"] = Table.MaskedColumn(column, mask=~hit)
    out[f"sep{suffix}_arcsec"] = sep
    return out


def _crossmatch_hats(
    candidates: Table,
    catalog: str,
    radius_arcsec: float,
    suffix: str,
    storage_options: Mapping[str, Any] | None,
) -> Table:
    lsdb = _lsdb()
    frame = Table(candidates, copy=True)
    frame["_row"] = np.arange(len(frame))
    with quiet_hats():
        matched = _lsdb_crossmatch(lsdb, frame, catalog, radius_arcsec, suffix, storage_options)
        matched = matched.sort_values("_row").reset_index(drop=True).drop(columns=["_row"])
    out = Table.from_pandas(matched)
    if "_dist_arcsec" in out.colnames:
        out.rename_column("_dist_arcsec", f"sep{suffix}_arcsec")
    return out


def _lsdb_crossmatch(
    lsdb: Any,
    frame: Table,
    catalog: str,
    radius_arcsec: float,
    suffix: str,
    storage_options: Mapping[str, Any] | None,
) -> Any:
    left = lsdb.from_dataframe(_plain(frame).to_pandas(), ra_column="ra", dec_column="dec")
    right = lsdb.open_catalog(catalog, storage_options=dict(storage_options or {}))
    matched = left.crossmatch(right, n_neighbors=1, radius_arcsec=radius_arcsec, how="left",
                              suffixes=("", suffix))  # fmt: skip
    return matched.compute()


def _lsdb() -> Any:
    """lsdb, imported without the pandas deprecation warning its dependencies raise at import."""
    with quiet_hats():
        import lsdb
    return lsdb


@contextlib.contextmanager
def quiet_hats() -> Iterator[None]:
    """Silence the pandas-3 deprecation warnings that lsdb, nested-pandas and hats raise.

    They are about those packages' own calls (``inplace=``, a removed pandas option), not about
    anything a lenscan user can change.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The 'mode.chained_assignment' option")
        warnings.filterwarnings("ignore", message="The inplace keyword")
        warnings.filterwarnings("ignore", module=r"(lsdb|nested_pandas|hats|hats_import)\b")
        yield


def _plain(table: Table) -> Table:
    """A copy without object columns that pandas/lsdb cannot take (keeps numbers and str)."""
    out = Table(table, copy=True)
    out.meta = {}
    return out


def _upath(url: str, storage_options: Mapping[str, Any] | None) -> Any:
    """``url`` as the UPath lsdb writes to, carrying the fsspec options of a remote store."""
    from upath import UPath

    return UPath(url, **dict(storage_options or {}))


def write_hats(
    table: Table,
    url: str,
    *,
    name: str = "candidates",
    storage_options: Mapping[str, Any] | None = None,
) -> str:
    """Write ``table`` (with ``ra``/``dec``) as a HATS catalogue at ``url``; return the URL.

    ``lsdb.open_catalog(url)`` reads it back. For the scored rows of a whole sweep use
    :func:`scored_to_hats`, which runs hats-import on the sweep's Dask client.
    """
    lsdb = _lsdb()
    frame = _plain(table).to_pandas()
    with quiet_hats():
        catalog = lsdb.from_dataframe(frame, ra_column="ra", dec_column="dec")
        catalog.write_catalog(_upath(url, storage_options), catalog_name=name, overwrite=True,
                              progress_bar=False)  # fmt: skip
    return url


def scored_to_hats(
    out: str, client: Any, *, storage_options: Mapping[str, Any] | None = None
) -> str:
    """Import every scored row under ``OUT/scored/`` into the HATS catalogue ``OUT/scored.hats``.

    Uses hats-import's pipeline on ``client`` (the sweep's own Dask cluster), so the rows
    (10^8-10^9 for LSST) are never gathered on the client.
    """
    from hats_import.catalog.arguments import ImportArguments
    from hats_import.pipeline import pipeline_with_client

    from lenscan._io import list_fresh

    fs, path = fsspec.core.url_to_fs(out, **(storage_options or {}))
    parts = [
        fs.unstrip_protocol(p)
        for p in list_fresh(fs, posixpath.join(path, "scored"))
        if posixpath.basename(p).startswith("tile-") and p.endswith(".parquet")
    ]
    if not parts:
        raise ValueError(f"{out}: no scored parts under scored/ to import")
    args = ImportArguments(
        output_path=out, output_artifact_name="scored.hats", input_file_list=parts,
        file_reader="parquet", ra_column="ra", dec_column="dec", progress_bar=False,
        resume=False, tmp_dir=posixpath.join(out, ".hats-tmp"),
    )  # fmt: skip
    with quiet_hats():
        pipeline_with_client(args, client)
    return posixpath.join(out.rstrip("/"), "scored.hats")
