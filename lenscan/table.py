"""The candidate table: schema, reduction (threshold, rank, merge duplicates) and writers.

Pure functions over astropy Tables plus the writers; the scan calls them after all tiles are
scored, reading the per-tile Parquet parts written by the workers.
"""

from __future__ import annotations

import io
import json
import posixpath
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.table import Table

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


def atomic_write_bytes(
    url: str, data: bytes, *, storage_options: Mapping[str, Any] | None = None
) -> None:
    """Write ``data`` to ``url`` so that readers see either nothing or the whole file.

    Writes a uniquely named temporary object beside the target and moves it into place: a
    rename on local disks; on object stores a single PUT is already all-or-nothing and the
    move is copy + delete of a complete object.
    """
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    parent = posixpath.dirname(path)
    fs.makedirs(parent, exist_ok=True)
    tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}")
    with fs.open(tmp, "wb") as fh:
        fh.write(data)
    fs.mv(tmp, path)


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
    columns = {}
    for name in arrow.column_names:
        values = arrow.column(name).to_numpy()
        # Arrow strings arrive as object arrays; FITS and VOTable writers need fixed-width str.
        columns[name] = values.astype(str) if values.dtype == object else values
    table = Table(columns)
    raw = (arrow.schema.metadata or {}).get(b"lenscan")
    if raw:
        table.meta.update(json.loads(raw))
    return table


def select_candidates(
    scored: Table, *, threshold: float, dedupe_radius_arcsec: float = 1.0
) -> CandidateTable:
    """Threshold, merge duplicates from overlapping tiles, and rank by score.

    Rows within ``dedupe_radius_arcsec`` of each other on the sky (friends-of-friends) are one
    candidate: the row kept is the highest-scoring one, preferring a stamp that was not
    padded at a tile edge. ``n_detections`` counts the merged rows.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be within [0, 1], got {threshold}")
    above = scored[np.asarray(scored["score"]) >= threshold]
    n = len(above)
    group = np.arange(n)
    if n > 1 and dedupe_radius_arcsec > 0:
        coords = SkyCoord(np.asarray(above["ra"]) * u.deg, np.asarray(above["dec"]) * u.deg)
        i, j, _, _ = coords.search_around_sky(coords, dedupe_radius_arcsec * u.arcsec)
        group = _connected_components(n, i[i < j], j[i < j])
    # Within a group: non-edge first, then highest score.
    edge = np.asarray(above["edge"], dtype=bool) if "edge" in above.colnames else np.zeros(n, bool)
    order = np.lexsort((-np.asarray(above["score"]), edge, group))
    first = np.ones(n, dtype=bool)
    first[1:] = group[order][1:] != group[order][:-1]
    keep = order[first]
    counts = np.bincount(group, minlength=n)
    out = CandidateTable(above[keep], copy=True, meta=dict(scored.meta))
    out["n_detections"] = counts[group[keep]].astype(np.int32)
    out.sort("score", reverse=True)
    out.add_column(np.arange(1, len(out) + 1, dtype=np.int32), name="rank", index=0)
    out.meta["threshold"] = threshold
    out.meta["dedupe_radius_arcsec"] = dedupe_radius_arcsec
    return out


def _connected_components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Label the connected components of an undirected graph given as edge lists."""
    parent = np.arange(n)

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in zip(i.tolist(), j.tolist(), strict=True):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([find(a) for a in range(n)], dtype=np.int64)
