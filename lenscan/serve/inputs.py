"""Decoding and checking uploaded stamps: bytes or JSON in, a validated float32 array out.

Everything a client sends is untrusted. Files are recognised by their magic bytes (``.npy`` or
FITS), their declared array size is checked against the service's limit *before* any pixel is
read (a 2-kB FITS header can declare a terabyte image), and the stamps are checked against the
model: band count and order, stamp size, finite pixels. Every refusal is an :class:`InputError`
that the app turns into a 4xx response carrying the message.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from astropy.io import fits

from lenscan.models import ModelMeta
from lenscan.serve.errors import InputError

__all__ = [
    "FITS_MAGIC",
    "NPY_MAGIC",
    "InputError",
    "check_stamps",
    "decode_file",
    "parse_bands",
]

NPY_MAGIC = b"\x93NUMPY"
FITS_MAGIC = b"SIMPLE  ="


def parse_bands(text: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """Band names from ``"g,r,i"`` or a list; None stays None (the model's own bands)."""
    if text is None:
        return None
    items = text.split(",") if isinstance(text, str) else text
    if not isinstance(items, list | tuple) or not all(isinstance(b, str) for b in items):
        raise InputError(
            f"bands must be band names like 'g,r,i' or a list of them, got {text!r:.80}"
        )
    bands = tuple(b.strip() for b in items)
    if not bands or any(not b for b in bands):
        raise InputError(f"bands must be a comma-separated list of band names, got {text!r}")
    if len(set(bands)) != len(bands):
        raise InputError(f"bands {list(bands)} name a band twice")
    return bands


def decode_file(data: bytes, *, max_elements: int, what: str = "the upload") -> np.ndarray:
    """Read an array from the bytes of a ``.npy`` file or a FITS file (first image HDU).

    Parameters
    ----------
    data : bytes
        The file's bytes.
    max_elements : int
        Largest array accepted, checked on the file's header before its data are read.
    what : str
        Names the input in messages.

    Returns
    -------
    ndarray
        The array as stored (any numeric dtype).
    """
    if data.startswith(NPY_MAGIC):
        return _read_npy(data, max_elements=max_elements, what=what)
    if data.startswith(FITS_MAGIC):
        return _read_fits(data, max_elements=max_elements, what=what)
    head = data[:16]
    raise InputError(
        f"{what} is neither a .npy file (magic {NPY_MAGIC!r}) nor a FITS file (starting "
        f"{FITS_MAGIC.decode()!r}); its first bytes are {head!r}",
        status=400,
    )


def _too_big(shape: Sequence[int], max_elements: int, what: str) -> None:
    n = math.prod(int(s) for s in shape)
    if n > max_elements:
        raise InputError(
            f"{what} declares an array of shape {tuple(shape)} ({n} values); this service "
            f"accepts at most {max_elements} values per request (send fewer stamps per request)",
            status=413,
        )


def _read_npy(data: bytes, *, max_elements: int, what: str) -> np.ndarray:
    buf = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buf)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(buf)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(buf)
        else:
            raise ValueError(f"format version {version} (send version 1.0 or 2.0)")
    except (ValueError, SyntaxError, TypeError, EOFError) as err:
        raise InputError(f"{what}: not a readable .npy file ({err})", status=400) from None
    if dtype.hasobject:
        raise InputError(f"{what}: .npy arrays of Python objects are refused", status=400)
    _too_big(shape, max_elements, what)
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise InputError(f"{what}: not a readable .npy file ({err})", status=400) from None


def _declared_shape(header: fits.Header, prefix: str) -> tuple[int, ...]:
    naxis = int(header.get(f"{prefix}NAXIS", 0))
    # FITS lists axes fastest first; numpy's shape is the reverse.
    return tuple(int(header.get(f"{prefix}NAXIS{i}", 0)) for i in range(naxis, 0, -1))


