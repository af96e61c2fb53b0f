"""File-layout readers, registered by name (astropy unified-I/O style: one reader per layout).

An ingest preset names its ``format``; ingest opens each band file (fsspec + astropy) and calls
that format's reader, which returns a :class:`BandFile`: the image header (WCS), the shape, and
rows of image, weight and mask in lenscan's conventions. A new file layout is one module here
and one :func:`register_format` call; ingest never branches on the survey.

Shipped formats:

``des_coadd``
    DES DESDM coadd tiles: SCI / MSK / WGT HDUs (``.fits`` or fpack ``.fits.fz``).
``afw_exposure``
    LSST Science Pipelines ``ExposureF`` (Rubin DP1 / DP0.2 coadds, HSC-SSP ``calexp``):
    IMAGE / MASK / VARIANCE by EXTNAME, mask planes from ``MP_*`` keywords, nJy or FLUXMAG0.
``euclid_mer``
    Euclid MER mosaics: one file per band and plane, data in HDU 0 (background-subtracted
    image, RMS map, FLAG map); readers of such layouts also take ``planes={name: PlaneFile}``.

Examples
--------
>>> from lenscan.survey.formats import list_formats
>>> list_formats()
['afw_exposure', 'des_coadd', 'euclid_mer']
"""

from __future__ import annotations

from collections.abc import Callable

from lenscan.survey.formats.afw_exposure import open_afw_exposure
from lenscan.survey.formats.base import BandFile, FormatOptions, PlaneFile, TileInputError
from lenscan.survey.formats.des_coadd import open_des_coadd
from lenscan.survey.formats.euclid_mer import open_euclid_mer

__all__ = [
    "BandFile",
    "FormatOptions",
    "PlaneFile",
    "Reader",
    "TileInputError",
    "get_format",
    "list_formats",
    "register_format",
]

#: ``reader(hdul, path, nbytes, options) -> BandFile``; layouts with a file per plane also take
#: ``planes={plane: PlaneFile}`` (the preset's ``files.planes``).
Reader = Callable[..., BandFile]

_READERS: dict[str, Reader] = {}


def register_format(name: str, reader: Reader, *, overwrite: bool = False) -> Reader:
    """Register ``reader`` as the reader of file layout ``name``.

    Parameters
    ----------
    name : str
        The name ingest presets give in their ``format`` field.
    reader : callable
        ``reader(hdul, path, nbytes, options) -> BandFile``; it raises
        :class:`TileInputError` naming the file for bad input.
    overwrite : bool
        Replace an existing reader of that name.

    Returns
    -------
    callable
        ``reader``.
    """
    if not overwrite and name in _READERS and _READERS[name] is not reader:
        raise ValueError(f"a reader for file format {name!r} is already registered")
    _READERS[name] = reader
    return reader


def get_format(name: str) -> Reader:
    """The reader registered for file layout ``name`` (a one-line error lists the known ones)."""
    try:
        return _READERS[name]
    except KeyError:
        raise ValueError(f"unknown file format {name!r}; known formats: {list_formats()}") from None


def list_formats() -> list[str]:
    """Names of the registered file layouts, sorted."""
    return sorted(_READERS)


register_format("des_coadd", open_des_coadd)
register_format("afw_exposure", open_afw_exposure)
register_format("euclid_mer", open_euclid_mer)
