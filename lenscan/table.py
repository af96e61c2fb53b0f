"""The candidate table: its class, format conversions and writers.

The scan's reduce (:mod:`lenscan.sweep.reduce`) builds the table; this module writes it in every
output format and reads it back.
"""

from __future__ import annotations

import io
import json
import posixpath
from collections.abc import Mapping, Sequence
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from astropy.io import fits
from astropy.table import Table

from lenscan._io import atomic_write_bytes
from lenscan._secrets import scrub

# Moved to lenscan.metrics; kept importable from here for existing callers.
from lenscan.metrics import recall_against_truth as recall_against_truth

__all__ = [
    "COLUMN_DESCRIPTIONS",
    "COLUMN_UCDS",
    "COLUMN_UNITS",
    "TABLE_FORMATS",
    "CandidateTable",
    "annotate_columns",
    "arrow_to_table",
    "column_ucd",
    "read_parquet_table",
    "recall_against_truth",
    "table_to_arrow",
    "write_table",
]


class CandidateTable(Table):
    """An astropy Table of ranked lens candidates, with writers for every output format."""

    def write_all(
        self,
        out: str,
        *,
        formats: Sequence[str] = ("parquet", "fits"),
        storage_options: Mapping[str, Any] | None = None,
        stem: str = "candidates",
    ) -> list[str]:
        """Write ``OUT/{stem}.{ext}`` for each format, each atomically; return the URLs."""
        written = []
        for fmt in formats:
            url = posixpath.join(out.rstrip("/"), f"{stem}.{_EXTENSIONS[fmt]}")
            if fmt == "hats":
                from lenscan.catalogs import write_hats

                write_hats(self, url, name=stem, storage_options=storage_options)
            else:
                write_table(self, url, fmt, storage_options=storage_options)
            written.append(url)
        return written

    def _repr_html_(self) -> str:
        """The top rows with colour thumbnails cut from the survey (Jupyter shows this)."""
        from lenscan.plot import candidates_html

        return candidates_html(self)


_FITS_KEYWORDS = {
    "LSVERS": "lenscan_version",
    "MODEL": "model_name",
    "MODELSHA": "model_sha256",
    "SURVEY": "survey_url",
    "THRESH": "threshold",
}
_EXTENSIONS = {
    "parquet": "parquet",
    "fits": "fits",
    "votable": "vot.xml",
    "ecsv": "ecsv",
    "hats": "hats",  # a HATS catalogue folder (lenscan[hats]), read by lsdb.open_catalog
}
#: Output formats the candidate table can be written in (README lists the columns).
TABLE_FORMATS = tuple(_EXTENSIONS)


def write_table(
    table: Table, url: str, fmt: str, *, storage_options: Mapping[str, Any] | None = None
) -> None:
    """Serialise ``table`` in ``fmt`` (parquet, fits, votable, ecsv) to ``url`` atomically.

    Columns carry units (deg, mag, pix) and descriptions in every format, UCDs in VOTable (and as
    ``TUCDn`` cards in FITS, as TOPCAT writes them); in VOTable ``ra`` and ``dec`` refer to an
    ICRS ``COOSYS``. The table's ``meta`` (provenance) becomes INFO elements in VOTable, FITS
    header cards, and astropy-readable Parquet metadata. Text columns (``tile``) are character
    columns: FITS has no Unicode type, so astropy reads them as bytes unless asked,
    ``Table.read(url, character_as_bytes=False)``; element access gives ``str`` either way.
    """
    if fmt not in _EXTENSIONS:
        raise ValueError(f"unknown table format {fmt!r}; known: {sorted(_EXTENSIONS)}")
    buf = io.BytesIO()
    plain = annotate_columns(_fixed_width_strings(Table(table, copy=True)))
    plain.meta = _plain_meta(table.meta)
    if fmt == "parquet":
        pq.write_table(table_to_arrow(plain), buf)
    elif fmt == "fits":
        _fits_hdul(plain).writeto(buf)
    elif fmt == "votable":
        _votable(plain).to_xml(buf)
    else:
        text = io.StringIO()
        plain.write(text, format="ascii.ecsv")
        buf.write(text.getvalue().encode())
    atomic_write_bytes(url, buf.getvalue(), storage_options=storage_options)


def _fixed_width_strings(table: Table) -> Table:
    """Object columns of strings (from pandas, Arrow, lists) as fixed-width ``str``, in place.

    FITS refuses object columns; VOTable and ECSV would keep them as objects. Written as
    character columns (FITS ``nA``), they read back as text everywhere.
    """
    for name in table.colnames:
        col = table[name]
        if col.dtype.kind == "O" and all(isinstance(v, str) for v in col):
            table[name] = np.asarray(col, dtype=str)
    return table


