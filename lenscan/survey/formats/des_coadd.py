"""The ``des_coadd`` reader: DES DESDM coadd tiles, one file per band with SCI / MSK / WGT HDUs.

The science, mask and weight HDUs are named by the ingest preset (EXTNAME or index); the files
may be plain ``.fits`` or fpack ``.fits.fz`` (rows are decompressed through ``hdu.section``, so
only the rows asked for are read). The weight HDU is an inverse variance already; the mask's
bits are kept as they are (any bit blanks a pixel). A science header with the preset's
``zero_point_keyword`` (``MAGZERO``) must agree with the preset's zero point.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from astropy.io import fits

from lenscan.survey.formats.base import BandFile, FormatOptions, TileInputError, image_hdu

__all__ = ["open_des_coadd"]


def open_des_coadd(hdul: fits.HDUList, path: str, nbytes: int, options: FormatOptions) -> BandFile:
    """Read one DES coadd band file.

    Parameters
    ----------
    hdul : astropy.io.fits.HDUList
        The open file.
    path : str
        Its URL (for messages).
    nbytes : int
        Its size on storage.
    options : FormatOptions
        The ingest preset (HDU names, zero point and its keyword).

    Returns
    -------
    BandFile
    """
    sci = image_hdu(hdul, options.hdu_science, path, "science")
    shape = (int(sci.shape[0]), int(sci.shape[1]))
    _check_zero_point(sci.header, options, path)
    aux: dict[str, Any] = {}

    def check_planes() -> None:
        aux["weight"] = _aux_hdu(hdul, options.hdu_weight, path, "weight", shape)
        aux["mask"] = _aux_hdu(hdul, options.hdu_mask, path, "mask", shape)

    def rows(y0: int, y1: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        if not aux:
            check_planes()
        weight, mask = aux["weight"], aux["mask"]
        image = np.asarray(sci.section[y0:y1, :], dtype=np.float32)
        w = m = None
        if weight is not None:
            w = np.asarray(weight.section[y0:y1, :], dtype=np.float32)
            if np.any(w < 0):
                # An inverse variance is never negative: corrupt input.
                raise TileInputError(f"{path}: the weight HDU has negative values")
        if mask is not None:
            m = np.asarray(mask.section[y0:y1, :]).astype(np.int32, copy=False)
        return image, w, m

    return BandFile(
        path=path,
        header=sci.header,
        shape_yx=shape,
        nbytes=nbytes,
        has_weight=options.hdu_weight is not None,
        has_mask=options.hdu_mask is not None,
        science=sci,
        rows=rows,
        check_planes=check_planes,
    )


def _aux_hdu(
    hdul: fits.HDUList, key: str | int | None, path: str, what: str, shape: tuple[int, int]
) -> Any:
    if key is None:
        return None
    hdu = image_hdu(hdul, key, path, what)
    if tuple(hdu.shape) != shape:
        raise TileInputError(f"{path}: {what} HDU shape {hdu.shape} != {shape}")
    return hdu


def _check_zero_point(header: fits.Header, options: FormatOptions, path: str) -> None:
    key = options.zero_point_keyword
    if not key or key not in header:
        return
    try:
        value = float(header[key])
    except (TypeError, ValueError):
        raise TileInputError(f"{path}: header {key}={header[key]!r} is not a number") from None
    if not math.isclose(value, options.zero_point, abs_tol=1e-4):
        raise TileInputError(
            f"{path}: header {key}={value} differs from the preset's zero point "
            f"{options.zero_point}; lenscan stores one zero point per survey preset"
        )