def _read_fits(data: bytes, *, max_elements: int, what: str) -> np.ndarray:
    try:
        with fits.open(io.BytesIO(data), memmap=False, lazy_load_hdus=True) as hdul:
            for hdu in hdul:
                header = hdu.header
                if isinstance(hdu, fits.CompImageHDU):
                    shape = _declared_shape(header, "")  # astropy shows the image header
                elif isinstance(hdu, fits.PrimaryHDU | fits.ImageHDU):
                    shape = _declared_shape(header, "")
                    bitpix = abs(int(header.get("BITPIX", 8))) // 8
                    if math.prod(shape) * bitpix > len(data):
                        raise InputError(
                            f"{what}: FITS HDU {hdul.index_of(hdu)} declares {shape} pixels but "
                            f"the file holds only {len(data)} bytes (truncated or corrupt)",
                            status=400,
                        )
                else:
                    continue
                if not shape or math.prod(shape) == 0:
                    continue
                _too_big(shape, max_elements, what)
                return np.array(hdu.data)
    except InputError:
        raise
    except Exception as err:  # astropy raises many types on corrupt files: all are bad input
        raise InputError(
            f"{what}: not a readable FITS file ({type(err).__name__}: {err})", status=400
        ) from None
    raise InputError(f"{what}: the FITS file has no image HDU with data", status=400)


def check_stamps(
    arr: np.ndarray,
    meta: ModelMeta,
    *,
    bands: Sequence[str] | None = None,
    max_stamps: int,
) -> np.ndarray:
    """Check uploaded stamps against a model and return them as float32 ``(n, B, S, S)``.

    Parameters
    ----------
    arr : ndarray
        ``(n, band, y, x)`` or one stamp ``(band, y, x)``, raw pixel values (counts).
    meta : ModelMeta
        The model that will score them.
    bands : sequence of str, optional
        The bands of the upload's planes, in order; they must include the model's bands, which
        are picked out in the model's order. Default: the upload holds exactly the model's bands
        in the model's order.
    max_stamps : int
        Most stamps accepted.

    Returns
    -------
    ndarray of float32, shape (n, len(meta.bands), S, S)
    """
    if arr.dtype.kind not in "fiu":
        raise InputError(f"stamps must be real numbers, got dtype {arr.dtype}")
    if arr.ndim == 3:
        arr = arr[None]
    want_b, size = len(meta.bands), meta.stamp_size_pix
    if arr.ndim != 4:
        raise InputError(
            f"stamps must be an array (n, band, y, x) or one stamp (band, y, x); got "
            f"{arr.ndim} dimensions, shape {arr.shape}"
        )
    n, nb, ny, nx = arr.shape
    if n == 0:
        raise InputError("the upload holds no stamps (n = 0)")
    if n > max_stamps:
        raise InputError(
            f"the upload holds {n} stamps; this service scores at most {max_stamps} per request",
            status=413,
        )
    if bands is None:
        if nb != want_b:
            raise InputError(
                f"model {meta.name!r} scores {want_b} bands {list(meta.bands)} in that order, "
                f"but the stamps have {nb} planes; send those bands (or name yours with "
                f"bands=...)"
            )
        index = list(range(nb))
    else:
        if nb != len(bands):
            raise InputError(
                f"bands names {len(bands)} bands {list(bands)} but the stamps have {nb} planes"
            )
        missing = [b for b in meta.bands if b not in bands]
        if missing:
            raise InputError(
                f"model {meta.name!r} needs bands {list(meta.bands)}; the stamps have "
                f"{list(bands)} (missing {missing})"
            )
        index = [list(bands).index(b) for b in meta.bands]
    if (ny, nx) != (size, size):
        raise InputError(
            f"model {meta.name!r} scores {size} x {size} px stamps at "
            f"{meta.pixel_scale_arcsec:g} arcsec/px; the stamps are {ny} x {nx} px"
        )
    with np.errstate(over="ignore"):  # values beyond float32 become inf, refused just below
        out = np.ascontiguousarray(arr[:, index], dtype=np.float32)
    bad = ~np.isfinite(out)
    if bad.any():
        k, b = np.argwhere(bad.any(axis=(2, 3)))[0]
        raise InputError(
            f"stamps hold {int(bad.sum())} non-finite pixels (NaN or inf), the first in stamp "
            f"{int(k)}, band {meta.bands[int(b)]!r}; send finite raw pixel values (counts) "
            "(values beyond float32 range count as non-finite)"
        )
    return out
