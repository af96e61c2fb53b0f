"""Stamps to pictures: colour composites, band stretches and PNG bytes (pure, no I/O).

Every band of a stamp, and its colour composite, is drawn with one asinh stretch whose scale is
shared by all bands of the stamp (Lupton et al. 2004, PASP 116, 133): the sky (each band's
median) maps to black, the stamp's brightest pixel in any band to white, and the softening is a
few times the stamp's robust noise, so a faint band stays dark beside a bright one, noise sits
low in the range and galaxy cores keep their structure instead of clipping.

The inspection page (:mod:`lenscan.gallery`) and the notebook displays (:mod:`lenscan.plot`)
both draw with these.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from PIL import Image

__all__ = [
    "SOFTENING_SIGMA",
    "StretchScale",
    "asinh_stretch",
    "band_stretch",
    "png_bytes",
    "rgb_bands",
    "rgb_composite",
    "stamp_panels",
    "stamp_strip",
    "stretch_scale",
]

#: The asinh softening in units of the stamp's robust noise: linear below, logarithmic above.
SOFTENING_SIGMA = 2.0


class StretchScale(NamedTuple):
    """One stamp's display scale, shared by its bands: per-band sky, softening and top."""

    sky: np.ndarray  #: ``(n_bands,)`` level mapped to black in each band
    soft: float  #: asinh softening (counts): linear below, logarithmic above
    top: float  #: sky-subtracted value mapped to white (the brightest pixel of any band)

    def select(self, index: Sequence[int]) -> StretchScale:
        """The same scale for the bands ``index`` (e.g. the composite's three)."""
        return StretchScale(self.sky[list(index)], self.soft, self.top)


def _planes(stamp: np.ndarray) -> np.ndarray:
    img = np.nan_to_num(np.asarray(stamp, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if img.ndim != 3:
        raise ValueError(f"need a (bands, y, x) stamp, got shape {img.shape}")
    return img


def stretch_scale(stamp: np.ndarray, *, soft_sigma: float = SOFTENING_SIGMA) -> StretchScale:
    """The shared display scale of a ``(bands, y, x)`` stamp.

    The noise is the median over bands of each band's robust sigma (1.4826 MAD), so one noisy
    band does not set it; the top is the brightest sky-subtracted pixel of any band.

    >>> s = stretch_scale(np.stack([np.zeros((4, 4)), np.full((4, 4), 2.0)]))
    >>> s.sky.tolist(), s.top > 0
    ([0.0, 2.0], True)
    """
    img = _planes(stamp)
    sky = np.median(img, axis=(1, 2))
    flat = img.reshape(img.shape[0], -1) - sky[:, None]
    sigma = float(np.median(1.4826 * np.median(np.abs(flat), axis=1)))
    soft = max(soft_sigma * sigma, 1e-6)
    top = max(float(flat.max(initial=0.0)), 10.0 * soft)
    return StretchScale(sky, soft, top)


def asinh_stretch(values: np.ndarray, scale: StretchScale) -> np.ndarray:
    """Sky-subtracted ``values`` mapped to [0, 1] by ``asinh(v / soft) / asinh(top / soft)``."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, None)
    return np.clip(np.arcsinh(v / scale.soft) / np.arcsinh(scale.top / scale.soft), 0.0, 1.0)


def band_stretch(stamp: np.ndarray, scale: StretchScale | None = None) -> np.ndarray:
    """Each band of a ``(bands, y, x)`` stamp stretched alike to uint8 (rows as given)."""
    img = _planes(stamp)
    scale = scale or stretch_scale(img)
    out = asinh_stretch(img - scale.sky[:, None, None], scale)
    return np.round(255 * out).astype(np.uint8)


def rgb_composite(stamp: np.ndarray, scale: StretchScale | None = None) -> np.ndarray:
    """Lupton asinh RGB of a ``(3, y, x)`` stamp ordered red, green, blue; returns uint8.

    The intensity (mean of the three sky-subtracted bands) is stretched with ``scale`` (default:
    the stamp's own, :func:`stretch_scale`) and each pixel keeps its colour: where a channel
    would pass white, all three are scaled down together (Lupton et al. 2004), so saturated cores
    stay coloured rather than turning white.
    """
    img = _planes(stamp)
    if img.shape[0] != 3:
        raise ValueError(f"need a (3, y, x) stamp, got shape {img.shape}")
    scale = scale or stretch_scale(img)
    rgb = np.clip(img - scale.sky[:, None, None], 0.0, None)
    intensity = rgb.mean(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        gain = np.where(intensity > 0, asinh_stretch(intensity, scale) / intensity, 0.0)
    rgb = rgb * gain
    peak = rgb.max(axis=0)
    rgb = np.where(peak > 1, rgb / np.maximum(peak, 1), rgb)
    return np.round(255 * np.moveaxis(rgb, 0, -1)).astype(np.uint8)


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


def stamp_panels(
    stamp: np.ndarray, bands: Sequence[str], scale: StretchScale | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The colour composite ``(S, S, 3)`` and the bands side by side ``(S, S * n_bands, 3)``.

    Both uint8, drawn with one scale shared by the bands (default: the stamp's own). ``stamp`` is
    ``(n_bands, S, S)`` in the order of ``bands``; rows run bottom-up (FITS order) and are
    flipped here so north is up.
    """
    img = _planes(stamp)
    if img.shape[0] != len(bands):
        raise ValueError(f"need a ({len(bands)}, y, x) stamp for bands {bands}, got {img.shape}")
    scale = scale or stretch_scale(img)
    trio = [list(bands).index(b) for b in rgb_bands(bands)]
    composite = rgb_composite(img[trio], scale.select(trio))
    grey = np.concatenate(list(band_stretch(img, scale)), axis=1)
    strip = np.repeat(grey[:, :, None], 3, axis=2)
    return np.ascontiguousarray(composite[::-1]), np.ascontiguousarray(strip[::-1])


def stamp_strip(stamp: np.ndarray, bands: Sequence[str]) -> np.ndarray:
    """The colour composite then each band side by side: ``(S, S * (1 + n_bands), 3)`` uint8."""
    composite, strip = stamp_panels(stamp, bands)
    return np.concatenate([composite, strip], axis=1)


def png_bytes(rgb: np.ndarray) -> bytes:
    """Encode a ``(y, x, 3)`` uint8 array as PNG (rows top-down)."""
    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="PNG", compress_level=3)
    return buf.getvalue()
