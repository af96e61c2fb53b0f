"""Write synthetic Euclid MER tiles as the MER pipeline publishes them, with their catalogues.

Q1 (IRSA, the ESA archive, the public bucket) lays a tile out as ``q1/MER/<tile>/<VIS|NISP|
DECAM>/`` with one FITS file per band and plane, the data in HDU 0:
``EUC_MER_BGSUB-MOSAIC-<BAND>_TILE<tile>-<hash>_<timestamp>Z_00.00.fits`` (background-subtracted
image), ``EUC_MER_MOSAIC-<BAND>-RMS_TILE...`` and ``EUC_MER_MOSAIC-<BAND>-FLAG_TILE...``; every
band is on the tile's one 0.1"/px TAN grid, in µJy-scaled units (``MAGZERO = 23.9``). The final
catalogue ``q1/catalogs/MER_FINAL_CATALOG/<tile>/EUC_MER_FINAL-CAT_TILE<tile>-...fits`` (header
``TILEID``) lists the objects of the tile's inner footprint (tiles overlap by ``margin_pix`` on
each side; each object belongs to one tile) with MER's column names and µJy fluxes.

:func:`write_mer_survey` writes a row of overlapping tiles of stars and galaxies (VIS PSF FWHM
0.17", NISP 0.48", external bands 1.0"), each file with its own hash and timestamp, and returns
what it wrote; the bad-input tests remove or corrupt files of the result.
"""

from __future__ import annotations

import itertools
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
from astropy.io import fits
from astropy.wcs import WCS
from scipy.ndimage import gaussian_filter

from lenscan.simulate.fits_export import write_catalog_file
from lenscan.simulate.mer_detect import mer_detection_columns

__all__ = ["MER_BANDS", "MerExport", "mer_file_name", "write_mer_survey"]

#: Store band -> (file-name token, Q1 instrument folder, PSF FWHM arcsec, 1-sigma sky uJy/px).
MER_BANDS: dict[str, tuple[str, str, float, float]] = {
    "vis": ("VIS", "VIS", 0.17, 0.0011),
    "y": ("NIR-Y", "NISP", 0.48, 0.0030),
    "j": ("NIR-J", "NISP", 0.48, 0.0030),
    "h": ("NIR-H", "NISP", 0.48, 0.0030),
    "g": ("DES-G", "DECAM", 1.0, 0.0025),
    "r": ("DES-R", "DECAM", 1.0, 0.0030),
    "i": ("DES-I", "DECAM", 1.0, 0.0040),
    "z": ("DES-Z", "DECAM", 1.0, 0.0060),
}
#: Magnitude offsets from VIS (red galaxies, blue galaxies, stars).
_COLOURS = {"vis": 0.0, "y": -0.35, "j": -0.5, "h": -0.6, "g": 0.9, "r": 0.3, "i": -0.1, "z": -0.3}
_PIXEL_SCALE = 0.1
_GAIA_MAG_VIS = 20.5  # stars brighter than this have a GAIA_ID (Gaia reaches G ~ 20.7)
#: MER detection columns measured on the VIS image (lenscan.simulate.mer_detect).
_MER_COLUMNS = ("SEGMENTATION_AREA", "VIS_DET", "SPURIOUS_PROB", "POINT_LIKE_PROB",
                "EXTENDED_PROB", "MU_MAX", "MUMAX_MINUS_MAG")  # fmt: skip


def mer_file_name(kind: str, band: str, tile: str, tag: str) -> str:
    """A MER file name: ``kind`` image, rms, flag or catalog; ``tag`` ``<hash>_<timestamp>``.

    Examples
    --------
    >>> mer_file_name("rms", "y", "102018211", "F95D3B_20241025T024806.358178")
    'EUC_MER_MOSAIC-NIR-Y-RMS_TILE102018211-F95D3B_20241025T024806.358178Z_00.00.fits'
    """
    tail = f"_TILE{tile}-{tag}Z_00.00.fits"
    if kind == "catalog":
        return "EUC_MER_FINAL-CAT" + tail
    token = MER_BANDS[band][0]
    prefix = {"image": f"EUC_MER_BGSUB-MOSAIC-{token}", "rms": f"EUC_MER_MOSAIC-{token}-RMS"}
    prefix["flag"] = f"EUC_MER_MOSAIC-{token}-FLAG"
    return prefix[kind] + tail


