"""The inspection page: the top candidates, big enough to judge, graded from the keyboard.

``lenscan gallery OUT`` (or a scan with ``gallery_size``) writes ``OUT/gallery/``:

- ``index.html``: one self-contained page (its script and style inline) that works from a
  ``file://`` URL or any static host; it holds no candidate data itself.
- ``pages/p00001.js`` ...: the candidates, ``page_size`` per file, loaded one page at a time (as
  script elements, which browsers allow from ``file://`` where ``fetch`` is refused), so ten
  thousand candidates never load every image at once.
- ``img/c00001.png``: per candidate the colour composite (Lupton et al. 2004 asinh RGB) and
  ``img/b00001.png`` each band side by side, at the model's stamp size and drawn with one stretch
  shared by the stamp's bands (:mod:`lenscan.images`), shown upscaled (``scale`` times, at
  least 2, about 190 px a stamp); ``img/x00001.png``: a context cutout ``CONTEXT_FACTOR`` times
  wider, loaded only on demand and shown over the page.

The page is a grid (a dozen or more cards on a 1400 x 1000 screen, no horizontal scrolling down
to phone widths); the current card is kept in view after each key. Each card shows rank, score
(with the digits that tell near-1 scores apart), position, magnitudes and the flags a grader
weighs: a stamp padded at a tile edge, its masked fraction, detections merged from overlapping
tiles and non-zero catalogue flags; a known lens (``known_name``) is named with its grading.

Grading (``A``, ``B``, ``C``, ``N``, next/previous, undo) is kept in the browser's
``localStorage`` under a key naming this catalogue and exported as CSV with the columns
:data:`lenscan.grades.CSV_COLUMNS`; :func:`lenscan.grades.merge_grades` merges graders' files.
"""

from __future__ import annotations

import hashlib
import json
import math
import posixpath
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any

import fsspec
import numpy as np
from astropy.table import Table

from lenscan._io import atomic_write_bytes, check_output_folder
from lenscan._lease import hold_lease
from lenscan.config import ScanConfig
from lenscan.images import png_bytes, rgb_bands, rgb_composite, stamp_panels, stretch_scale
from lenscan.plot import format_score
from lenscan.survey import SurveyFormatError, open_survey, read_stamps

__all__ = [
    "CONTEXT_FACTOR",
    "DEFAULT_PAGE_SIZE",
    "DEFAULT_STAMP_PIX",
    "add_gallery_arguments",
    "catalogue_key",
    "gallery_from_output",
    "render_gallery",
    "run_gallery_cli",
    "write_gallery",
]

#: Candidates per page file (and per screen) of the inspection page.
DEFAULT_PAGE_SIZE = 100
#: The context cutout is this many times wider than the model's stamp.
CONTEXT_FACTOR = 3
#: Stamp side used when the candidate table does not record the model's.
DEFAULT_STAMP_PIX = 64
#: Candidates whose stamps are read together (bounds memory: context cutouts are large).
_READ_BLOCK = 128


def catalogue_key(meta: Mapping[str, Any]) -> str:
    """A short stable key naming one candidate catalogue (the browser keeps grades under it)."""
    ident = {k: meta.get(k) for k in ("survey_url", "model_sha256", "started", "threshold")}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _display_scale(stamp_pix: int) -> int:
    """Upscaling factor: a whole number, at least 2, a stamp about 190 px on screen."""
    return max(2, round(190 / stamp_pix))


def _finite_or_none(value: Any) -> float | None:
    value = float(value)
    return round(value, 4) if math.isfinite(value) else None


def _optional(row: Any, name: str, kind: type, default: Any) -> Any:
    """``row[name]`` as ``kind``, or ``default`` where the table lacks the column (older scans)."""
    return kind(row[name]) if name in row.colnames else default


def _record(row: Any, mag_cols: Sequence[str], number: int) -> dict[str, Any]:
    masked = _optional(row, "masked_fraction", float, 0.0)
    return {
        "rank": int(row["rank"]),
        "id": int(row["id"]),
        "tile": str(row["tile"]),
        "ra": round(float(row["ra"]), 7),
        "dec": round(float(row["dec"]), 7),
        "score": float(row["score"]),
        "score_text": format_score(row["score"]),
        "edge": _optional(row, "edge", bool, False),
        "masked_fraction": round(masked, 4) if math.isfinite(masked) else None,
        "n_detections": _optional(row, "n_detections", int, 1),
        "flags": _optional(row, "flags", int, 0),
        "known": _optional(row, "known_name", str, ""),
        "known_grading": _optional(row, "known_grading", str, ""),
        "mags": {c[4:]: _finite_or_none(row[c]) for c in mag_cols},
        "colour": f"img/c{number:05d}.png",
        "bands": f"img/b{number:05d}.png",
        "context": f"img/x{number:05d}.png",
    }


