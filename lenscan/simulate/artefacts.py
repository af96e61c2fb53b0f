"""Image artefacts of coadded survey tiles, with mask and weight planes set as a coadd sets them.

Pure numpy kernels that modify a tile's (or a stamp's) ``image``, ``weight`` (inverse variance)
and ``mask`` (bit plane) arrays of shape ``(band, y, x)`` in place and return truth rows:

=====================  =======================================================================
artefact               image / weight / mask
=====================  =======================================================================
cosmic-ray residual    a sharp 1-6 px track in one band (the part of a single-exposure hit
                       the coadd's outlier rejection missed); the exposure is dropped there, so
                       the weight falls by ``1/n_exposures``; no mask bit (valid data)
satellite trail        a PSF-wide line across the tile in one band, a few sigma bright (the
                       residual of a trail masked in one exposure); weight falls by
                       ``1/n_exposures`` along it; no mask bit
bright star            four diffraction spikes and a faint halo ring (light, in every band);
                       saturated core (:data:`MASK_SATURATED`) and a bleed trail along the
                       columns (:data:`MASK_BLEED`) with weight 0
bad column             a column segment with no data: value 0, weight 0,
                       :data:`MASK_BAD_COLUMN`
=====================  =======================================================================

A pixel is *masked* (no usable data) where its weight is 0 and its mask bits are set; the scan
and the training sets treat such pixels alike (:func:`lenscan.stamps.apply_pixel_mask`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "ARTEFACT_KINDS",
    "MASK_BAD_COLUMN",
    "MASK_BLEED",
    "MASK_SATURATED",
    "add_bad_column",
    "add_bright_star_features",
    "add_cosmic_rays",
    "add_satellite_trail",
    "saturate",
]

#: Mask bits written by the simulator.
MASK_BAD_COLUMN = 1
MASK_SATURATED = 2
MASK_BLEED = 4
#: Artefact kinds recorded in a synthetic survey's ``artefacts.parquet``.
ARTEFACT_KINDS: tuple[str, ...] = ("cosmic_ray", "satellite_trail", "bright_star", "bad_column")


def _check(image: np.ndarray, weight: np.ndarray | None, mask: np.ndarray | None) -> None:
    if image.ndim != 3:
        raise ValueError(f"image must be (band, y, x), got shape {image.shape}")
    for name, arr in (("weight", weight), ("mask", mask)):
        if arr is not None and arr.shape != image.shape:
            raise ValueError(f"{name} has shape {arr.shape}, the image {image.shape}")


def add_cosmic_rays(
    image: np.ndarray,
    weight: np.ndarray,
    rng: np.random.Generator,
    n: int,
    noise_sigma: Sequence[float],
    *,
    n_exposures: int = 10,
    snr_range: tuple[float, float] = (5.0, 60.0),
) -> dict[str, np.ndarray]:
    """Add ``n`` cosmic-ray residuals (short sharp tracks, one band each).

    Returns truth rows: ``kind``, ``band`` (index), ``x``, ``y``, ``length_pix``, ``snr``.
    """
    _check(image, weight, None)
    nb, ny, nx = image.shape
    band = rng.integers(0, nb, n)
    x0 = rng.uniform(0, nx - 1, n)
    y0 = rng.uniform(0, ny - 1, n)
    length = rng.uniform(1.0, 6.0, n)
    angle = rng.uniform(0, math.pi, n)
    snr = rng.uniform(*snr_range, n)
    keep = 1.0 - 1.0 / n_exposures
    for k in range(n):
        steps = np.linspace(0.0, length[k], max(2, int(length[k] * 2) + 1))
        xs = np.clip(np.round(x0[k] + steps * math.cos(angle[k])).astype(int), 0, nx - 1)
        ys = np.clip(np.round(y0[k] + steps * math.sin(angle[k])).astype(int), 0, ny - 1)
        pix = np.unique(ys * nx + xs)
        yy, xx = np.divmod(pix, nx)
        image[band[k], yy, xx] += snr[k] * noise_sigma[band[k]]
        weight[band[k], yy, xx] *= keep
    return {
        "kind": np.full(n, "cosmic_ray"),
        "band": band.astype(np.int16),
        "x": x0,
        "y": y0,
        "length_pix": length,
        "snr": snr,
    }


def add_satellite_trail(
    image: np.ndarray,
    weight: np.ndarray,
    rng: np.random.Generator,
    noise_sigma: Sequence[float],
    *,
    width_pix: float = 1.5,
    n_exposures: int = 10,
    snr_range: tuple[float, float] = (1.0, 6.0),
) -> dict[str, np.ndarray]:
    """Add one satellite-trail residual across the image in one band.

    Returns one truth row: ``kind``, ``band``, ``x``, ``y`` (a point on the line),
    ``angle_rad``, ``snr`` (peak, in units of the pixel noise).
    """
    _check(image, weight, None)
    nb, ny, nx = image.shape
    b = int(rng.integers(0, nb))
    x0, y0 = rng.uniform(0, nx - 1), rng.uniform(0, ny - 1)
    ang = rng.uniform(0, math.pi)
    snr = rng.uniform(*snr_range)
    yy, xx = np.mgrid[0:ny, 0:nx]
    dist = np.abs((xx - x0) * math.sin(ang) - (yy - y0) * math.cos(ang))
    near = dist < 4 * width_pix
    image[b][near] += (snr * noise_sigma[b] * np.exp(-0.5 * (dist[near] / width_pix) ** 2)).astype(
        image.dtype
    )
    weight[b][near] *= 1.0 - 1.0 / n_exposures
    return {
        "kind": np.array(["satellite_trail"]),
        "band": np.array([b], np.int16),
        "x": np.array([x0]),
        "y": np.array([y0]),
        "angle_rad": np.array([ang]),
        "snr": np.array([snr]),
    }


def add_bright_star_features(
    image: np.ndarray,
    x: float,
    y: float,
    flux: Sequence[float],
    *,
    spike_fraction: float = 2e-3,
    halo_fraction: float = 2e-3,
    halo_radius_pix: float = 30.0,
) -> None:
    """Add diffraction spikes (along the pixel axes) and a halo ring around a bright star.

    ``flux`` is the star's total counts per band; the spikes carry ``spike_fraction`` of it,
    the halo ring ``halo_fraction``. Noiseless light: add it before the noise.
    """
    _check(image, None, None)
    nb, ny, nx = image.shape
    length = 6.0 * math.sqrt(max(float(np.max(flux)), 1.0)) ** 0.5
    half = int(min(3 * length, 200))
    xa, xb = max(0, int(x) - half), min(nx, int(x) + half + 1)
    ya, yb = max(0, int(y) - half), min(ny, int(y) + half + 1)
    if xa >= xb or ya >= yb:
        return
    yy, xx = np.mgrid[ya:yb, xa:xb]
    dx, dy = xx - x, yy - y
    r = np.hypot(dx, dy)
    spikes = np.exp(-np.abs(dx) / length) * np.exp(-0.5 * dy**2 / 0.8**2)
    spikes += np.exp(-np.abs(dy) / length) * np.exp(-0.5 * dx**2 / 0.8**2)
    spikes[r < 2] = 0.0
    spikes /= max(spikes.sum(), 1e-30)
    ring = np.exp(-0.5 * ((r - halo_radius_pix) / 4.0) ** 2)
    ring /= max(ring.sum(), 1e-30)
    for b in range(nb):
        image[b, ya:yb, xa:xb] += (
            flux[b] * (spike_fraction * spikes + halo_fraction * ring)
        ).astype(image.dtype)


def saturate(
    image: np.ndarray,
    weight: np.ndarray,
    mask: np.ndarray,
    level: float,
    *,
    bleed_per_pixel: float = 3.0,
) -> int:
    """Mask saturated pixels (``image > level``) and bleed trails along their columns.

    Call on the noiseless image. Each column of a saturated region bleeds up and down by
    ``bleed_per_pixel`` rows per saturated pixel in it. Saturated and bled pixels get weight 0
    and :data:`MASK_SATURATED` / :data:`MASK_BLEED`; bled pixels read ``level``. Returns the
    number of saturated pixels.
    """
    _check(image, weight, mask)
    sat = image > level
    n_sat = int(sat.sum())
    if not n_sat:
        return 0
    ny = image.shape[1]
    for b, xcol in zip(*np.nonzero(sat.any(axis=1)), strict=True):
        rows = np.flatnonzero(sat[b, :, xcol])
        extra = int(bleed_per_pixel * rows.size)
        y0, y1 = max(0, rows.min() - extra), min(ny, rows.max() + extra + 1)
        image[b, y0:y1, xcol] = np.maximum(image[b, y0:y1, xcol], level)
        mask[b, y0:y1, xcol] |= MASK_BLEED
        weight[b, y0:y1, xcol] = 0.0
    mask[sat] |= MASK_SATURATED
    weight[sat] = 0.0
    return n_sat


def add_bad_column(
    image: np.ndarray,
    weight: np.ndarray,
    mask: np.ndarray,
    col: int,
    y0: int,
    y1: int,
) -> dict[str, np.ndarray]:
    """Blank a column segment in every band: value 0, weight 0, :data:`MASK_BAD_COLUMN`."""
    _check(image, weight, mask)
    image[:, y0:y1, col] = 0.0
    weight[:, y0:y1, col] = 0.0
    mask[:, y0:y1, col] |= MASK_BAD_COLUMN
    return {
        "kind": np.array(["bad_column"]),
        "band": np.array([-1], np.int16),
        "x": np.array([float(col)]),
        "y": np.array([0.5 * (y0 + y1)]),
        "length_pix": np.array([float(y1 - y0)]),
    }
