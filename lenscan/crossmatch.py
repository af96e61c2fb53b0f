"""Known lenses recovered by a sweep, and ``lenscan known-recovery`` / ``lenscan crossmatch``.

On real data the known lenses recovered are the only completeness a search can measure (the DES
comparison of three searches, arXiv:2510.23782, is built on it). :func:`known_recovery` follows
each known lens inside the scanned footprint through the sweep's stages (in the catalogue, through
the colour cut, scored, a candidate, in the top N); :func:`recovery_summary` counts them by grading.
"""

from __future__ import annotations

import argparse
import json
import os
import posixpath
from collections.abc import Mapping
from typing import Any

import fsspec
import numpy as np
from astropy.table import Table

from lenscan._secrets import safe_url
from lenscan.catalogs import (
    DEFAULT_KNOWN_RADIUS_ARCSEC,
    KNOWN_LENSES_DEFAULT,
    crossmatch_catalog,
    load_known_lenses,
    nearest_within,
)

__all__ = [
    "add_crossmatch_arguments",
    "add_recovery_arguments",
    "known_recovery",
    "recovery_summary",
    "run_crossmatch_cli",
    "run_recovery_cli",
]


def known_recovery(
    out: str,
    *,
    known: str | os.PathLike[str] | Table = KNOWN_LENSES_DEFAULT,
    radius_arcsec: float = DEFAULT_KNOWN_RADIUS_ARCSEC,
    survey_url: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    out_storage_options: Mapping[str, Any] | None = None,
) -> Table:
    """Each known lens inside the scanned footprint and how far it got through the sweep.

    Columns: ``name``, ``grading``, ``type``, ``ra``, ``dec``, ``tile`` (the first scanned tile
    whose WCS footprint holds it), ``in_catalogue`` (a catalogue source within
    ``radius_arcsec``), ``passed_cut`` (that source passes the run's colour cut), ``scored``
    (a scored row within the radius), ``score``, ``rank`` (its candidate rank, 0 if it is not a
    candidate). :func:`recovery_summary` counts them by grading.

    Parameters
    ----------
    out : str
        The scan's output folder (``run.json``, ``scored/``, ``candidates.parquet``).
    known : str, path or Table
        ``"lenscat"`` (bundled) or any table :func:`load_known_lenses` reads.
    survey_url : str, optional
        The survey, when ``run.json``'s URL does not reach it from here (credentials are never
        recorded there; pass them as ``storage_options``).
    """
    from lenscan.select import colour_cut_mask, get_colour_cut
    from lenscan.survey import open_survey
    from lenscan.sweep import read_scored
    from lenscan.table import read_parquet_table

    out_fs, out_path = fsspec.core.url_to_fs(out, **(out_storage_options or {}))
    run = json.loads(out_fs.cat_file(posixpath.join(out_path, "run.json")))
    survey = open_survey(survey_url or run["survey_url"], storage_options=storage_options)
    lenses = load_known_lenses(known)
    tiles = _footprint_tiles(survey, lenses)
    inside = tiles != ""
    report = Table(lenses[inside], copy=True)
    report["tile"] = tiles[inside].astype(str)
    cut = get_colour_cut(run["colour_cut"])
    n = len(report)
    in_catalogue, passed = np.zeros(n, bool), np.zeros(n, bool)
    for tile_id in sorted(set(report["tile"])):
        rows = np.flatnonzero(report["tile"] == tile_id)
        catalog = survey.tile(tile_id).catalog()
        idx, _ = nearest_within(report["ra"][rows], report["dec"][rows], catalog["ra"],
                                catalog["dec"], radius_arcsec)  # fmt: skip
        in_catalogue[rows] = idx >= 0
        selected = colour_cut_mask(catalog, cut)
        passed[rows] = (idx >= 0) & selected[np.maximum(idx, 0)]
    report["in_catalogue"], report["passed_cut"] = in_catalogue, passed
    _add_scores(report, read_scored(out, storage_options=out_storage_options,
                                    tiles=sorted(set(report["tile"]))), radius_arcsec)  # fmt: skip
    candidates = read_parquet_table(posixpath.join(out.rstrip("/"), "candidates.parquet"),
                                    storage_options=out_storage_options)  # fmt: skip
    idx, _ = nearest_within(report["ra"], report["dec"], candidates["ra"], candidates["dec"],
                            radius_arcsec)  # fmt: skip
    report["rank"] = np.where(idx >= 0, np.asarray(candidates["rank"])[np.maximum(idx, 0)], 0)
    report.meta = {"known_lenses": lenses.meta.get("known_lenses"), "radius_arcsec": radius_arcsec,
                   "threshold": run.get("threshold"), "n_candidates": len(candidates)}  # fmt: skip
    return report


