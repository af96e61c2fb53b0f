"""A static HTML gallery of the top candidates for visual inspection.

``OUT/gallery/index.html`` shows one colour composite per candidate (Lupton et al. 2004 asinh
RGB from the three reddest-to-bluest bands), with rank, score, id, tile and position. The page
is self-contained (thumbnails are PNG files beside it) and works from any fsspec URL.
"""

from __future__ import annotations

import html
import io
import posixpath
from collections.abc import Sequence

import fsspec
import numpy as np
from astropy.table import Table
from astropy.visualization import make_lupton_rgb

from lenscan._io import atomic_write_bytes
from lenscan.config import ScanConfig
from lenscan.survey import open_survey, read_stamps

#: Side of the gallery cutouts (pixels); wider than the CNN stamp to show the context.
GALLERY_STAMP_PIX = 64


def rgb_composite(stamp: np.ndarray, *, stretch: float | None = None, q: float = 8.0) -> np.ndarray:
    """Lupton asinh RGB of a ``(3, y, x)`` stamp ordered red, green, blue; returns uint8.

    The stretch defaults to a few times the robust noise so faint arcs stay visible.
    """
    if stamp.ndim != 3 or stamp.shape[0] != 3:
        raise ValueError(f"need a (3, y, x) stamp, got shape {stamp.shape}")
    img = np.nan_to_num(stamp.astype(np.float64), nan=0.0)
    if stretch is None:
        mad = np.median(np.abs(img - np.median(img)))
        stretch = max(5.0 * 1.4826 * mad, 1e-6)
    # astropy divides 0 by 0 where all bands are zero, inside an np.where that discards it.
    with np.errstate(invalid="ignore", divide="ignore"):
        return make_lupton_rgb(img[0], img[1], img[2], stretch=stretch, Q=q)


def _rgb_bands(bands: Sequence[str]) -> list[str]:
    order = ["y", "z", "i", "r", "g", "u"]
    ranked = sorted(bands, key=lambda b: order.index(b) if b in order else len(order))
    if len(ranked) >= 3:
        # Reddest of the classic optical trio first: prefer i, r, g when present.
        trio = [b for b in ("i", "r", "g") if b in ranked]
        return trio if len(trio) == 3 else ranked[-3:]
    return [ranked[0]] * 3 if len(ranked) == 1 else [ranked[0], ranked[0], ranked[1]]


def write_gallery(candidates: Table, config: ScanConfig, *, survey=None) -> str:
    """Render ``candidates`` (best first) into ``OUT/gallery/``; return the index URL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    survey = survey or open_survey(config.survey_url, storage_options=config.storage_options)
    gallery = posixpath.join(config.out.rstrip("/"), "gallery")
    opts = config.out_storage_options
    bands = _rgb_bands(survey.bands)
    cells = []
    images: dict[int, str] = {}
    tiles = np.asarray(candidates["tile"]).astype(str) if len(candidates) else np.array([], str)
    for tile_id in dict.fromkeys(tiles.tolist()):
        rows = np.flatnonzero(tiles == tile_id)
        tile = survey.tile(tile_id)
        x = np.asarray(candidates["x"])[rows]
        y = np.asarray(candidates["y"])[rows]
        stamps, _ = read_stamps(tile, x, y, GALLERY_STAMP_PIX, bands=bands)
        for row, stamp in zip(rows, stamps, strict=True):
            buf = io.BytesIO()
            plt.imsave(buf, rgb_composite(stamp), format="png", origin="lower")
            name = f"cand-{int(candidates['rank'][row]):05d}.png"
            atomic_write_bytes(posixpath.join(gallery, name), buf.getvalue(), storage_options=opts)
            images[int(row)] = name
    for row in range(len(candidates)):
        c = candidates[row]
        caption = (
            f"#{int(c['rank'])} &middot; score {float(c['score']):.4f}<br>"
            f"id {int(c['id'])} &middot; tile {html.escape(str(c['tile']))}<br>"
            f"{float(c['ra']):.5f} {float(c['dec']):+.5f}"
            + (" &middot; <b>edge</b>" if bool(c["edge"]) else "")
        )
        cells.append(
            f'<figure data-rank="{int(c["rank"])}" data-id="{int(c["id"])}">'
            f'<img src="{images[row]}" width="160" height="160" alt="candidate {int(c["rank"])}">'
            f"<figcaption>{caption}</figcaption></figure>"
        )
    page = _PAGE.format(
        title=html.escape(f"lenscan candidates: {config.survey_url}"),
        n=len(candidates),
        bands=html.escape("".join(bands)),
        cells="\n".join(cells) or "<p>No candidates above the threshold.</p>",
    )
    index = posixpath.join(gallery, "index.html")
    atomic_write_bytes(index, page.encode(), storage_options=opts)
    fs, _ = fsspec.core.url_to_fs(index, **(opts or {}))
    return index if "://" in index else fs.unstrip_protocol(index)


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; background: #111; color: #ddd; }}
main {{ display: flex; flex-wrap: wrap; gap: 8px; }}
figure {{ margin: 0; width: 160px; font-size: 11px; }}
img {{ image-rendering: pixelated; display: block; }}
</style></head>
<body><h1>{title}</h1><p>{n} top candidates, RGB = {bands} (Lupton asinh).</p>
<main>
{cells}
</main></body></html>
"""
