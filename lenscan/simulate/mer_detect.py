"""MER-like detection columns measured on a VIS image (the columns the Q1 selection reads).

Euclid's MER pipeline detects objects SourceExtractor-style: the VIS image filtered with a
PSF-sized kernel, thresholded per pixel, connected pixels forming one segment per object
(after deblending). :func:`mer_detection_columns` does the same on an image and a list of
catalogue positions and returns, per position, MER's ``SEGMENTATION_AREA``, ``MU_MAX``,
``MUMAX_MINUS_MAG``, ``VIS_DET``, ``SPURIOUS_PROB``, ``POINT_LIKE_PROB`` and
``EXTENDED_PROB`` (store names, lower case). Choices, stated:

- filter: a Gaussian of the PSF's FWHM (normalised), threshold ``threshold_sigma`` (1.5) times
  the *unfiltered* per-pixel noise sigma, as SourceExtractor's ``DETECT_THRESH``; 8-connected
  segments;
- deblending: a segment holding several catalogue positions is split among them by nearest
  position (a Voronoi partition of its pixels), a stand-in for MER's multi-threshold
  deblending; a position on a sub-threshold pixel takes the segment of its brightest filtered
  pixel within 2 px, else it is not detected (``vis_det = 0``, NaN sizes);
- ``mu_max``: the brightest unfiltered pixel of the object's part, AB mag/arcsec²;
- ``spurious_prob``: 0 (every catalogue position is a real object; no artefact model);
- ``point_like_prob`` / ``extended_prob``: a logistic in ``mumax_minus_mag`` about a point
  source's value for the Gaussian PSF (point sources are the most concentrated objects).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

__all__ = ["mer_detection_columns", "point_source_mumax_minus_mag"]

#: Half side (px) of the box searched for a segment when a position falls below threshold.
_SEARCH_PIX = 2


def point_source_mumax_minus_mag(psf_fwhm_pix: float, pixel_scale_arcsec: float) -> float:
    """``MU_MAX - MAG`` of a centred point source with a Gaussian PSF of FWHM ``psf_fwhm_pix``.

    Examples
    --------
    >>> round(point_source_mumax_minus_mag(1.7, 0.1), 2)
    -3.54
    """
    s = psf_fwhm_pix / (2 * math.sqrt(2 * math.log(2)))
    peak_fraction = math.erf(0.5 / (s * math.sqrt(2))) ** 2
    return -2.5 * math.log10(peak_fraction / pixel_scale_arcsec**2)


def _segments(image: np.ndarray, sigma: np.ndarray | float, psf_fwhm_pix: float,
              threshold_sigma: float) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Filtered image and its 8-connected segment labels above threshold (0: background)."""
    good = np.isfinite(image)
    filtered = ndimage.gaussian_filter(
        np.where(good, image, 0.0).astype(np.float64), psf_fwhm_pix / 2.3548, mode="constant"
    )
    sig = np.broadcast_to(np.asarray(sigma, dtype=np.float64), image.shape)
    usable = good & np.isfinite(sig) & (sig > 0)
    above = usable & (filtered > threshold_sigma * np.where(usable, sig, np.inf))
    labels, _ = ndimage.label(above, structure=np.ones((3, 3), dtype=bool))
    return filtered, labels


def _owning_segment(labels: np.ndarray, filtered: np.ndarray, ix: int, iy: int) -> int:
    """The segment under pixel (ix, iy), else that of the brightest filtered pixel nearby."""
    if labels[iy, ix]:
        return int(labels[iy, ix])
    ny, nx = labels.shape
    y0, y1 = max(0, iy - _SEARCH_PIX), min(ny, iy + _SEARCH_PIX + 1)
    x0, x1 = max(0, ix - _SEARCH_PIX), min(nx, ix + _SEARCH_PIX + 1)
    box_l, box_f = labels[y0:y1, x0:x1], filtered[y0:y1, x0:x1]
    if not box_l.any():
        return 0
    return int(box_l.flat[np.argmax(np.where(box_l > 0, box_f, -np.inf))])


