"""Stamps to pictures: colour composites, band stretches and PNG bytes (pure, no I/O).

The inspection page (:mod:`lenscan.gallery`) and the notebook displays (:mod:`lenscan.plot`)
both draw with these.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from astropy.visualization import make_lupton_rgb
from PIL import Image

__all__ = ["grey_stretch", "png_bytes", "rgb_bands", "rgb_composite", "stamp_strip"]


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


def grey_stretch(band: np.ndarray) -> np.ndarray:
    """An asinh stretch of one band to uint8, from the robust background and noise."""
    img = np.nan_to_num(np.asarray(band, dtype=np.float64), nan=0.0)
    med = np.median(img)
    sigma = max(1.4826 * np.median(np.abs(img - med)), 1e-6)
    top = max(np.percentile(img, 99.5) - med, 10 * sigma)
    scaled = np.arcsinh(np.clip(img - med + sigma, 0, None) / sigma) / np.arcsinh(top / sigma)
    return (255 * np.clip(scaled, 0, 1)).astype(np.uint8)


def rgb_bands(bands: Sequence[str]) -> list[str]:
    """The three bands of a colour composite, reddest first (i, r, g when present).

    >>> rgb_bands(["g", "r", "i", "z"])
    ['i', 'r', 'g']
    >>> rgb_bands(["r"])
    ['r', 'r', 'r']
    """
    order = ["y", "z", "i", "r", "g", "u"]
    ranked = sorted(bands, key=lambda b: order.index(b) if b in order else len(order))
    if len(ranked) >= 3:
        # Reddest of the classic optical trio first: prefer i, r, g when present.
        trio: list[str] = [b for b in ("i", "r", "g") if b in ranked]
        return trio if len(trio) == 3 else ranked[-3:]
    return [ranked[0]] * 3 if len(ranked) == 1 else [ranked[0], ranked[0], ranked[1]]


def stamp_strip(stamp: np.ndarray, bands: Sequence[str]) -> np.ndarray:
    """The colour composite then each band side by side: ``(S, S * (1 + n_bands), 3)`` uint8.

    ``stamp`` is ``(n_bands, S, S)`` in the order of ``bands``; rows run bottom-up (FITS order)
    and are flipped here so that north is up in the image.
    """
    if stamp.ndim != 3 or stamp.shape[0] != len(bands):
        raise ValueError(f"need a ({len(bands)}, y, x) stamp for bands {bands}, got {stamp.shape}")
    trio = [list(bands).index(b) for b in rgb_bands(bands)]
    panels = [rgb_composite(stamp[trio])]
    for plane in stamp:
        grey = grey_stretch(plane)
        panels.append(np.repeat(grey[:, :, None], 3, axis=2))
    return np.ascontiguousarray(np.concatenate(panels, axis=1)[::-1])


def png_bytes(rgb: np.ndarray) -> bytes:
    """Encode a ``(y, x, 3)`` uint8 array as PNG (rows top-down)."""
    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="PNG", compress_level=3)
    return buf.getvalue()
