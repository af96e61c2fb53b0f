"""The ``euclid_mer`` reader: Euclid MER mosaics, one file per band and plane, data in HDU 0.

Layout, as the MER pipeline publishes Q1 (IRSA, the ESA archive, the public bucket's
``q1/MER/<tile>/<instrument>/``): the background-subtracted image
``EUC_MER_BGSUB-MOSAIC-<BAND>_TILE<tile>-<hash>_<timestamp>Z_00.00.fits``, its RMS map
``EUC_MER_MOSAIC-<BAND>-RMS_TILE...`` and its flag map ``EUC_MER_MOSAIC-<BAND>-FLAG_TILE...``,
each a single image in the primary HDU (an fpack copy with the image in HDU 1 is read too).
Every band, VIS, NISP and the external ground-based ones, is resampled onto the tile's one
0.1"/px grid, so the planes of a band must have the image's shape and WCS.

Weight = 1 / RMS² (0 where the RMS is zero, negative, NaN or infinite: no data there); an RMS
file with no usable pixel at all fails the tile, naming it. The flag map's bits are kept (any
bit blanks a pixel). Pixels are on the AB zero point 23.9 (µJy); a file whose ``MAGZERO``
says otherwise is rescaled to the preset's zero point (and its weight with it).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from astropy.io import fits

from lenscan.survey.formats.base import BandFile, FormatOptions, PlaneFile, TileInputError

__all__ = ["open_euclid_mer", "rms_to_weight"]

#: WCS keywords that must agree between an image and its RMS / FLAG files.
_GRID_KEYS = ("CRVAL1", "CRVAL2", "CRPIX1", "CRPIX2", "CD1_1", "CD1_2", "CD2_1", "CD2_2")


def rms_to_weight(rms: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Inverse variance ``1 / (scale * rms)²`` (float32), 0 where the RMS is not positive finite.

    Examples
    --------
    >>> rms_to_weight(np.array([0.5, 0.0, np.nan, np.inf, -1.0])).tolist()
    [4.0, 0.0, 0.0, 0.0, 0.0]
    """
    # One float32 copy, squared in place: a 19,200-px-wide row block is 150 MB per plane.
    r = np.array(rms, dtype=np.float32)
    if scale != 1.0:
        r *= np.float32(scale)
    with np.errstate(invalid="ignore"):
        good = np.isfinite(r) & (r > 0)
    np.multiply(r, r, out=r)
    weight = np.zeros(r.shape, dtype=np.float32)
    np.divide(np.float32(1.0), r, out=weight, where=good)
    del r
    # 1/rms² overflows float32 for tiny RMS values: no finite weight is no data either.
    weight[~np.isfinite(weight)] = 0.0
    return weight


