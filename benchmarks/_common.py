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


def write_des_like_tile(
    folder: str,
    rng: np.random.Generator,
    size: int,
    bands: Sequence[str],
    *,
    crval: tuple[float, float] = (40.0, -30.0),
    sigma: float | np.ndarray = 3.0,
    compress: bool = True,
    lossless: bool = False,
    flagged_fraction: float = 0.0,
    id_offset: int = 0,
) -> tuple[str, dict[str, np.ndarray]]:
    """Write one DES-format tile of noise and point sources; return (tilename, catalogue rows).

    ``sigma`` is the noise per pixel (a number, or a ``(size, size)`` map: the weight is
    ``1 / sigma**2``). ``flagged_fraction`` of the sources get mask bit 4. The rows are in DES
    catalogue columns, ready for ``write_catalog_file``.
    """
    from lenscan.simulate.fits_export import catalog_to_des_columns, des_tilename, write_des_tile

    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = list(crval)
    w.wcs.crpix = [(size + 1) / 2, (size + 1) / 2]
    w.wcs.cd = [[-0.263 / 3600, 0], [0, 0.263 / 3600]]
    name = des_tilename(*crval)
    image = rng.standard_normal((len(bands), size, size), dtype=np.float32)
    image *= np.float32(sigma) if np.isscalar(sigma) else np.asarray(sigma, np.float32)
    n_src = size * size // 4000
    xs, ys = rng.integers(5, size - 5, n_src), rng.integers(5, size - 5, n_src)
    image[:, ys, xs] += rng.uniform(20, 2000, n_src).astype(np.float32)
    inverse_variance = (1 / np.square(np.asarray(sigma, np.float32))).astype(np.float32)
    weight = np.broadcast_to(inverse_variance, image.shape).copy()
    mask = np.zeros(image.shape, dtype=np.int16)
    n_flagged = int(n_src * flagged_fraction)
    mask[:, ys[:n_flagged], xs[:n_flagged]] = 4
    write_des_tile(folder, name, bands=bands, image=image, weight=weight, mask=mask,
                   wcs_header=w.to_header(), compress=compress, lossless=lossless)  # fmt: skip
    ra, dec = w.wcs_pix2world(xs, ys, 0)
    cat = {"id": np.arange(n_src, dtype=np.int64) + id_offset, "ra": ra, "dec": dec}
    for b in bands:
        cat[f"mag_{b}"] = rng.uniform(18, 25, n_src).astype(np.float32)
        cat[f"magerr_{b}"] = np.full(n_src, 0.05, dtype=np.float32)
    return name, catalog_to_des_columns(cat, bands=bands, tilename=name)
