"""The ``afw_exposure`` reader: LSST Science Pipelines ``ExposureF`` files (Rubin and HSC).

Layout, as lsst/afw writes it (``ExposureInfo.cc``, ``MaskedImage.cc``, ``Mask.cc``): HDU 0 holds
only metadata; ``EXTNAME=IMAGE``, ``MASK`` and ``VARIANCE`` follow (found here by EXTNAME, never
by position), then binary-table archives (PSF, exact WCS, calibration) that ingest ignores. The
mask is an integer image whose bit planes are named per file by ``MP_<PLANE>=<bit>`` header
keywords; the bit numbers differ between files, so they are read from each file and the planes
the preset lists as blanking (``NO_DATA``, ``SAT``, ``BAD``, ...) are remapped to fixed store
bits (bit ``i`` = the preset's ``i``-th blanking plane). Planes such as ``DETECTED`` do not blank
a pixel and are not stored. Weight = 1 / variance (0 where the variance is not finite or <= 0).

The image HDU carries a TAN WCS in the file's own pixels and a ``LINEAR`` "A" WCS whose
``CRVAL1A/CRVAL2A`` is the patch origin (XY0) in tract pixels; XY0 is recorded. Pixels are put
on the preset's zero point: Rubin coadds are in nJy (``BUNIT``; AB = 31.4 - 2.5 log10 f), HSC
coadds have ``FLUXMAG0`` (AB = 2.5 log10 FLUXMAG0 - 2.5 log10 f; 27.0 for PDR3): a file on
another zero point is rescaled (and its variance with it), and the factor recorded.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from astropy.io import fits

from lenscan.survey.formats.base import BandFile, FormatOptions, TileInputError, image_hdu

__all__ = ["NJY_ZERO_POINT", "mask_planes", "open_afw_exposure"]

#: AB magnitude of 1 nJy: 31.4 (AB = -2.5 log10(f / 3631 Jy)).
NJY_ZERO_POINT = 2.5 * math.log10(3631e9)


def mask_planes(header: fits.Header) -> dict[str, int]:
    """The ``MP_<PLANE>=<bit>`` planes of an afw MASK header: plane name -> bit number."""
    planes = {}
    for key, value in header.items():
        if key.startswith("MP_") and len(key) > 3:
            planes[key[3:]] = int(value)
    return planes


def open_afw_exposure(
    hdul: fits.HDUList, path: str, nbytes: int, options: FormatOptions
) -> BandFile:
    """Read one afw ``ExposureF`` band file (a Rubin or HSC coadd patch).

    Parameters
    ----------
    hdul : astropy.io.fits.HDUList
        The open file.
    path : str
        Its URL (for messages).
    nbytes : int
        Its size on storage.
    options : FormatOptions
        The ingest preset: HDU EXTNAMEs, blanking mask planes, pixel unit and zero point.

    Returns
    -------
    BandFile
    """
    sci = _named_hdu(hdul, options.hdu_science, path, "image")
    shape = (int(sci.shape[0]), int(sci.shape[1]))
    scale, zp_info = _flux_scale(hdul, sci.header, options, path)
    var = _named_hdu(hdul, options.hdu_variance, path, "variance", shape)
    mask = _named_hdu(hdul, options.hdu_mask, path, "mask", shape)
    remap = _mask_remap(mask, options, path) if mask is not None else {}
    info: dict[str, Any] = {"format": "afw_exposure", **zp_info, "xy0": _xy0(sci.header)}
    if mask is not None:
        info["mask_planes_file"] = mask_planes(mask.header)
        info["mask_planes_store"] = {p: s for p, (_, s) in remap.items()}

    def rows(y0: int, y1: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        image = np.asarray(sci.section[y0:y1, :], dtype=np.float32)
        if scale != 1.0:
            image = image * np.float32(scale)
        weight = None if var is None else _weight(var.section[y0:y1, :], scale)
        bits = None if mask is None else _blank_bits(mask.section[y0:y1, :], remap)
        return image, weight, bits

    return BandFile(
        path=path,
        header=sci.header,
        shape_yx=shape,
        nbytes=nbytes,
        has_weight=var is not None,
        has_mask=mask is not None,
        science=sci,
        rows=rows,
        info=info,
    )


def _named_hdu(
    hdul: fits.HDUList,
    key: str | int | None,
    path: str,
    what: str,
    shape: tuple[int, int] | None = None,
) -> Any:
    if key is None:
        return None
    if isinstance(key, str):
        names = [h.name for h in hdul]
        if key.upper() not in names:
            raise TileInputError(
                f"{path}: no {key} HDU (EXTNAME={key}; HDUs: {names}): not an afw Exposure "
                f"with its {what} plane"
            )
    hdu = image_hdu(hdul, key, path, what)
    if shape is not None and tuple(hdu.shape) != shape:
        raise TileInputError(f"{path}: {what} HDU shape {hdu.shape} != image shape {shape}")
    return hdu


def _mask_remap(mask: Any, options: FormatOptions, path: str) -> dict[str, tuple[int, int]]:
    """Blanking plane -> (bit in this file, bit in the store), from the file's MP_* keywords."""
    planes = mask_planes(mask.header)
    if not planes:
        raise TileInputError(
            f"{path}: the MASK HDU has no MP_<PLANE>=<bit> keywords, so which bits mean "
            f"{list(options.mask_blank_planes)} cannot be known; not an afw mask"
        )
    bad = {p: b for p, b in planes.items() if not 0 <= b < 32}
    if bad:
        raise TileInputError(f"{path}: mask plane bit numbers {bad} are outside 0-31")
    return {p: (planes[p], i) for i, p in enumerate(options.mask_blank_planes) if p in planes}