def _footprint_tiles(survey: Any, lenses: Table) -> np.ndarray:
    """For each lens, the first tile (in the survey's order) whose pixels hold it, else ""."""
    tile_of = np.full(len(lenses), "", dtype=object)
    ra, dec = np.asarray(lenses["ra"], float), np.asarray(lenses["dec"], float)
    ok = np.isfinite(ra) & np.isfinite(dec)
    for tile_id in survey.tile_ids:
        tile = survey.tile(tile_id)
        ny, nx = tile.shape_yx
        todo = np.flatnonzero(ok & (tile_of == ""))
        if todo.size == 0:
            break
        wcs = tile.wcs
        centre = wcs.pixel_to_world_values((nx - 1) / 2, (ny - 1) / 2)
        half_diag = 0.5 * np.hypot(nx, ny) * tile.pixel_scale_arcsec / 3600 * 1.05
        near = _within_deg(ra[todo], dec[todo], float(centre[0]), float(centre[1]), half_diag)
        cand = todo[near]
        if cand.size == 0:
            continue
        x, y = wcs.world_to_pixel_values(ra[cand], dec[cand])
        hit = (x >= -0.5) & (x < nx - 0.5) & (y >= -0.5) & (y < ny - 0.5)
        tile_of[cand[hit]] = tile_id
    return tile_of


def _within_deg(
    ra: np.ndarray, dec: np.ndarray, ra0: float, dec0: float, radius: float
) -> np.ndarray:
    """Positions within ``radius`` degrees of (ra0, dec0) (haversine, vectorised)."""
    r1, d1 = np.radians(ra), np.radians(dec)
    r0, d0 = np.radians(ra0), np.radians(dec0)
    h = np.sin((d1 - d0) / 2) ** 2 + np.cos(d1) * np.cos(d0) * np.sin((r1 - r0) / 2) ** 2
    return 2 * np.degrees(np.arcsin(np.sqrt(np.clip(h, 0, 1)))) <= radius


def _add_scores(report: Table, scored: Table, radius_arcsec: float) -> None:
    ra = scored["ra"] if len(scored) else np.zeros(0)
    dec = scored["dec"] if len(scored) else np.zeros(0)
    idx, _ = nearest_within(report["ra"], report["dec"], ra, dec, radius_arcsec)
    scores = np.asarray(scored["score"], float) if len(scored) else np.zeros(1)
    report["scored"] = idx >= 0
    report["score"] = np.where(idx >= 0, scores[np.maximum(idx, 0)], np.nan)


def recovery_summary(report: Table, *, top: int = 100) -> Table:
    """Counts per grading (and ``all``) of :func:`known_recovery`'s stages.

    Columns: ``grading``, ``in_footprint``, ``in_catalogue``, ``passed_cut``, ``scored``,
    ``candidates`` (at or above the run's threshold), ``top_{top}`` (rank <= ``top``), and
    ``recovered_fraction`` (candidates / in_footprint).
    """
    grading = np.asarray(report["grading"], str) if len(report) else np.zeros(0, str)
    rank = np.asarray(report["rank"], int) if len(report) else np.zeros(0, int)
    rows = []
    for name in [*sorted(set(grading)), "all"]:
        sel = np.ones(len(grading), bool) if name == "all" else grading == name
        row: dict[str, Any] = {"grading": name, "in_footprint": int(sel.sum())}
        for stage in ("in_catalogue", "passed_cut", "scored"):
            row[stage] = int(np.asarray(report[stage], bool)[sel].sum()) if len(report) else 0
        row["candidates"] = int((rank[sel] > 0).sum())
        row[f"top_{top}"] = int(((rank[sel] > 0) & (rank[sel] <= top)).sum())
        row["recovered_fraction"] = row["candidates"] / row["in_footprint"] if sel.any() else np.nan
        rows.append(row)
    return Table(rows=rows)


