"""Pieces the benchmark scripts share (run them as ``python benchmarks/NAME.py``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from astropy.wcs import WCS


def tan_wcs(crval: tuple[float, float] = (30.0, -30.0), pixel_scale_arcsec: float = 0.263) -> WCS:
    """A TAN WCS at ``crval`` with square pixels of ``pixel_scale_arcsec``."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = list(crval)
    w.wcs.cdelt = [-pixel_scale_arcsec / 3600, pixel_scale_arcsec / 3600]
    return w


def placeholder_catalog(bands: Sequence[str]) -> dict[str, np.ndarray]:
    """A one-row catalogue with every required column: for stores that only test pixel reads."""
    cat: dict[str, np.ndarray] = {
        "id": np.zeros(1, np.int64),
        "ra": np.zeros(1),
        "dec": np.zeros(1),
        "x": np.zeros(1),
        "y": np.zeros(1),
        "flags": np.zeros(1, np.int32),
        "extended_class": np.full(1, 2, np.int16),
    }
    for b in bands:
        cat[f"mag_{b}"] = np.zeros(1, np.float32)
        cat[f"magerr_{b}"] = np.zeros(1, np.float32)
    return cat