def _blank_bits(raw: Any, remap: dict[str, tuple[int, int]]) -> np.ndarray:
    m = np.asarray(raw).astype(np.int32, copy=False).view(np.uint32)
    out = np.zeros(m.shape, dtype=np.uint32)
    for file_bit, store_bit in remap.values():
        out |= ((m >> np.uint32(file_bit)) & np.uint32(1)) << np.uint32(store_bit)
    return out.view(np.int32)


def _weight(raw: Any, scale: float) -> np.ndarray:
    var = np.asarray(raw, dtype=np.float32)
    if scale != 1.0:
        var = var * np.float32(scale * scale)
    good = np.isfinite(var) & (var > 0)
    weight = np.zeros(var.shape, dtype=np.float32)
    np.divide(np.float32(1.0), var, out=weight, where=good)
    return weight


def _header_value(hdul: fits.HDUList, header: fits.Header, key: str) -> Any:
    """``key`` from the image header, else from the primary header (afw puts metadata there)."""
    if key in header:
        return header[key]
    primary = hdul[0].header
    return primary.get(key)


def _flux_scale(
    hdul: fits.HDUList, header: fits.Header, options: FormatOptions, path: str
) -> tuple[float, dict[str, Any]]:
    """Factor that puts this file's pixels on the preset's zero point, and its provenance."""
    unit = _header_value(hdul, header, "BUNIT")
    if options.pixel_unit is not None:
        want = options.pixel_unit.strip().lower()
        if unit is not None and str(unit).strip().lower() != want:
            raise TileInputError(
                f"{path}: pixels are in BUNIT={unit!r}, but the preset expects {options.pixel_unit}"
            )
        if want != "njy":
            raise TileInputError(f"{path}: pixel unit {options.pixel_unit!r} is not supported")
        zp_file, source = NJY_ZERO_POINT, "nJy"
    else:
        zp_file, source = _file_zero_point(hdul, header, options, path)
    scale = 10.0 ** (0.4 * (options.zero_point - zp_file))
    if math.isclose(scale, 1.0, rel_tol=1e-4):
        scale = 1.0
    info = {"file_zero_point": zp_file, "zero_point_source": source, "flux_scale": scale}
    return scale, info


def _file_zero_point(
    hdul: fits.HDUList, header: fits.Header, options: FormatOptions, path: str
) -> tuple[float, str]:
    for key in ("FLUXMAG0", options.zero_point_keyword):
        value = _header_value(hdul, header, key) if key else None
        if value is None:
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise TileInputError(f"{path}: header {key}={value!r} is not a number") from None
        if key == "FLUXMAG0":
            if not (math.isfinite(number) and number > 0):
                raise TileInputError(f"{path}: header FLUXMAG0={value!r} must be positive")
            return 2.5 * math.log10(number), "FLUXMAG0"
        if not math.isfinite(number):
            raise TileInputError(f"{path}: header {key}={value!r} is not finite")
        return number, str(key)
    return options.zero_point, "preset"


def _xy0(header: fits.Header) -> list[int] | None:
    """Patch origin in tract pixels from the LINEAR "A" WCS (afw's XY0), or None."""
    if "CRVAL1A" not in header or "CRVAL2A" not in header:
        return None
    crpix = [float(header.get("CRPIX1A", 1.0)), float(header.get("CRPIX2A", 1.0))]
    crval = [float(header["CRVAL1A"]), float(header["CRVAL2A"])]
    # FITS pixel CRPIXnA (1-based) is tract pixel CRVALnA: the origin is pixel 1's value.
    return [round(crval[0] - (crpix[0] - 1)), round(crval[1] - (crpix[1] - 1))]
