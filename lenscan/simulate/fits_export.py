"""Write survey tiles as DES DR2 style coadd FITS files plus a DES-style object catalogue.

DES DR2 publishes one file per tile and band, ``{TILENAME}_r4907p01_{band}.fits.fz``: an empty
primary HDU followed by three fpack tile-compressed image extensions, ``SCI`` (the coadd, counts
at zero point 30, TAN WCS), ``MSK`` (integer bit mask) and ``WGT`` (inverse variance). Real DES
science and weight planes are *lossy*: floats are quantised (``RICE_1``, ``quantize_level`` 16,
subtractive dithering). :func:`write_des_tile` can write that (``lossless=False``), but its
default is lossless ``GZIP_2`` with ``quantize_level=0`` so that tests can compare pixels exactly
after a FITS -> store round trip. ``compress=False`` writes plain ``.fits`` with the same HDUs.

The catalogue uses the DES DR2 column names (``COADD_OBJECT_ID``, ``TILENAME``, ``RA``, ``DEC``,
``MAG_AUTO_{G,R,I,Z,Y}``, ``MAGERR_AUTO_*``, ``FLAGS_*``, ``EXTENDED_CLASS_COADD``), as FITS or
Parquet. Unmeasured magnitudes are written as 99, as DES does.
"""

from __future__ import annotations

import io
import posixpath
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
from astropy.io import fits

__all__ = [
    "DES_BAD_MAG",
    "DES_FILE_BAND",
    "DES_RUN_TAG",
    "DesFitsExport",
    "catalog_to_des_columns",
    "des_file_name",
    "des_tilename",
    "write_catalog_file",
    "write_des_fits",
    "write_des_tile",
]

#: DES DR2 processing tag in the file names.
DES_RUN_TAG = "r4907p01"
#: Band token used in DES file names and column suffixes (DES writes the Y band upper-case).
DES_FILE_BAND = {"g": "g", "r": "r", "i": "i", "z": "z", "y": "Y"}
#: Value DES uses for magnitudes that were not measured.
DES_BAD_MAG = 99.0


@dataclass(frozen=True)
class DesFitsExport:
    """What :func:`write_des_fits` wrote.

    Attributes
    ----------
    out_dir : str
        Output folder (fsspec URL or path).
    tilenames : dict
        Store tile id -> DES tile name used in the file names.
    files : dict
        DES tile name -> {band: file URL}.
    catalog_path : str
        URL of the catalogue file.
    """

    out_dir: str
    tilenames: dict[str, str] = field(default_factory=dict)
    files: dict[str, dict[str, str]] = field(default_factory=dict)
    catalog_path: str = ""


def des_tilename(ra_deg: float, dec_deg: float) -> str:
    """DES-style tile name ``DEShhmm±ddmm`` for a tile centred on ``(ra_deg, dec_deg)``.

    RA is written in hours and minutes of time, Dec in degrees and arcminutes, both rounded to
    the nearest minute (as the DES tile names are).

    Examples
    --------
    >>> des_tilename(40.0, -30.0)
    'DES0240-3000'
    """
    if not (np.isfinite(ra_deg) and np.isfinite(dec_deg)) or abs(dec_deg) > 90:
        raise ValueError(f"tile centre must be finite with |dec| <= 90, got ({ra_deg}, {dec_deg})")
    ra_min = round((ra_deg % 360.0) / 15.0 * 60.0) % (24 * 60)
    dec_min = round(abs(dec_deg) * 60.0)
    sign = "-" if dec_deg < 0 else "+"
    return f"DES{ra_min // 60:02d}{ra_min % 60:02d}{sign}{dec_min // 60:02d}{dec_min % 60:02d}"


def des_file_name(
    tilename: str, band: str, *, compress: bool = True, run_tag: str = DES_RUN_TAG
) -> str:
    """File name of one DES coadd tile in one band, e.g. ``DES0240-3000_r4907p01_g.fits.fz``."""
    token = DES_FILE_BAND.get(band, band)
    return f"{tilename}_{run_tag}_{token}.fits" + (".fz" if compress else "")