def add_recovery_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``lenscan known-recovery``."""
    p.add_argument("out", help="the scan's output folder")
    p.add_argument(
        "--known",
        default=KNOWN_LENSES_DEFAULT,
        help="known lenses: 'lenscat' (bundled, default) or a table / HATS catalogue",
    )
    p.add_argument(
        "--radius",
        type=float,
        default=DEFAULT_KNOWN_RADIUS_ARCSEC,
        help=f"match radius in arcsec (default {DEFAULT_KNOWN_RADIUS_ARCSEC:g})",
    )
    p.add_argument("--top", type=int, default=100, help="also count ranks <= TOP (default 100)")
    p.add_argument("--survey", help="survey URL, when run.json's does not reach it from here")


def run_recovery_cli(args: argparse.Namespace) -> int:
    """``lenscan known-recovery OUT``: print the counts, write ``OUT/known_recovery.ecsv``."""
    report = known_recovery(args.out, known=args.known, radius_arcsec=args.radius,
                            survey_url=args.survey)  # fmt: skip
    summary = recovery_summary(report, top=args.top)
    url = posixpath.join(args.out.rstrip("/"), "known_recovery.ecsv")
    with fsspec.open(url, "w") as fh:
        report.write(fh, format="ascii.ecsv")
    print(f"known lenses ({report.meta['known_lenses']}, within {args.radius:g}\") inside the "
          f"scanned footprint, by grading (threshold {report.meta['threshold']}):")  # fmt: skip
    summary["recovered_fraction"].format = ".3f"
    summary.pprint_all()
    print(f"per lens: {safe_url(url)}")
    return 0


def add_crossmatch_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``lenscan crossmatch``."""
    p.add_argument("out", help="the scan's output folder (its candidates.parquet)")
    p.add_argument("catalog", help="a HATS catalogue or a FITS/Parquet/CSV/ECSV/VOTable table")
    p.add_argument("--radius", type=float, default=1.0, help="match radius, arcsec (default 1)")
    p.add_argument("--suffix", default="_cat", help="suffix of the catalogue's columns")
    p.add_argument("--ra", help="the catalogue's RA column (default: found by name)")
    p.add_argument("--dec", help="the catalogue's Dec column (default: found by name)")
    p.add_argument("--output", help="matched table path (default OUT/crossmatch.parquet)")


def run_crossmatch_cli(args: argparse.Namespace) -> int:
    """``lenscan crossmatch OUT CATALOG``: every candidate with its nearest catalogue match."""
    from lenscan.table import read_parquet_table, write_table

    candidates = read_parquet_table(posixpath.join(args.out.rstrip("/"), "candidates.parquet"))
    matched = crossmatch_catalog(candidates, args.catalog, radius_arcsec=args.radius,
                                 suffix=args.suffix, ra=args.ra, dec=args.dec)  # fmt: skip
    url = args.output or posixpath.join(args.out.rstrip("/"), "crossmatch.parquet")
    write_table(matched, url, "parquet")
    n = int(np.isfinite(np.asarray(matched[f"sep{args.suffix}_arcsec"], float)).sum())
    print(f"{n} of {len(matched)} candidates have a match within {args.radius:g}\" in "
          f"{os.path.basename(safe_url(str(args.catalog)).rstrip('/'))}; written to "
          f"{safe_url(url)}")  # fmt: skip
    return 0