def _plain_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    """``meta`` as plain JSON types (YAML, FITS and VOTable writers refuse numpy scalars).

    Scrubbed too (URLs without user info or signatures, no known secret): every table format
    writes its meta through here, and tables are shared.
    """
    return scrub(json.loads(json.dumps(dict(meta), default=str)))


#: Units of candidate and scored table columns, by exact name or ``prefix_`` for families.
COLUMN_UNITS = {"ra": "deg", "dec": "deg", "x": "pix", "y": "pix", "mag_": "mag",
                "magerr_": "mag", "colour_": "mag", "known_sep_arcsec": "arcsec"}  # fmt: skip
#: UCD1+ words of the columns. Bands map to the UCD spectral words as VizieR does for SDSS/DES
#: (g -> em.opt.B, r -> em.opt.R, i/z/Y -> em.opt.I): UCD1+ has no em.opt.g.
COLUMN_UCDS = {
    "rank": "meta.number", "tile": "meta.id.parent", "id": "meta.id",
    "ra": "pos.eq.ra;meta.main", "dec": "pos.eq.dec;meta.main",
    "x": "pos.cartesian.x;instr.det", "y": "pos.cartesian.y;instr.det",
    "flags": "meta.code.qual", "extended_class": "src.class.starGalaxy", "edge": "meta.code",
    "masked_fraction": "meta.code.qual;arith.ratio",
    "score": "stat.probability", "score_m": "stat.probability", "n_detections": "meta.number",
    "mean_grade": "meta.code.class", "n_graders": "meta.number", "grade": "meta.code.class",
    "known_name": "meta.id.cross", "known_type": "src.class", "known_grading": "meta.code.qual",
    "known_ref": "meta.bib", "known_sep_arcsec": "pos.angDistance",
}  # fmt: skip
COLUMN_DESCRIPTIONS = {
    "rank": "rank by score (1 = best)", "tile": "survey tile", "id": "source id in the catalogue",
    "ra": "right ascension (ICRS)", "dec": "declination (ICRS)",
    "x": "stamp centre, 0-based tile pixel column", "y": "stamp centre, 0-based tile pixel row",
    "edge": "stamp padded at a tile edge", "score": "lens probability (ensemble mean)",
    "score_m": "lens probability of one ensemble member",
    "n_detections": "rows merged from overlapping tiles",
    "flags": "catalogue extraction flags (SExtractor FLAGS; 0 = clean)",
    "extended_class": "catalogue star/galaxy class (DES EXTENDED_CLASS: 0 star ... 3 galaxy)",
    "masked_fraction": "fraction of the stamp's in-tile pixels that are masked",
    "known_name": "nearest known lens within the match radius (empty: new)",
    "known_type": "known lens type (galaxy, group, cluster)",
    "known_grading": "known lens grading (lenscat: confident, probable)",
    "known_ref": "reference of the known lens",
    "known_sep_arcsec": "separation to the known lens (arcsec)",
}  # fmt: skip
_BAND_UCD = {"u": "em.opt.U", "g": "em.opt.B", "r": "em.opt.R", "i": "em.opt.I", "z": "em.opt.I",
             "y": "em.opt.I", "Y": "em.opt.I"}  # fmt: skip


def _lookup(mapping: Mapping[str, str], name: str) -> str | None:
    if name in mapping:
        return mapping[name]
    for key, value in mapping.items():
        if key.endswith(("_", "_m")) and name.startswith(key):
            return value
    return None


def column_ucd(name: str) -> str | None:
    """The UCD of a candidate-table column (``None`` when there is no fitting word)."""
    for prefix, word in (("mag_", "phot.mag"), ("magerr_", "stat.error;phot.mag")):
        if name.startswith(prefix):
            band = _BAND_UCD.get(name[len(prefix) :])
            return f"{word};{band}" if band else word
    if name.startswith("colour_"):
        return "phot.color"
    return _lookup(COLUMN_UCDS, name)


def _family_description(name: str) -> str | None:
    """Descriptions of the per-band columns: ``mag_g``, ``magerr_g``, ``colour_g_r``."""
    if name.startswith("mag_"):
        return f"magnitude in band {name[4:]}"
    if name.startswith("magerr_"):
        return f"magnitude error in band {name[7:]}"
    bands = name.split("_")[1:] if name.startswith("colour_") else []
    if len(bands) == 2:
        a, b = bands
        return f"colour {a} - {b} (mag_{a} - mag_{b})"
    return None