def _check_candidates(candidates: Table) -> None:
    need = ("rank", "id", "tile", "ra", "dec", "x", "y", "score")
    missing = [c for c in need if c not in candidates.colnames]
    if missing:
        raise ValueError(
            f"the candidate table lacks column(s) {missing} needed by the gallery "
            f"(has {candidates.colnames})"
        )


def _write_images(
    candidates: Table, survey: Any, gallery: str, stamp_pix: int, opts: Mapping[str, Any]
) -> None:
    """Write each candidate's composite, bands and context PNGs, reading tile by tile in blocks."""
    bands = list(survey.bands)
    tiles = np.asarray(candidates["tile"]).astype(str)
    wide = CONTEXT_FACTOR * stamp_pix
    lo = (wide - stamp_pix) // 2
    for tile_id in dict.fromkeys(tiles.tolist()):
        tile = survey.tile(tile_id)
        rows = np.flatnonzero(tiles == tile_id)
        for start in range(0, rows.size, _READ_BLOCK):
            block = rows[start : start + _READ_BLOCK]
            x = np.asarray(candidates["x"], dtype=np.float64)[block]
            y = np.asarray(candidates["y"], dtype=np.float64)[block]
            # A stamp of side S inside a cutout of side 3S centred alike starts S further in.
            context, _ = read_stamps(tile, x, y, wide, bands=bands)
            trio = [bands.index(b) for b in rgb_bands(bands)]
            for row, cut in zip(block.tolist(), context, strict=True):
                stamp = cut[:, lo : lo + stamp_pix, lo : lo + stamp_pix]
                # The wider cutout drawn at the stamp's scale: the candidate looks the same in
                # both, brighter neighbours saturate (keeping their colour).
                scale = stretch_scale(stamp)
                colour, strip = stamp_panels(stamp, bands, scale)
                ctx = np.ascontiguousarray(rgb_composite(cut[trio], scale.select(trio))[::-1])
                n = f"{row + 1:05d}"
                for name, rgb in ((f"c{n}", colour), (f"b{n}", strip), (f"x{n}", ctx)):
                    url = posixpath.join(gallery, "img", f"{name}.png")
                    atomic_write_bytes(url, png_bytes(rgb), storage_options=opts)


def _page_html(index: dict[str, Any]) -> str:
    assets = resources.files("lenscan.gallery")
    template = assets.joinpath("page.html").read_text(encoding="utf-8")
    return (
        template.replace("/*STYLE*/", assets.joinpath("page.css").read_text(encoding="utf-8"))
        .replace("/*SCRIPT*/", assets.joinpath("page.js").read_text(encoding="utf-8"))
        .replace("/*INDEX*/null", json.dumps(index).replace("</", "<\\/"))
    )


def render_gallery(
    candidates: Table,
    survey: Any,
    dest: str,
    *,
    page_size: int = DEFAULT_PAGE_SIZE,
    storage_options: Mapping[str, Any] | None = None,
) -> str:
    """Write the inspection page of ``candidates`` (best first) into the folder ``dest``.

    Parameters
    ----------
    candidates : astropy.table.Table
        Ranked candidates (columns ``rank, id, tile, ra, dec, x, y, score``; ``mag_*``,
        ``edge``, ``masked_fraction``, ``n_detections`` and ``flags`` shown when present).
        ``meta["stamp_size_pix"]`` sets the stamp shown.
    survey : SurveyStore
        The survey the candidates come from (stamps are read from it).
    dest : str
        Folder URL for ``index.html``, ``pages/`` and ``img/``.
    page_size : int
        Candidates per page.
    storage_options : dict, optional
        fsspec options for ``dest``.

    Returns
    -------
    str
        The URL of ``index.html``.
    """
    if page_size < 1:
        raise ValueError(f"page_size must be at least 1, got {page_size}")
    _check_candidates(candidates)
    opts = dict(storage_options or {})
    stamp_pix = int(candidates.meta.get("stamp_size_pix", DEFAULT_STAMP_PIX))
    dest = dest.rstrip("/")
    _write_images(candidates, survey, dest, stamp_pix, opts)
    mag_cols = [c for c in candidates.colnames if c.startswith("mag_")]
    records = [_record(candidates[i], mag_cols, i + 1) for i in range(len(candidates))]
    n_pages = max(1, math.ceil(len(records) / page_size))
    for p in range(n_pages):
        chunk = records[p * page_size : (p + 1) * page_size]
        body = f"lenscanPage({p + 1}, {json.dumps(chunk)});\n"
        atomic_write_bytes(
            posixpath.join(dest, "pages", f"p{p + 1:05d}.js"), body.encode(), storage_options=opts
        )
    index = {
        "catalogue": catalogue_key(candidates.meta),
        "title": f"lenscan candidates: {candidates.meta.get('survey_url', '')}",
        "n": len(records),
        "page_size": page_size,
        "n_pages": n_pages,
        "bands": list(survey.bands),
        "rgb": rgb_bands(survey.bands),
        "stamp_pix": stamp_pix,
        "context_pix": CONTEXT_FACTOR * stamp_pix,
        "scale": _display_scale(stamp_pix),
        "model": candidates.meta.get("model_name", ""),
    }
    url = posixpath.join(dest, "index.html")
    atomic_write_bytes(url, _page_html(index).encode(), storage_options=opts)
    fs, _ = fsspec.core.url_to_fs(url, **opts)
    return url if "://" in url else fs.unstrip_protocol(url)