def _image_hdu(
    data: np.ndarray,
    header: fits.Header,
    name: str,
    *,
    compress: bool,
    lossless: bool,
    dither_seed: int,
) -> fits.ImageHDU | fits.CompImageHDU:
    if not compress:
        return fits.ImageHDU(data=data, header=header, name=name)
    if np.issubdtype(data.dtype, np.integer):
        # Integer planes (the mask) are always compressed losslessly, as fpack does.
        return fits.CompImageHDU(data=data, header=header, name=name, compression_type="RICE_1")
    if lossless:
        # quantize_level=0 with GZIP_2 keeps IEEE floats bit for bit (RICE would quantise).
        return fits.CompImageHDU(
            data=data, header=header, name=name, compression_type="GZIP_2", quantize_level=0.0
        )
    # DES-like lossy float compression: quantised to sigma/16 with subtractive dithering.
    return fits.CompImageHDU(
        data=data,
        header=header,
        name=name,
        compression_type="RICE_1",
        quantize_level=16.0,
        quantize_method=2,
        dither_seed=dither_seed,
    )


def write_des_tile(
    out_dir: str,
    tilename: str,
    *,
    bands: Sequence[str],
    image: np.ndarray,
    wcs_header: fits.Header | Mapping[str, Any],
    weight: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    zero_point: float = 30.0,
    compress: bool = True,
    lossless: bool = True,
    run_tag: str = DES_RUN_TAG,
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Write one tile as DES-style coadd files, one per band.

    Each file holds an empty primary HDU, then ``SCI`` (HDU 1, float32, the TAN WCS in its
    header), ``MSK`` (int16, if ``mask`` is given) and ``WGT`` (float32 inverse variance, if
    ``weight`` is given), in DES order.

    Parameters
    ----------
    out_dir : str
        Folder or fsspec URL; created if needed.
    tilename : str
        Tile name used in the file names and the ``TILENAME`` keyword.
    bands : sequence of str
        Band of each plane of ``image``.
    image : ndarray, shape (band, y, x)
        Science pixels in counts.
    wcs_header : astropy Header or mapping
        Header cards holding the tile's celestial WCS (copied into every HDU).
    weight, mask : ndarray, shape (band, y, x), optional
        Inverse-variance weight and integer mask planes.
    zero_point : float
        Photometric zero point, written as ``MAGZERO``.
    compress : bool
        Write fpack-style ``.fits.fz`` (tile-compressed) rather than plain ``.fits``.
    lossless : bool
        With ``compress``: lossless ``GZIP_2`` floats (default) or DES-like lossy quantised
        ``RICE_1`` (``quantize_level=16``, subtractive dithering).
    run_tag : str
        Processing tag in the file name.
    storage_options : mapping, optional
        fsspec options for ``out_dir``.

    Returns
    -------
    dict
        band -> URL of the file written.
    """
    image = np.asarray(image)
    bands = [str(b) for b in bands]
    _check_des_planes(tilename, bands, image, weight, mask)
    fs, root = fsspec.core.url_to_fs(out_dir, **dict(storage_options or {}))
    fs.makedirs(root, exist_ok=True)
    base = fits.Header()
    for card in fits.Header(
        dict(wcs_header) if isinstance(wcs_header, Mapping) else wcs_header
    ).cards:
        if card.keyword not in ("SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "EXTEND", ""):
            base.append(card)
    written: dict[str, str] = {}
    for b, band in enumerate(bands):
        planes = [("SCI", "IMAGE", image[b].astype(np.float32, copy=False))]
        if mask is not None:
            planes.append(("MSK", "MASK", np.asarray(mask[b]).astype(np.int16, copy=False)))
        if weight is not None:
            planes.append(("WGT", "WEIGHT", np.asarray(weight[b]).astype(np.float32, copy=False)))
        hdus = _band_hdus(tilename, band, planes, base, zero_point, compress, lossless)
        path = posixpath.join(
            root, des_file_name(tilename, band, compress=compress, run_tag=run_tag)
        )
        buf = io.BytesIO()
        fits.HDUList(hdus).writeto(buf, output_verify="exception")
        with fs.open(path, "wb") as f:
            f.write(buf.getvalue())
        written[band] = fs.unstrip_protocol(path)
    return written


def _check_des_planes(
    tilename: str, bands: list[str], image: np.ndarray, weight: Any, mask: Any
) -> None:
    if image.ndim != 3 or image.shape[0] != len(bands):
        raise ValueError(
            f"tile {tilename!r}: image must be (band, y, x) with {len(bands)} bands {bands}, "
            f"got shape {image.shape}"
        )
    for name, plane in (("weight", weight), ("mask", mask)):
        if plane is not None and np.shape(plane) != image.shape:
            raise ValueError(
                f"tile {tilename!r}: {name} shape {np.shape(plane)} differs from the image "
                f"shape {image.shape}"
            )


def _band_hdus(
    tilename: str,
    band: str,
    planes: list[tuple[str, str, np.ndarray]],
    base: fits.Header,
    zero_point: float,
    compress: bool,
    lossless: bool,
) -> list[Any]:
    """The HDUs of one band file: an empty primary, then ``(EXTNAME, DES_EXT, data)`` planes."""
    seed = zlib.crc32(f"{tilename}:{band}".encode()) % 10000 + 1
    prim = fits.PrimaryHDU()
    prim.header["TILENAME"] = (tilename, "DES tile name")
    prim.header["BAND"] = (band, "filter band")
    hdus: list[Any] = [prim]
    for extname, des_ext, data in planes:
        hdr = base.copy()
        hdr["TILENAME"] = (tilename, "DES tile name")
        hdr["BAND"] = (band, "filter band")
        hdr["MAGZERO"] = (float(zero_point), "photometric zero point (AB)")
        hdr["DES_EXT"] = (des_ext, "DES extension type")
        hdus.append(
            _image_hdu(data, hdr, extname, compress=compress, lossless=lossless, dither_seed=seed)
        )
    return hdus


def catalog_to_des_columns(
    catalog: Mapping[str, np.ndarray], *, bands: Sequence[str], tilename: str | np.ndarray
) -> dict[str, np.ndarray]:
    """Rename lenscan catalogue columns (see ``docs/architecture.md``) to DES DR2 names.

    Pure function. ``flags`` is copied to every ``FLAGS_{BAND}`` column (lenscan keeps one OR-ed
    flag column); NaN magnitudes become 99.

    Parameters
    ----------
    catalog : mapping of str -> ndarray
        Needs ``id``, ``ra``, ``dec``, ``mag_{band}``, ``magerr_{band}``; ``flags`` and
        ``extended_class`` default to 0 and -9.
    bands : sequence of str
        Bands to export.
    tilename : str or ndarray of str
        DES tile name of every row.

    Returns
    -------
    dict of str -> ndarray
    """
    needed = ["id", "ra", "dec"] + [f"{p}_{b}" for b in bands for p in ("mag", "magerr")]
    missing = [c for c in needed if c not in catalog]
    if missing:
        raise ValueError(f"catalogue lacks columns {missing} needed for the DES export")
    n = len(np.asarray(catalog["id"]))
    names = np.broadcast_to(np.asarray(tilename, dtype=str), (n,))
    out: dict[str, np.ndarray] = {
        "COADD_OBJECT_ID": np.asarray(catalog["id"], dtype=np.int64),
        "TILENAME": np.asarray(names, dtype=f"U{max(1, names.dtype.itemsize // 4)}"),
        "RA": np.asarray(catalog["ra"], dtype=np.float64),
        "DEC": np.asarray(catalog["dec"], dtype=np.float64),
    }
    flags = np.asarray(catalog.get("flags", np.zeros(n)), dtype=np.int32)
    for b in bands:
        token = DES_FILE_BAND.get(b, b).upper()
        for ours, theirs in (("mag", "MAG_AUTO"), ("magerr", "MAGERR_AUTO")):
            v = np.asarray(catalog[f"{ours}_{b}"], dtype=np.float32)
            out[f"{theirs}_{token}"] = np.where(np.isfinite(v), v, np.float32(DES_BAD_MAG))
        out[f"FLAGS_{token}"] = flags.astype(np.int16)
    out["EXTENDED_CLASS_COADD"] = np.asarray(
        catalog.get("extended_class", np.full(n, -9)), dtype=np.int16
    )
    return out


def write_catalog_file(
    path: str,
    columns: Mapping[str, np.ndarray],
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> str:
    """Write columns as a FITS binary table (``.fits``) or Parquet (``.parquet``) file.

    Returns the URL written. The format follows the file extension.
    """
    fs, p = fsspec.core.url_to_fs(path, **dict(storage_options or {}))
    parent = posixpath.dirname(p)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    lower = p.lower()
    buf = io.BytesIO()
    if lower.endswith((".parquet", ".pq")):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({k: np.asarray(v) for k, v in columns.items()}), buf)
    elif lower.endswith((".fits", ".fit", ".fits.gz")):
        cols = []
        for k, v in columns.items():
            v = np.asarray(v)
            if v.dtype.kind == "U":
                v = v.astype(f"S{max(1, v.dtype.itemsize // 4)}")
            cols.append(fits.Column(name=k, array=v, format=_fits_format(v)))
        hdu = fits.BinTableHDU.from_columns(cols, name="CATALOG")
        fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(buf)
    else:
        raise ValueError(f"catalogue file {path!r}: extension must be .fits or .parquet")
    with fs.open(p, "wb") as f:
        f.write(buf.getvalue())
    return fs.unstrip_protocol(p)


def _fits_format(v: np.ndarray) -> str:
    kinds = {
        ("i", 2): "I",
        ("i", 4): "J",
        ("i", 8): "K",
        ("f", 4): "E",
        ("f", 8): "D",
        ("u", 1): "B",
        ("b", 1): "L",
    }
    if v.dtype.kind == "S":
        return f"{v.dtype.itemsize}A"
    try:
        return kinds[(v.dtype.kind, v.dtype.itemsize)]
    except KeyError:
        raise TypeError(f"cannot write a column of dtype {v.dtype} to FITS") from None


def write_des_fits(
    survey: Any,
    out_dir: str,
    *,
    compress: bool = True,
    lossless: bool = True,
    tilename_pattern: str = "{tile_id}",
    bands: Sequence[str] | None = None,
    catalog_format: str = "fits",
    storage_options: Mapping[str, Any] | None = None,
    out_storage_options: Mapping[str, Any] | None = None,
) -> DesFitsExport:
    """Export a lenscan survey store as DES DR2 style tile files and a DES-style catalogue.

    Parameters
    ----------
    survey : str or SurveyStore
        The store (URL or an open :class:`lenscan.survey.SurveyStore`).
    out_dir : str
        Output folder or fsspec URL.
    compress : bool
        ``.fits.fz`` (tile-compressed) if True, plain ``.fits`` otherwise.
    lossless : bool
        With ``compress``: lossless (default) or DES-like lossy quantised float compression.
    tilename_pattern : str
        Format string for the DES tile name; fields ``tile_id``, ``index`` and ``des`` (the
        ``DEShhmm±ddmm`` name of the tile centre). The default keeps the store's tile id.
    bands : sequence of str, optional
        Bands to export (default: all the store's bands).
    catalog_format : {"fits", "parquet"}
        Format of the single catalogue file ``des_catalog.{fits,parquet}`` (rows of all tiles,
        with ``TILENAME``).
    storage_options, out_storage_options : mapping, optional
        fsspec options for the store and for ``out_dir``.

    Returns
    -------
    DesFitsExport
    """
    from lenscan.survey import open_survey

    if catalog_format not in ("fits", "parquet"):
        raise ValueError(f"catalog_format must be 'fits' or 'parquet', got {catalog_format!r}")
    store = (
        open_survey(survey, storage_options=storage_options) if isinstance(survey, str) else survey
    )
    use = list(store.bands) if bands is None else [str(b) for b in bands]
    unknown = [b for b in use if b not in store.bands]
    if unknown:
        raise ValueError(f"bands {unknown} are not in survey {store.url} (bands {store.bands})")
    tilenames = _des_tilenames(store, tilename_pattern)
    files: dict[str, dict[str, str]] = {}
    cat_parts: list[dict[str, np.ndarray]] = []
    for tile_id, name in tilenames.items():
        tile = store.tile(tile_id)
        files[name] = _export_tile(tile, name, use, out_dir, compress, lossless,
                                   out_storage_options)  # fmt: skip
        cat_parts.append(catalog_to_des_columns(tile.catalog(), bands=use, tilename=name))
    fs, root = fsspec.core.url_to_fs(out_dir, **dict(out_storage_options or {}))
    cat_path = write_catalog_file(
        fs.unstrip_protocol(posixpath.join(root, f"des_catalog.{catalog_format}")),
        _merge_catalogs(cat_parts, tilenames, use),
        storage_options=out_storage_options,
    )
    return DesFitsExport(
        out_dir=fs.unstrip_protocol(root), tilenames=tilenames, files=files, catalog_path=cat_path
    )


def _des_tilenames(store: Any, pattern: str) -> dict[str, str]:
    """Store tile id -> DES tile name from ``pattern``; two tiles may not share a name."""
    names: dict[str, str] = {}
    for k, tile_id in enumerate(store.tile_ids):
        tile = store.tile(tile_id)
        ny, nx = tile.shape_yx
        ra, dec = tile.wcs.pixel_to_world_values((nx - 1) / 2.0, (ny - 1) / 2.0)
        name = pattern.format(tile_id=tile_id, index=k, des=des_tilename(float(ra), float(dec)))
        if name in names.values():
            raise ValueError(
                f"tilename_pattern {pattern!r} gives the same name {name!r} to two tiles"
            )
        names[tile_id] = name
    return names


def _export_tile(
    tile: Any,
    name: str,
    bands: list[str],
    out_dir: str,
    compress: bool,
    lossless: bool,
    storage_options: Mapping[str, Any] | None,
) -> dict[str, str]:
    """Write one store tile's ``bands`` as DES band files; band -> URL."""
    idx = [list(tile.bands).index(b) for b in bands]
    return write_des_tile(
        out_dir,
        name,
        bands=bands,
        image=np.asarray(tile.image[idx]),
        wcs_header=tile.wcs.to_header(),
        weight=None if tile.weight is None else np.asarray(tile.weight[idx]),
        mask=None if tile.mask is None else np.asarray(tile.mask[idx]),
        zero_point=tile.zero_point,
        compress=compress,
        lossless=lossless,
        storage_options=storage_options,
    )


def _merge_catalogs(
    parts: list[dict[str, np.ndarray]], tilenames: Mapping[str, str], bands: list[str]
) -> dict[str, np.ndarray]:
    """One DES-style catalogue from the tiles' parts (an empty one when there are none)."""
    if parts:
        merged = {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}
        width = max(len(n) for n in tilenames.values())
        merged["TILENAME"] = merged["TILENAME"].astype(f"U{width}")
        return merged
    return catalog_to_des_columns(
        {"id": np.zeros(0, np.int64), "ra": np.zeros(0), "dec": np.zeros(0)}
        | {f"{p}_{b}": np.zeros(0, np.float32) for b in bands for p in ("mag", "magerr")},
        bands=bands,
        tilename="",
    )
