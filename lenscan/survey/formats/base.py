"""What every file-layout reader returns: one band file of a tile, its planes readable by rows.

A reader (``des_coadd``, ``afw_exposure``, ...) is registered by name in
:mod:`lenscan.survey.formats`; ingest opens the file (fsspec + astropy) and hands the HDU list to
the reader named by the ingest preset's ``format``. The reader finds the planes, checks them,
and returns a :class:`BandFile` whose :meth:`BandFile.read_rows` yields image, weight and mask
rows in lenscan's conventions (image on the preset's zero point, weight = inverse variance,
mask bits that blank a pixel, 0 = clean), so ingest never branches on the survey.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import numpy as np
from astropy.io import fits

__all__ = ["BandFile", "FormatOptions", "PlaneFile", "TileInputError", "image_hdu"]


class TileInputError(ValueError):
    """Bad input for one tile (the message names the file)."""


class FormatOptions(Protocol):
    """The ingest-preset fields a reader may consult (an ``IngestPreset`` has them all)."""

    @property
    def hdu_science(self) -> str | int: ...
    @property
    def hdu_weight(self) -> str | int | None: ...
    @property
    def hdu_mask(self) -> str | int | None: ...
    @property
    def hdu_variance(self) -> str | int | None: ...
    @property
    def zero_point(self) -> float: ...
    @property
    def zero_point_keyword(self) -> str | None: ...
    @property
    def mask_blank_planes(self) -> tuple[str, ...]: ...
    @property
    def pixel_unit(self) -> str | None: ...


class PlaneFile(NamedTuple):
    """A plane of a band kept in its own file (Euclid MER RMS / FLAG), opened by ingest.

    Readers of such layouts take ``planes={plane: PlaneFile}`` besides the band file.
    """

    hdul: fits.HDUList
    path: str
    nbytes: int


RowReader = Callable[[int, int], tuple[np.ndarray, np.ndarray | None, np.ndarray | None]]


@dataclass
class BandFile:
    """One band file of a tile, opened by a reader.

    Attributes
    ----------
    path : str
        The file's URL (named in every message).
    header : astropy.io.fits.Header
        The image header: the celestial WCS and what the store keeps of it.
    shape_yx : tuple of int
        Image shape.
    nbytes : int
        Size of the file on storage.
    has_weight, has_mask : bool
        Whether :meth:`read_rows` returns weight / mask rows.
    science : astropy HDU
        The image HDU (ingest reads fpack quantisation steps from it).
    rows : callable
        ``rows(y0, y1) -> (image, weight or None, mask or None)``, float32 / float32 / int32.
    info : dict
        JSON-able provenance the store records (mask planes, XY0, units, scale factor).
    check_planes : callable or None
        Checks the weight / mask planes; ingest calls it after the image grid checks (shape,
        WCS), so a file's first problem is reported in that order.
    """

    path: str
    header: fits.Header
    shape_yx: tuple[int, int]
    nbytes: int
    has_weight: bool
    has_mask: bool
    science: Any
    rows: RowReader
    info: dict[str, Any] = field(default_factory=dict)
    check_planes: Callable[[], None] | None = None

    def read_rows(
        self, y0: int, y1: int
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Rows ``y0:y1`` of image, weight and mask; a read error names the file."""
        try:
            return self.rows(y0, y1)
        except TileInputError:
            raise
        except Exception as err:
            raise TileInputError(f"{self.path}: pixel data could not be read ({err})") from None


def image_hdu(hdul: fits.HDUList, key: str | int, path: str, what: str) -> Any:
    """The 2-D image HDU ``key`` (EXTNAME or index) of ``hdul``, or a TileInputError naming it."""
    try:
        hdu = hdul[key]
    except (KeyError, IndexError):
        names = [h.name for h in hdul]
        raise TileInputError(f"{path}: no {what} HDU {key!r} (HDUs: {names})") from None
    if not hdu.is_image or hdu.shape is None or len(hdu.shape) != 2:
        raise TileInputError(f"{path}: {what} HDU {key!r} is not a 2-D image (shape {hdu.shape})")
    return hdu