@dataclass
class MerExport:
    """What :func:`write_mer_survey` wrote.

    Attributes
    ----------
    root : str
        The ``q1`` folder URL.
    files : dict
        Tile -> {``"<band>:<kind>"``: URL} (kind image, rms, flag).
    catalogs : dict
        Tile -> catalogue URL (its inner-footprint objects).
    merged_catalog : str or None
        One catalogue of every object of the survey, if written.
    truth : dict
        Tile -> object ids whose catalogue row belongs to it.
    """

    root: str
    files: dict[str, dict[str, str]] = field(default_factory=dict)
    catalogs: dict[str, str] = field(default_factory=dict)
    merged_catalog: str | None = None
    truth: dict[str, np.ndarray] = field(default_factory=dict)


def _tile_wcs(n_pix: int, ra: float, dec: float) -> WCS:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra, dec]
    w.wcs.crpix = [n_pix / 2 + 0.5, n_pix / 2 + 0.5]
    s = _PIXEL_SCALE / 3600
    w.wcs.cd = [[-s, 0.0], [0.0, s]]
    return w


def _objects(rng: np.random.Generator, n: int, ra0: float, dec0: float, span_deg: float) -> Any:
    """Stars and galaxies over the survey strip (sky positions, VIS magnitudes, sizes)."""
    ra = rng.uniform(ra0 - span_deg / 2, ra0 + span_deg / 2, n)
    dec = rng.uniform(dec0 - 0.012, dec0 + 0.012, n)
    galaxy = rng.random(n) < 0.75
    vis = rng.uniform(18.0, 24.0, n)
    red = rng.random(n) < 0.5
    scale = np.where(galaxy & ~red, 0.4, np.where(galaxy, 1.0, 0.7))
    sigma_arcsec = np.where(galaxy, rng.uniform(0.15, 0.6, n), 0.0)
    return {
        "ra": ra,
        "dec": dec,
        "galaxy": galaxy,
        "vis": vis,
        "scale": scale,
        "size": sigma_arcsec,
    }


def _render(objs: Mapping[str, np.ndarray], band: str, wcs: WCS, n_pix: int) -> np.ndarray:
    """Point sources and Gaussian galaxies convolved with the band's PSF, in µJy per pixel.

    Objects are binned by size and each bin is one Gaussian filter of the summed deltas, so a
    tile costs a few filters rather than one stamp per object.
    """
    x, y = wcs.world_to_pixel_values(objs["ra"], objs["dec"])
    flux = 10 ** (-0.4 * (objs["vis"] + _COLOURS[band] * objs["scale"] - 23.9))
    psf_sigma = MER_BANDS[band][2] / 2.3548 / _PIXEL_SCALE
    image = np.zeros((n_pix, n_pix), np.float64)
    ix, iy = np.round(x).astype(int), np.round(y).astype(int)
    inside = (ix >= 0) & (ix < n_pix) & (iy >= 0) & (iy < n_pix)
    edges = np.array([0.0, 0.1, 0.3, 0.45, 0.7])
    for lo, hi in itertools.pairwise(edges):
        pick = inside & (objs["size"] >= lo) & (objs["size"] < hi)
        if not pick.any():
            continue
        deltas = np.zeros_like(image)
        np.add.at(deltas, (iy[pick], ix[pick]), flux[pick])
        size_pix = 0.5 * (lo + hi) / _PIXEL_SCALE if hi > 0.1 else 0.0
        image += gaussian_filter(deltas, np.hypot(psf_sigma, size_pix), mode="constant")
    return image


def _write_image(path: str, data: np.ndarray, wcs: WCS, tile: str, band: str, opts: Any) -> str:
    header = wcs.to_header()
    for key in ("PC1_1", "PC1_2", "PC2_1", "PC2_2", "CDELT1", "CDELT2"):
        header.remove(key, ignore_missing=True)
    for i, j in ((1, 1), (1, 2), (2, 1), (2, 2)):
        header[f"CD{i}_{j}"] = float(wcs.wcs.cd[i - 1, j - 1])
    header["TILEID"] = int(tile)
    header["FILTER"] = MER_BANDS[band][0]
    header["MAGZERO"] = (23.9, "AB of 1 uJy")
    header["BUNIT"] = "uJy"
    fs, p = fsspec.core.url_to_fs(path, **dict(opts or {}))
    fs.makedirs(posixpath.dirname(p), exist_ok=True)
    with fs.open(p, "wb") as f:
        fits.PrimaryHDU(data, header=header).writeto(f)
    return str(fs.unstrip_protocol(p))