def open_euclid_mer(
    hdul: fits.HDUList,
    path: str,
    nbytes: int,
    options: FormatOptions,
    *,
    planes: dict[str, PlaneFile] | None = None,
) -> BandFile:
    """Read one Euclid MER band: its image file and its ``rms`` and ``flag`` plane files.

    Parameters
    ----------
    hdul : astropy.io.fits.HDUList
        The open background-subtracted image file.
    path : str
        Its URL (for messages).
    nbytes : int
        Its size on storage.
    options : FormatOptions
        The ingest preset (zero point and its keyword).
    planes : dict, optional
        ``{"rms": PlaneFile, "flag": PlaneFile}``; either may be absent (no weight / mask).

    Returns
    -------
    BandFile
    """
    planes = planes or {}
    sci = _data_hdu(hdul, path, "image")
    shape = (int(sci.shape[0]), int(sci.shape[1]))
    scale, zp_info = _flux_scale(sci.header, options, path)
    rms = planes.get("rms")
    flag = planes.get("flag")
    aux: dict[str, Any] = {}
    good_rms = [0]

    def check_planes() -> None:
        aux["rms"] = _plane_hdu(rms, sci.header, shape, "RMS") if rms else None
        aux["flag"] = _plane_hdu(flag, sci.header, shape, "FLAG") if flag else None

    def rows(y0: int, y1: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        if not aux:
            check_planes()
        image = np.asarray(sci.section[y0:y1, :], dtype=np.float32)
        if scale != 1.0:
            image = image * np.float32(scale)
        weight = mask = None
        if aux["rms"] is not None:
            assert rms is not None
            weight = _read_plane(rms, lambda: rms_to_weight(aux["rms"].section[y0:y1, :], scale))
            good_rms[0] += int(np.count_nonzero(weight))
            if y1 == shape[0] and good_rms[0] == 0:
                raise TileInputError(
                    f"{rms.path}: the RMS map has no positive finite pixel (all zero, NaN or "
                    "infinite): no weight can be made"
                )
        if aux["flag"] is not None:
            assert flag is not None
            mask = _read_plane(flag, lambda: _flag_bits(aux["flag"].section[y0:y1, :]))
        return image, weight, mask

    info = {"format": "euclid_mer", **zp_info, "planes": {k: p.path for k, p in planes.items()}}
    return BandFile(
        path=path,
        header=sci.header,
        shape_yx=shape,
        nbytes=nbytes + sum(p.nbytes for p in planes.values()),
        has_weight=rms is not None,
        has_mask=flag is not None,
        science=sci,
        rows=rows,
        info=info,
        check_planes=check_planes,
    )


def _data_hdu(hdul: fits.HDUList, path: str, what: str) -> Any:
    """The image HDU: the primary one (MER), or the first extension with 2-D data (fpack)."""
    try:
        for hdu in hdul:
            if hdu.is_image and hdu.shape is not None and len(hdu.shape) == 2:
                return hdu
            if hdu.is_image and hdu.shape and len(hdu.shape) != 2:
                break
    except Exception as err:
        raise TileInputError(f"{path}: not a readable FITS file ({err})") from None
    raise TileInputError(f"{path}: no 2-D {what} in HDU 0 (or an fpack extension)")


def _plane_hdu(
    plane: PlaneFile, image_header: fits.Header, shape: tuple[int, int], what: str
) -> Any:
    """The plane file's image HDU, checked to be on the image's pixel grid."""
    hdu = _data_hdu(plane.hdul, plane.path, what)
    if tuple(hdu.shape) != shape:
        raise TileInputError(
            f"{plane.path}: {what} map shape {tuple(hdu.shape)} differs from its image's {shape}"
        )
    for key in _GRID_KEYS:
        a, b = hdu.header.get(key), image_header.get(key)
        if a is not None and b is not None and not math.isclose(float(a), float(b), abs_tol=1e-9):
            raise TileInputError(
                f"{plane.path}: {what} map {key}={a} differs from its image's {b}: not on the "
                "image's pixel grid"
            )
    return hdu


def _read_plane(plane: PlaneFile, read: Any) -> np.ndarray:
    try:
        return read()
    except TileInputError:
        raise
    except Exception as err:
        raise TileInputError(f"{plane.path}: pixel data could not be read ({err})") from None


def _flag_bits(raw: Any) -> np.ndarray:
    m = np.asarray(raw)
    if m.dtype.kind == "f":  # some flag maps are stored as floats: keep their integer bits
        m = np.nan_to_num(m, nan=0.0).astype(np.int64)
    if m.dtype.kind == "u":
        return m.astype(np.uint32).view(np.int32)
    return m.astype(np.int32)


def _flux_scale(
    header: fits.Header, options: FormatOptions, path: str
) -> tuple[float, dict[str, Any]]:
    """Factor that puts the file on the preset's zero point (``MAGZERO`` when it has one)."""
    key = options.zero_point_keyword
    zp_file, source = options.zero_point, "preset"
    if key and key in header:
        try:
            zp_file, source = float(header[key]), key
        except (TypeError, ValueError):
            raise TileInputError(f"{path}: header {key}={header[key]!r} is not a number") from None
        if not math.isfinite(zp_file):
            raise TileInputError(f"{path}: header {key}={header[key]!r} is not finite")
    scale = 10.0 ** (0.4 * (options.zero_point - zp_file))
    if math.isclose(scale, 1.0, rel_tol=1e-6):
        scale = 1.0
    return scale, {"file_zero_point": zp_file, "zero_point_source": source, "flux_scale": scale}
