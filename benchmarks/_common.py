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


def one_tile_store(
    url: str,
    image: np.ndarray,
    bands: Sequence[str],
    *,
    storage_options: dict | None = None,
    crval: tuple[float, float] = (30.0, -30.0),
    **layout,
):
    """A survey of one tile ``"t"`` holding ``image``, written with ``layout`` (chunk_pix, ...).

    Returns the tile as read back from the store.
    """
    from lenscan.survey import create_survey, open_survey

    survey = create_survey(url, name="bench", bands=bands, storage_options=storage_options,
                           overwrite=True)  # fmt: skip
    survey.write_tile("t", image=image, wcs_header=tan_wcs(crval).to_header(),
                      catalog=placeholder_catalog(bands), pixel_scale_arcsec=0.263,
                      zero_point=30.0, **layout)  # fmt: skip
    return open_survey(url, storage_options).tile("t")