def _partition(
    labels: np.ndarray,
    image: np.ndarray,
    seg: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Area (px) and peak pixel of each position's part of its segment (NaN where none)."""
    area = np.full(len(seg), np.nan)
    peak = np.full(len(seg), np.nan)
    slices = ndimage.find_objects(labels)
    img = np.where(np.isfinite(image), image, -np.inf)
    for s in np.unique(seg[seg > 0]):
        members = np.flatnonzero(seg == s)
        box = slices[s - 1]
        yy, xx = np.nonzero(labels[box] == s)
        vals = img[box][yy, xx]
        yy, xx = yy + box[0].start, xx + box[1].start
        if len(members) == 1:
            owner = np.zeros(len(yy), dtype=np.int64)
        else:  # nearest catalogue position owns the pixel
            d2 = (xx[:, None] - x[members]) ** 2 + (yy[:, None] - y[members]) ** 2
            owner = np.argmin(d2, axis=1)
        counts = np.bincount(owner, minlength=len(members))
        area[members] = counts
        best = np.full(len(members), -np.inf)
        np.maximum.at(best, owner, vals)
        peak[members] = np.where(counts > 0, best, np.nan)
    return area, peak


def mer_detection_columns(
    image: np.ndarray,
    sigma: np.ndarray | float,
    x: np.ndarray,
    y: np.ndarray,
    mag: np.ndarray,
    *,
    psf_fwhm_pix: float,
    pixel_scale_arcsec: float = 0.1,
    zero_point: float = 23.9,
    threshold_sigma: float = 1.5,
) -> dict[str, np.ndarray]:
    """MER detection and morphology columns of the objects at ``(x, y)`` in a VIS image.

    Parameters
    ----------
    image : ndarray
        Background-subtracted VIS image (2-d), in units where ``zero_point`` is AB of 1.
    sigma : float or ndarray
        Per-pixel noise sigma (a scalar or an RMS map of the image's shape; pixels with
        sigma <= 0 or NaN are never detected).
    x, y : ndarray
        Catalogue pixel positions (0-based, pixel centres at integers).
    mag : ndarray
        Catalogue VIS magnitudes (for ``mumax_minus_mag``).
    psf_fwhm_pix : float
        PSF FWHM in pixels (the detection filter's size).
    pixel_scale_arcsec : float
        Pixel side (arcsec).
    zero_point : float
        AB magnitude of one image unit (23.9 for µJy).
    threshold_sigma : float
        Detection threshold on the filtered image, in units of the unfiltered pixel sigma.

    Returns
    -------
    dict
        ``vis_det`` (int16), ``segmentation_area`` (int32, 0 where undetected),
        ``mu_max``, ``mumax_minus_mag`` (NaN where undetected or the peak is <= 0),
        ``spurious_prob``, ``point_like_prob``, ``extended_prob`` (float32).
    """
    image = np.asarray(image)
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    filtered, labels = _segments(image, sigma, psf_fwhm_pix, threshold_sigma)
    ny, nx = image.shape
    ix, iy = np.round(x).astype(np.int64), np.round(y).astype(np.int64)
    inside = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
    seg = np.zeros(len(x), dtype=np.int64)
    for k in np.flatnonzero(inside):
        seg[k] = _owning_segment(labels, filtered, int(ix[k]), int(iy[k]))
    area, peak = _partition(labels, image, seg, x, y)
    with np.errstate(divide="ignore", invalid="ignore"):
        mu_max = np.where(
            peak > 0, zero_point - 2.5 * np.log10(peak / pixel_scale_arcsec**2), np.nan
        )
    mmm = mu_max - np.asarray(mag, dtype=np.float64)
    psf_mmm = point_source_mumax_minus_mag(psf_fwhm_pix, pixel_scale_arcsec)
    with np.errstate(over="ignore", invalid="ignore"):
        extended = 1.0 / (1.0 + np.exp(-(mmm - psf_mmm - 0.5) / 0.15))
    extended = np.where(np.isfinite(mmm), extended, np.nan)
    return {
        "vis_det": (seg > 0).astype(np.int16),
        "segmentation_area": np.nan_to_num(area, nan=0.0).astype(np.int32),
        "mu_max": mu_max.astype(np.float32),
        "mumax_minus_mag": mmm.astype(np.float32),
        "spurious_prob": np.zeros(len(x), dtype=np.float32),
        "point_like_prob": (1.0 - extended).astype(np.float32),
        "extended_prob": extended.astype(np.float32),
    }
