"""The candidate table: its class, format conversions and writers.

The scan's reduce (:mod:`lenscan.scan.reduce`) builds the table; this module writes it in every
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
from astropy.table import Table

from lenscan._io import atomic_write_bytes

# Moved to lenscan.metrics; kept importable from here for existing callers.
from lenscan.metrics import recall_against_truth as recall_against_truth


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
            write_table(self, url, fmt, storage_options=storage_options)
            written.append(url)
        return written


_FITS_KEYWORDS = {
    "LSVERS": "lenscan_version",
    "MODEL": "model_name",
    "MODELSHA": "model_sha256",
    "SURVEY": "survey_url",
    "THRESH": "threshold",
}
_EXTENSIONS = {"parquet": "parquet", "fits": "fits", "votable": "vot.xml", "ecsv": "ecsv"}
#: Output formats the candidate table can be written in (README lists the columns).
TABLE_FORMATS = tuple(_EXTENSIONS)


def write_table(
    table: Table, url: str, fmt: str, *, storage_options: Mapping[str, Any] | None = None
) -> None:
    """Serialise ``table`` in ``fmt`` (parquet, fits, votable, ecsv) to ``url`` atomically."""
    buf = io.BytesIO()
    plain = Table(table, copy=False)
    if fmt == "parquet":
        pq.write_table(table_to_arrow(plain), buf)
    elif fmt == "fits":
        # FITS keywords hold 8-character names and scalars: keep the provenance as one JSON card
        # (long strings continue over CONTINUE cards) plus a few standard scalar keywords.
        meta = dict(table.meta)
        plain.meta = {
            "LENSCAN": json.dumps(meta, default=str),
            **{
                k: meta[m]
                for k, m in _FITS_KEYWORDS.items()
                if isinstance(meta.get(m), str | float | int)
            },
        }
        plain.write(buf, format="fits")
    elif fmt == "votable":
        plain.write(buf, format="votable")
    elif fmt == "ecsv":
        text = io.StringIO()
        plain.write(text, format="ascii.ecsv")
        buf.write(text.getvalue().encode())
    else:
        raise ValueError(f"unknown table format {fmt!r}; known: {sorted(_EXTENSIONS)}")
    atomic_write_bytes(url, buf.getvalue(), storage_options=storage_options)


def table_to_arrow(table: Table) -> pa.Table:
    """Convert to Arrow keeping ``meta`` as JSON in the schema metadata."""
    arrays = {name: np.asarray(table[name]) for name in table.colnames}
    arrow = pa.table(arrays)
    meta = {"lenscan": json.dumps(dict(table.meta), default=str)}
    return arrow.replace_schema_metadata(meta)


def read_parquet_table(url: str, *, storage_options: Mapping[str, Any] | None = None) -> Table:
    """Read one Parquet file (or a folder of parts) into an astropy Table with its meta."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    arrow = pq.read_table(path, filesystem=fs)
    table = arrow_to_table(arrow)
    raw = (arrow.schema.metadata or {}).get(b"lenscan")
    if raw:
        table.meta.update(json.loads(raw))
    return table


def arrow_to_table(arrow: pa.Table) -> Table:
    """Convert an Arrow table to an astropy Table (strings as fixed-width ``str`` columns)."""
    columns = {}
    for name in arrow.column_names:
        values = arrow.column(name).to_numpy(zero_copy_only=False)
        # Arrow strings arrive as object arrays; FITS and VOTable writers need fixed-width str.
        columns[name] = values.astype(str) if values.dtype == object else values
    return Table(columns)