def write_gallery(candidates: Table, config: ScanConfig, *, survey=None) -> str:
    """Render ``candidates`` (best first) into ``OUT/gallery/``; return the index URL."""
    survey = survey or open_survey(config.survey_url, storage_options=config.storage_options)
    dest = posixpath.join(config.out.rstrip("/"), "gallery")
    return render_gallery(candidates, survey, dest, storage_options=config.out_storage_options)


def gallery_from_output(
    out: str,
    *,
    top: int | None = None,
    dest: str | None = None,
    page_size: int = DEFAULT_PAGE_SIZE,
    storage_options: Mapping[str, Any] | None = None,
    survey_url: str | None = None,
) -> str:
    """Write the inspection page of a finished scan's top ``top`` candidates (``lenscan gallery``).

    Reads ``OUT/candidates.parquet`` and the survey named in ``OUT/run.json`` (or
    ``survey_url``, e.g. when the survey has moved); writes into ``dest`` (default
    ``OUT/gallery``). Returns the URL of ``index.html``.
    """
    from lenscan.table import read_parquet_table

    out = out.rstrip("/")
    if dest:
        check_output_folder(dest, storage_options=storage_options)
    fs, path = fsspec.core.url_to_fs(out, **(storage_options or {}))
    table_path = posixpath.join(path, "candidates.parquet")
    run_path = posixpath.join(path, "run.json")
    for p in (table_path, run_path):
        if not fs.exists(p):
            raise FileNotFoundError(f"{out} is not a finished scan output: {p} is missing")
    run = json.loads(fs.cat_file(run_path))
    config = ScanConfig.from_dict(run["config"])
    candidates = read_parquet_table(
        fs.unstrip_protocol(table_path), storage_options=storage_options
    )
    if top is not None:
        if top < 1:
            raise ValueError(f"--top must be at least 1, got {top}")
        candidates = candidates[:top]
    survey = _open_scanned_survey(survey_url or config.survey_url, config, given=bool(survey_url))
    if dest is not None:
        return render_gallery(
            candidates, survey, dest, page_size=page_size, storage_options=storage_options
        )
    with hold_lease(out, storage_options):  # OUT/gallery: not while a scan writes OUT
        return render_gallery(
            candidates,
            survey,
            posixpath.join(out, "gallery"),
            page_size=page_size,
            storage_options=storage_options,
        )


def _open_scanned_survey(url: str, config: ScanConfig, *, given: bool):
    try:
        return open_survey(url, storage_options=config.storage_options)
    except (SurveyFormatError, FileNotFoundError) as exc:
        if given:
            raise
        raise SurveyFormatError(
            f"{exc} (the survey this scan's run.json names); give its current URL with --survey"
        ) from exc


def add_gallery_arguments(parser: Any) -> None:
    """Register the options of ``lenscan gallery`` on an argparse parser."""
    parser.add_argument("out", help="scan output folder (holds candidates.parquet and run.json)")
    parser.add_argument("--top", type=int, help="show only the N best candidates (default all)")
    parser.add_argument("--out", dest="dest", help="folder for the page (default OUT/gallery)")
    parser.add_argument(
        "--page-size", type=int, default=DEFAULT_PAGE_SIZE, help="candidates a page"
    )
    parser.add_argument("--survey", help="survey store URL (default: the one in OUT/run.json)")


def run_gallery_cli(args: Any) -> int:
    """Run ``lenscan gallery`` from parsed arguments."""
    url = gallery_from_output(
        args.out, top=args.top, dest=args.dest, page_size=args.page_size, survey_url=args.survey
    )
    print(f"inspection page: {url}")
    return 0