def _write_band(
    rng: np.random.Generator,
    root: str,
    tile: str,
    band: str,
    image: np.ndarray,
    wcs: WCS,
    opts: Any,
) -> tuple[dict[str, str], np.ndarray, np.ndarray]:
    """One band's image, RMS and FLAG files (a blank no-data corner, a few flagged pixels).

    Returns the URLs written, and the noisy image and RMS map (for the detection columns).
    """
    n = image.shape[0]
    sky = MER_BANDS[band][3]
    rms = np.full(image.shape, sky, np.float32) * rng.uniform(0.9, 1.1, image.shape).astype(
        np.float32
    )
    sci = (image + rng.normal(0, 1, image.shape) * rms).astype(np.float32)
    flag = np.zeros(image.shape, np.int32)
    flag[: n // 20, : n // 20] = 1  # no coverage: RMS 0, image 0
    rms[: n // 20, : n // 20] = 0.0
    sci[: n // 20, : n // 20] = 0.0
    ys, xs = rng.integers(0, n, 20), rng.integers(0, n, 20)
    flag[ys, xs] |= 4
    folder = posixpath.join(root, "MER", tile, MER_BANDS[band][1])
    out = {}
    for kind, data in (("image", sci), ("rms", rms), ("flag", flag)):
        tag = f"{rng.integers(16**6):06X}_2024{rng.integers(1, 13):02d}15T0{rng.integers(10)}1200.0"
        name = mer_file_name(kind, band, tile, tag)
        out[f"{band}:{kind}"] = _write_image(
            posixpath.join(folder, name), data, wcs, tile, band, opts
        )
    return out, sci, rms


def _catalog_columns(
    objs: Mapping[str, np.ndarray],
    rows: np.ndarray,
    ids: np.ndarray,
    bands: Sequence[str],
    mer: Mapping[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """MER final-catalogue columns (real names, µJy) of the objects ``rows``.

    ``mer`` holds every object's detection columns, measured on the VIS image of the tile
    that owns it (:func:`_measure_vis`).
    """
    vis = objs["vis"][rows]
    galaxy = objs["galaxy"][rows]
    cols: dict[str, np.ndarray] = {
        "OBJECT_ID": ids[rows],
        "RIGHT_ASCENSION": objs["ra"][rows],
        "DECLINATION": objs["dec"][rows],
    }
    for band in bands:
        mag = vis + _COLOURS[band] * objs["scale"][rows]
        flux = 10 ** (-0.4 * (mag - 23.9))
        if band == "vis":
            cols["FLUX_VIS_PSF"], cols["FLUXERR_VIS_PSF"] = flux, flux * 0.02 + 0.001
        else:
            name = band.upper() if band in "yjh" else f"{band.upper()}_EXT_DECAM"
            cols[f"FLUX_{name}_TEMPLFIT"] = flux
            cols[f"FLUXERR_{name}_TEMPLFIT"] = flux * 0.05 + 0.002
    cols["FLUX_DETECTION_TOTAL"] = 10 ** (-0.4 * (vis - 0.2 - 23.9))
    cols.update({c: mer[c][rows] for c in _MER_COLUMNS})
    gaia = ~galaxy & (vis < _GAIA_MAG_VIS)
    cols["GAIA_ID"] = np.where(gaia, 4_000_000_000_000 + rows, -1).astype(np.int64)
    return cols


def _empty_mer(n: int) -> dict[str, np.ndarray]:
    """Detection columns of objects no tile has measured: not detected."""
    out = {c: np.full(n, np.nan, np.float32) for c in _MER_COLUMNS}
    out["SEGMENTATION_AREA"] = np.zeros(n, np.int32)
    out["VIS_DET"] = np.zeros(n, np.int16)
    out["SPURIOUS_PROB"] = np.zeros(n, np.float32)
    return out


def _measure_vis(
    mer: dict[str, np.ndarray],
    objs: Mapping[str, np.ndarray],
    rows: np.ndarray,
    sci: np.ndarray,
    rms: np.ndarray,
    wcs: WCS,
) -> None:
    """Fill ``mer`` for the objects ``rows`` from their tile's noisy VIS image (in place).

    Every object on the image takes part (a neighbour in the overlap keeps its share of a
    shared segment); only ``rows`` are recorded.
    """
    x, y = wcs.world_to_pixel_values(objs["ra"], objs["dec"])
    got = mer_detection_columns(
        sci, rms, x, y, objs["vis"], psf_fwhm_pix=MER_BANDS["vis"][2] / _PIXEL_SCALE,
        pixel_scale_arcsec=_PIXEL_SCALE, zero_point=23.9,
    )  # fmt: skip
    for c in _MER_COLUMNS:
        mer[c][rows] = got[c.lower()][rows]


def write_mer_survey(  # long-function: numpydoc of 11 parameters
    root: str,
    *,
    tiles: Sequence[str] = ("102018211", "102018212"),
    n_pix: int = 1200,
    margin_pix: int | None = None,
    bands: Sequence[str] = ("vis", "y", "j", "h"),
    n_objects: int = 300,
    ra: float = 52.0,
    dec: float = -28.0,
    seed: int = 0,
    catalog_format: str = "fits",
    merged_catalog: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> MerExport:
    """Write a row of overlapping MER tiles (east to west) and their final catalogues.

    Parameters
    ----------
    root : str
        The ``q1`` folder (local path or fsspec URL).
    tiles : sequence of str
        Tile ids (integers as strings), placed side by side in RA.
    n_pix : int
        Tile side in pixels (0.1"/px; Q1: 19,200).
    margin_pix : int, optional
        Overlap margin on each side; the inner footprints abut. Default: ``n_pix / 32``, as Q1
        (600 px, 1', of 19,200).
    bands : sequence of str
        Store bands of :data:`MER_BANDS` to write.
    n_objects : int
        Objects over the whole strip.
    ra, dec : float
        Sky position of the strip's centre (degrees).
    seed : int
        Random seed.
    catalog_format : {"fits", "parquet", "parquet-lower"}
        Catalogue files; ``parquet-lower`` uses TAP's lower-case column names.
    merged_catalog : bool
        Also write ``catalogs/merged.<ext>`` with every object once.
    storage_options : mapping, optional
        fsspec options for ``root``.

    Returns
    -------
    MerExport
    """
    rng = np.random.default_rng(seed)
    margin_pix = round(n_pix / 32) if margin_pix is None else margin_pix
    inner = n_pix - 2 * margin_pix
    cos = np.cos(np.deg2rad(dec))
    step_deg = inner * _PIXEL_SCALE / 3600 / cos
    centres = ra + (np.arange(len(tiles)) - (len(tiles) - 1) / 2) * step_deg
    objs = _objects(rng, n_objects, ra, dec, step_deg * len(tiles))
    objs["dec"] = rng.uniform(dec - inner * 0.45 / 36000, dec + inner * 0.45 / 36000, n_objects)
    ids = (2_520_000_000_000 + rng.permutation(n_objects * 10)[:n_objects]).astype(np.int64)
    out = MerExport(root=root)
    mer = _empty_mer(n_objects)
    ext = "parquet" if catalog_format.startswith("parquet") else "fits"
    for tile, ra_t in zip(tiles, centres, strict=True):
        wcs = _tile_wcs(n_pix, float(ra_t), dec)
        out.files[tile] = {}
        x, y = wcs.world_to_pixel_values(objs["ra"], objs["dec"])
        lo, hi = margin_pix - 0.5, n_pix - margin_pix - 0.5
        rows = np.flatnonzero((x >= lo) & (x < hi) & (y >= lo) & (y < hi))
        for band in bands:
            image = _render(objs, band, wcs, n_pix)
            files, sci, rms = _write_band(rng, root, tile, band, image, wcs, storage_options)
            out.files[tile].update(files)
            if band == "vis":
                _measure_vis(mer, objs, rows, sci, rms, wcs)
        out.truth[tile] = ids[rows]
        cols = _catalog_columns(objs, rows, ids, bands, mer)
        out.catalogs[tile] = _write_catalog(root, tile, cols, ext, catalog_format, storage_options)
    if merged_catalog:
        cols = _catalog_columns(objs, np.arange(n_objects), ids, bands, mer)
        path = posixpath.join(root, "catalogs", f"merged.{ext}")
        out.merged_catalog = write_catalog_file(
            path, _names(cols, catalog_format), storage_options=storage_options
        )
    return out


def _names(cols: dict[str, np.ndarray], catalog_format: str) -> dict[str, np.ndarray]:
    return {k.lower(): v for k, v in cols.items()} if catalog_format == "parquet-lower" else cols


def _write_catalog(
    root: str, tile: str, cols: dict[str, np.ndarray], ext: str, catalog_format: str, opts: Any
) -> str:
    name = mer_file_name("catalog", "vis", tile, "CC66F6_20241018T214045.289017")
    path = posixpath.join(
        root, "catalogs", "MER_FINAL_CATALOG", tile, name[: -len(".fits")] + f".{ext}"
    )
    url = write_catalog_file(path, _names(cols, catalog_format), storage_options=opts)
    if ext == "fits":  # MER writes the tile into the table header
        fs, p = fsspec.core.url_to_fs(url, **dict(opts or {}))
        with fs.open(p, "rb") as f:
            hdul = fits.HDUList([h.copy() for h in fits.open(f)])
        hdul[1].header["TILEID"] = int(tile)
        with fs.open(p, "wb") as f:
            hdul.writeto(f)
    return url