def annotate_columns(table: Table) -> Table:
    """Set units and descriptions of the known columns of ``table`` in place; return it."""
    for name in table.colnames:
        unit = _lookup(COLUMN_UNITS, name)
        if unit and table[name].unit is None:
            table[name].unit = unit
        description = _lookup(COLUMN_DESCRIPTIONS, name) or _family_description(name)
        if description and not table[name].description:
            table[name].description = description
    return table


def _fits_hdul(table: Table) -> fits.HDUList:
    """A FITS table HDU with units, ``TUCDn``/``TCOMMn`` cards and provenance keywords."""
    meta = table.meta
    table = Table(table, copy=False)
    # FITS keywords hold 8-character names and scalars: keep the provenance as one JSON card
    # (long strings continue over CONTINUE cards) plus a few standard scalar keywords.
    table.meta = {
        "LENSCAN": json.dumps(meta),
        **{
            k: meta[m]
            for k, m in _FITS_KEYWORDS.items()
            if isinstance(meta.get(m), str | float | int)
        },
    }
    hdu = fits.table_to_hdu(table)
    for n, name in enumerate(table.colnames, start=1):
        ucd = column_ucd(name)
        if ucd:
            hdu.header[f"TUCD{n}"] = ucd
        if table[name].description:
            hdu.header[f"TCOMM{n}"] = table[name].description
    return fits.HDUList([fits.PrimaryHDU(), hdu])


#: The VOTable COOSYS that ``ra`` and ``dec`` refer to (survey catalogues are ICRS).
_COOSYS_ID = "icrs"


def _votable(table: Table):
    """A VOTable with UCDs on the fields, ICRS positions and the provenance as INFO elements."""
    from astropy.io.votable import from_table
    from astropy.io.votable.tree import CooSys, Info

    meta = table.meta
    table = Table(table, copy=False)
    table.meta = {}
    vot = from_table(table)
    resource = vot.resources[0]
    resource.coordinate_systems.append(CooSys(ID=_COOSYS_ID, system="ICRS"))
    for field in vot.get_first_table().fields:
        field.ucd = column_ucd(field.name)
        if field.name in ("ra", "dec"):
            field.ref = _COOSYS_ID
    for key, value in meta.items():
        text = value if isinstance(value, str) else json.dumps(value)
        resource.infos.append(Info(name=key, value=text))
    return vot


def table_to_arrow(table: Table) -> pa.Table:
    """Convert to Arrow with astropy's Parquet metadata (units, descriptions, ``meta``).

    ``Table.read(url, format="parquet")`` restores units and meta; the ``lenscan`` key keeps
    the meta as JSON for :func:`read_parquet_table`.
    """
    from astropy.table import meta as table_meta

    table = Table(table, copy=False)
    table.meta = _plain_meta(table.meta)
    metadata = {"lenscan": json.dumps(table.meta)}
    columns = {}
    for name in table.colnames:
        values = np.asarray(table[name])
        if values.dtype.kind in "OU":
            values = values.astype(str)
            table[name] = values
            metadata[f"table::len::{name}"] = str(max(values.dtype.itemsize // 4, 1))
        columns[name] = values
    metadata["table_meta_yaml"] = "\n".join(table_meta.get_yaml_from_table(table))
    return pa.table(columns).replace_schema_metadata(metadata)


def read_parquet_table(url: str, *, storage_options: Mapping[str, Any] | None = None) -> Table:
    """Read one Parquet file (or a folder of parts) into an astropy Table with its meta.

    Known columns get their units and descriptions (:func:`annotate_columns`), also when the
    file was written without them (the scan's per-tile parts).
    """
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    arrow = pq.read_table(path, filesystem=fs)
    table = arrow_to_table(arrow)
    raw = (arrow.schema.metadata or {}).get(b"lenscan")
    if raw:
        table.meta.update(json.loads(raw))
    return annotate_columns(table)


def arrow_to_table(arrow: pa.Table) -> Table:
    """Convert an Arrow table to an astropy Table (strings as fixed-width ``str`` columns)."""
    columns = {}
    for name in arrow.column_names:
        values = arrow.column(name).to_numpy(zero_copy_only=False)
        # Arrow strings arrive as object arrays; FITS and VOTable writers need fixed-width str.
        columns[name] = values.astype(str) if values.dtype == object else values
    return Table(columns)
