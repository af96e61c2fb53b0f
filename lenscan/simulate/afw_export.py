"""Write synthetic coadd patches as the LSST Science Pipelines (afw) write them, with catalogues.

Rubin DP1 ``deep_coadd``, DP0.2 ``deepCoadd_calexp`` and HSC-SSP ``calexp`` files are afw
``ExposureF`` FITS files: HDU 0 carries only metadata (``AR_HDU``, ``PSF_ID``, ``WCS_ID``, ...,
and for HSC ``FLUXMAG0``); then ``EXTNAME=IMAGE`` (float32, ``EXTTYPE=IMAGE``), ``MASK`` (int32,
bit planes named by ``MP_<PLANE>=<bit>`` keywords) and ``VARIANCE``, each with the TAN WCS in
the file's pixels plus a ``LINEAR`` "A" WCS whose ``CRVAL1A/CRVAL2A`` is the patch origin (XY0)
in tract pixels; then binary-table archives (here one small archive index). Rubin pixels are in
nJy (``BUNIT``), HSC pixels on the AB zero point 27 (``FLUXMAG0`` = 10**10.8).

:func:`write_afw_survey` renders one tract of overlapping patches (inner regions tile the tract,
each patch extends ``border_pix`` beyond its inner region) with stars and galaxies of survey-like
colours, writes one file per patch and band with **non-default, per-file** mask bit numbers,
and the catalogue with the release's real column names (Parquet or FITS): Rubin ``Object``
(``objectId``, ``coord_ra``, ``<b>_cModelFlux`` in nJy, ``refExtendedness``, DP0.2
``detect_isPrimary``) or HSC PDR3 ``forced`` (``object_id``, ``{b}_cmodel_mag``,
``isprimary``). Objects in patch overlaps are listed once per patch that holds them, primary
only in the patch whose inner region holds them (DP1's table holds primaries only).
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from lenscan.simulate.fits_export import write_catalog_file

__all__ = [
    "AFW_RELEASES",
    "AfwExport",
    "AfwRelease",
    "afw_file_name",
    "write_afw_exposure",
    "write_afw_survey",
]

#: afw's default mask planes (lsst/afw Mask.cc); the writer permutes their bits per file.
AFW_MASK_PLANES = (
    "BAD", "SAT", "INTRP", "CR", "EDGE", "DETECTED", "DETECTED_NEGATIVE", "SUSPECT", "NO_DATA",
    "CLIPPED", "CROSSTALK", "INEXACT_PSF", "REJECTED", "SENSOR_EDGE", "STREAK", "BRIGHT_OBJECT",
)  # fmt: skip


@dataclass(frozen=True)
class AfwRelease:
    """How one data release names and scales its files and catalogue columns."""

    name: str
    survey: str
    bands: tuple[str, ...]
    pixel_scale_arcsec: float
    zero_point: float  # AB of one pixel unit: 31.4 (nJy) or 27 (HSC)
    unit: str | None  # BUNIT, or None (HSC: FLUXMAG0 instead)
    patches_per_tract_side: int  # Rubin integer patch id = y * side + x
    primaries_only: bool  # DP1's Object table


#: The releases of the shipped ingest presets.
AFW_RELEASES = {
    r.name: r
    for r in (
        AfwRelease("lsst-dp1", "lsst", tuple("ugrizy"), 0.2, 31.4, "nJy", 10, True),
        AfwRelease("lsst-dp02", "lsst", tuple("ugrizy"), 0.2, 31.4, "nJy", 7, False),
        AfwRelease("hsc-pdr3", "hsc", tuple("grizy"), 0.168, 27.0, None, 9, False),
    )
}

_DP1_RUN = "lsst_cells_v1_LSSTComCam_runs_DRP_DP1_v29_0_0_DM-50260_20250622T005818Z"
_DP02_RUN = "DC2_2_2i_runs_DP0_2_v23_0_1_PREOPS-905_step3_1_20220314T170409Z"


def afw_file_name(release: str, tract: int, patch: tuple[int, int], band: str) -> str:
    """Path (under the release's root) of one patch file, as the release lays them out.

    Examples
    --------
    >>> afw_file_name("hsc-pdr3", 9813, (4, 4), "i")
    'deepCoadd-results/HSC-I/9813/4,4/calexp-HSC-I-9813-4,4.fits'
    >>> afw_file_name("lsst-dp1", 5063, (4, 1), "r").split("/")[-1][:24]
    'deep_coadd_5063_14_r_lss'
    """
    rel = AFW_RELEASES[release]
    x, y = patch
    if rel.survey == "hsc":
        b = band.upper()
        return f"deepCoadd-results/HSC-{b}/{tract}/{x},{y}/calexp-HSC-{b}-{tract}-{x},{y}.fits"
    pid = y * rel.patches_per_tract_side + x
    kind, run = (
        ("deep_coadd", _DP1_RUN) if release == "lsst-dp1" else ("deepCoadd_calexp", _DP02_RUN)
    )
    return f"{kind}/{tract}/{pid}/{band}/{kind}_{tract}_{pid}_{band}_{run}.fits"


def _wcs_cards(wcs: WCS, xy0: tuple[int, int]) -> fits.Header:
    """TAN WCS in the file's pixels plus afw's LINEAR "A" WCS (tract pixels) and LTV."""
    header = wcs.to_header()
    header["CTYPE1A"], header["CTYPE2A"] = "LINEAR", "LINEAR"
    header["CRPIX1A"], header["CRPIX2A"] = 1.0, 1.0
    header["CRVAL1A"], header["CRVAL2A"] = float(xy0[0]), float(xy0[1])
    header["CUNIT1A"], header["CUNIT2A"] = "PIXEL", "PIXEL"
    header["LTV1"], header["LTV2"] = -float(xy0[0]), -float(xy0[1])
    header["INHERIT"] = True
    return header


def write_afw_exposure(
    path: str,
    *,
    image: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray,
    wcs: WCS,
    xy0: tuple[int, int],
    mask_planes: Mapping[str, int],
    unit: str | None = "nJy",
    fluxmag0: float | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> str:
    """Write one afw ``ExposureF`` file (HDU 0 metadata; IMAGE, MASK, VARIANCE; an archive).

    Parameters
    ----------
    path : str
        Destination URL or path.
    image, variance : ndarray
        ``(ny, nx)`` planes (float32 on disk).
    mask : ndarray
        ``(ny, nx)`` integer bit mask (int32 on disk), bits as ``mask_planes`` numbers them.
    wcs : astropy.wcs.WCS
        TAN WCS in this file's 0-based pixels.
    xy0 : tuple of int
        The patch origin in tract pixels (the "A" WCS).
    mask_planes : mapping
        Plane name -> bit number, written as ``MP_<PLANE>`` keywords.
    unit : str or None
        ``BUNIT`` of the image (``"nJy"`` for Rubin), None to leave it out (HSC).
    fluxmag0 : float, optional
        ``FLUXMAG0`` for HU 0 (HSC: 10**(0.4 * 27)).
    storage_options : mapping, optional
        fsspec options.

    Returns
    -------
    str
        The URL written.
    """
    primary = fits.PrimaryHDU()
    for key, value in (("AR_HDU", 5), ("PSF_ID", 1), ("WCS_ID", 2), ("PHOTOCALIB_ID", 3)):
        primary.header[_card_key(key)] = value
    if fluxmag0 is not None:
        primary.header["FLUXMAG0"] = float(fluxmag0)
    cards = _wcs_cards(wcs, xy0)
    hdus: list[Any] = [primary]
    for name, data, dtype in (
        ("IMAGE", image, np.float32),
        ("MASK", mask, np.int32),
        ("VARIANCE", variance, np.float32),
    ):
        hdu = fits.ImageHDU(np.asarray(data, dtype=dtype), header=cards.copy(), name=name)
        hdu.header["EXTTYPE"] = name
        if name == "IMAGE" and unit:
            hdu.header["BUNIT"] = unit
        if name == "MASK":
            for plane, bit in mask_planes.items():
                hdu.header[_card_key(f"MP_{plane}")] = int(bit)
        hdus.append(hdu)
    archive = fits.BinTableHDU.from_columns(
        [fits.Column(name="id", format="J", array=np.array([1, 2, 3], np.int32))],
        name="ArchiveIndex",
    )
    archive.header["EXTTYPE"] = "ARCHIVE_INDEX"
    hdus.append(archive)
    fs, p = fsspec.core.url_to_fs(path, **dict(storage_options or {}))
    parent = posixpath.dirname(p)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(p, "wb") as f:
        fits.HDUList(hdus).writeto(f)
    return fs.unstrip_protocol(p)


def _card_key(key: str) -> str:
    """Keywords longer than 8 characters are HIERARCH cards, as afw writes them."""
    return key if len(key) <= 8 else f"HIERARCH {key}"


@dataclass
class AfwExport:
    """What :func:`write_afw_survey` wrote.

    Attributes
    ----------
    out_dir : str
        Root folder of the files.
    release : str
        ``lsst-dp1``, ``lsst-dp02`` or ``hsc-pdr3``.
    tract : int
    patches : dict
        Store tile id (``9813-4.4``, ``5063-14``) -> (x, y) patch index.
    files : dict
        Store tile id -> {band: file URL}.
    catalog_path : str
        The catalogue file.
    objects : dict
        Truth, one row per object: ``id``, ``ra``, ``dec``, ``tile`` (the tile whose inner
        region holds it), ``mag_<band>``, ``is_galaxy``.
    mask_planes : dict
        File URL -> its plane -> bit mapping.
    """

    out_dir: str
    release: str
    tract: int
    patches: dict[str, tuple[int, int]] = field(default_factory=dict)
    files: dict[str, dict[str, str]] = field(default_factory=dict)
    catalog_path: str = ""
    objects: dict[str, np.ndarray] = field(default_factory=dict)
    mask_planes: dict[str, dict[str, int]] = field(default_factory=dict)


def _tract_wcs(rel: AfwRelease, n_side_pix: int, ra: float, dec: float) -> WCS:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra, dec]
    w.wcs.crpix = [n_side_pix / 2 + 0.5, n_side_pix / 2 + 0.5]
    scale = rel.pixel_scale_arcsec / 3600
    w.wcs.cd = [[-scale, 0.0], [0.0, scale]]
    return w


def _objects(
    rng: np.random.Generator, rel: AfwRelease, n: int, n_side_pix: int, inner: int
) -> dict[str, np.ndarray]:
    """Stars and galaxies over the tract's patches (tract pixels), with survey-like colours."""
    x = rng.uniform(2, n_side_pix - 2, n)
    y = rng.uniform(2, n_side_pix - 2, n)
    galaxy = rng.random(n) < 0.7
    r_mag = rng.uniform(18.0, 23.5, n)
    # Red early types and blue field galaxies, stars in between (colours relative to r).
    red = rng.random(n) < 0.5
    offsets = {"u": 2.4, "g": 1.2, "r": 0.0, "i": -0.45, "z": -0.7, "y": -0.85}
    blue_scale = np.where(galaxy & ~red, 0.4, np.where(galaxy, 1.0, 0.6))
    out: dict[str, np.ndarray] = {"x": x, "y": y, "is_galaxy": galaxy}
    for b in rel.bands:
        out[f"mag_{b}"] = r_mag + offsets[b] * blue_scale + rng.normal(0, 0.05, n)
    out["sigma_pix"] = np.where(galaxy, rng.uniform(1.5, 3.0, n), 1.2)
    out["patch_x"] = np.minimum(x // inner, n_side_pix // inner - 1).astype(int)
    out["patch_y"] = np.minimum(y // inner, n_side_pix // inner - 1).astype(int)
    return out


def _render(
    objs: Mapping[str, np.ndarray], band: str, rel: AfwRelease, x0: int, y0: int, shape: Any
) -> np.ndarray:
    """Gaussian profiles of the objects on a patch's pixels (pixel units of the release)."""
    ny, nx = shape
    img = np.zeros((ny, nx), np.float64)
    flux = 10 ** (-0.4 * (objs[f"mag_{band}"] - rel.zero_point))
    for xc, yc, s, f in zip(objs["x"] - x0, objs["y"] - y0, objs["sigma_pix"], flux, strict=True):
        r = int(np.ceil(5 * s))
        xa, xb = max(0, int(xc) - r), min(nx, int(xc) + r + 1)
        ya, yb = max(0, int(yc) - r), min(ny, int(yc) + r + 1)
        if xa >= xb or ya >= yb:
            continue
        yy, xx = np.mgrid[ya:yb, xa:xb]
        g = np.exp(-((xx - xc) ** 2 + (yy - yc) ** 2) / (2 * s * s)) / (2 * np.pi * s * s)
        img[ya:yb, xa:xb] += f * g
    return img


def _mask_bits(rng: np.random.Generator) -> dict[str, int]:
    """afw's planes on a random permutation of bits: never the default numbering."""
    bits = rng.permutation(len(AFW_MASK_PLANES))
    if np.all(bits == np.arange(len(bits))):
        bits = np.roll(bits, 1)
    return {p: int(b) for p, b in zip(AFW_MASK_PLANES, bits, strict=True)}


def _patch_mask(
    rng: np.random.Generator, planes: Mapping[str, int], image: np.ndarray, sky_sigma: float
) -> np.ndarray:
    """DETECTED on sources (never blanks), a few CR / SAT pixels, a NO_DATA corner."""
    ny, nx = image.shape
    mask = np.zeros((ny, nx), np.int32)
    mask[image > 3 * sky_sigma] |= 1 << planes["DETECTED"]
    for plane in ("CR", "SAT", "SUSPECT"):
        ys, xs = rng.integers(0, ny, 3), rng.integers(0, nx, 3)
        mask[ys, xs] |= 1 << planes[plane]
    mask[:3, :3] |= 1 << planes["NO_DATA"]
    return mask


def write_afw_survey(  # long-function: numpydoc of 12 parameters; the body is 30 lines
    out_dir: str,
    *,
    release: str = "lsst-dp1",
    tract: int | None = None,
    n_patches: tuple[int, int] = (2, 2),
    inner_pix: int = 160,
    border_pix: int = 16,
    objects_per_patch: int = 40,
    bands: Sequence[str] | None = None,
    catalog_format: str = "parquet",
    seed: int = 0,
    ra_deg: float = 150.0,
    dec_deg: float = 2.0,
) -> AfwExport:
    """Write one tract of overlapping afw patches and its catalogue, as the release does.

    Parameters
    ----------
    out_dir : str
        Root folder (fsspec URL or path); files go where the release puts them
        (:func:`afw_file_name`), the catalogue to ``catalog.<ext>``.
    release : {"lsst-dp1", "lsst-dp02", "hsc-pdr3"}
    tract : int, optional
        Tract number (default: 5063 for Rubin, 9813 for HSC).
    n_patches : tuple of int
        Patches (x, y) written, from patch (0, 0).
    inner_pix, border_pix : int
        Inner patch size and the overlap each side (Rubin 3000 / 200, HSC 4000 / 100;
        small here so tests are quick).
    objects_per_patch : int
        Mean objects per patch.
    bands : sequence of str, optional
        Bands to write (default: all the release's).
    catalog_format : {"parquet", "fits"}
    seed : int
    ra_deg, dec_deg : float
        Tract centre.

    Returns
    -------
    AfwExport
    """
    rel = AFW_RELEASES[release]
    tract = tract if tract is not None else (9813 if rel.survey == "hsc" else 5063)
    use = tuple(bands or rel.bands)
    rng = np.random.default_rng(seed)
    side = max(n_patches) * inner_pix
    wcs = _tract_wcs(rel, side, ra_deg, dec_deg)
    n_obj = objects_per_patch * n_patches[0] * n_patches[1]
    objs = _objects(rng, rel, n_obj, side, inner_pix)
    keep = (objs["patch_x"] < n_patches[0]) & (objs["patch_y"] < n_patches[1])
    objs = {k: v[keep] for k, v in objs.items()}
    export = AfwExport(out_dir=out_dir, release=release, tract=tract)
    rows = []
    for px in range(n_patches[0]):
        for py in range(n_patches[1]):
            rows.append(
                _write_patch(export, rel, use, wcs, objs, rng, (px, py), inner_pix, border_pix)
            )
    export.objects = _truth(objs, wcs, rel, use, tract)
    cat = _catalog(rel, use, rng, export.objects, rows, tract)
    ext = "parquet" if catalog_format == "parquet" else "fits"
    export.catalog_path = write_catalog_file(posixpath.join(out_dir, f"catalog.{ext}"), cat)
    return export


def _tile_id(rel: AfwRelease, tract: int, px: int, py: int) -> str:
    if rel.survey == "hsc":
        return f"{tract}-{px}.{py}"
    return f"{tract}-{py * rel.patches_per_tract_side + px}"


def _write_patch(
    export: AfwExport,
    rel: AfwRelease,
    bands: Sequence[str],
    wcs: WCS,
    objs: Mapping[str, np.ndarray],
    rng: np.random.Generator,
    patch: tuple[int, int],
    inner: int,
    border: int,
) -> dict[str, np.ndarray]:
    """Write one patch's band files; return its detections (tract-pixel rows, primary flag)."""
    px, py = patch
    x0, y0 = max(0, px * inner - border), max(0, py * inner - border)
    x1, y1 = (px + 1) * inner + border, (py + 1) * inner + border
    shape = (y1 - y0, x1 - x0)
    local = wcs.deepcopy()
    local.wcs.crpix = [wcs.wcs.crpix[0] - x0, wcs.wcs.crpix[1] - y0]
    tile = _tile_id(rel, export.tract, px, py)
    export.patches[tile] = patch
    export.files[tile] = {}
    sky_sigma = 10 ** (-0.4 * (26.5 - rel.zero_point))  # about a 26.5 mag per pixel sky noise
    for band in bands:
        clean = _render(objs, band, rel, x0, y0, shape)
        image = clean + rng.normal(0, sky_sigma, shape)
        planes = _mask_bits(rng)
        url = write_afw_exposure(
            posixpath.join(
                export.out_dir, afw_file_name(export.release, export.tract, patch, band)
            ),
            image=image,
            # Sky plus source variance, jittered as the coadd's input coverage varies (noisy
            # floats: the hardest case for the store's compression of the weight).
            variance=(sky_sigma**2 + np.abs(clean) * sky_sigma / 10) * rng.uniform(0.9, 1.1, shape),
            mask=_patch_mask(rng, planes, clean, sky_sigma),
            wcs=local,
            xy0=(x0, y0),
            mask_planes=planes,
            unit=rel.unit,
            fluxmag0=None if rel.unit else 10 ** (0.4 * rel.zero_point),
        )
        export.files[tile][band] = url
        export.mask_planes[url] = planes
    inside = (objs["x"] >= x0) & (objs["x"] < x1) & (objs["y"] >= y0) & (objs["y"] < y1)
    primary = inside & (objs["patch_x"] == px) & (objs["patch_y"] == py)
    sel = np.flatnonzero(inside)
    return {
        "id": sel,
        "primary": primary[sel],
        "px": np.full(sel.size, px),
        "py": np.full(sel.size, py),
    }


def _truth(
    objs: Mapping[str, np.ndarray], wcs: WCS, rel: AfwRelease, bands: Sequence[str], tract: int
) -> dict[str, np.ndarray]:
    ra, dec = wcs.wcs_pix2world(objs["x"], objs["y"], 0)
    tiles = [
        _tile_id(rel, tract, int(x), int(y))
        for x, y in zip(objs["patch_x"], objs["patch_y"], strict=True)
    ]
    out = {
        "id": _object_ids(np.arange(len(ra)), rel),
        "ra": ra,
        "dec": dec,
        "tile": np.array(tiles, dtype=str),
    }
    out.update({f"mag_{b}": objs[f"mag_{b}"] for b in bands})
    out["is_galaxy"] = objs["is_galaxy"]
    out["x_tract"], out["y_tract"] = objs["x"], objs["y"]
    return out


def _object_ids(index: np.ndarray, rel: AfwRelease) -> np.ndarray:
    base = 609780000000000000 if rel.survey == "lsst" else 42287020000000000
    return (base + np.asarray(index)).astype(np.int64)


def _catalog(
    rel: AfwRelease,
    bands: Sequence[str],
    rng: np.random.Generator,
    truth: Mapping[str, np.ndarray],
    rows: list[dict[str, np.ndarray]],
    tract: int,
) -> dict[str, np.ndarray]:
    """The release's catalogue columns: one row per detection (per patch holding the object)."""
    det = {k: np.concatenate([r[k] for r in rows]) for k in ("id", "primary", "px", "py")}
    if rel.primaries_only:
        det = {k: v[det["primary"]] for k, v in det.items()}
    i = det["id"]
    # A duplicate detection in a neighbour's overlap is another catalogue row with its own id.
    ids = np.where(det["primary"], truth["id"][i], truth["id"][i] + 10**12)
    ext = truth["is_galaxy"][i].astype(np.float64)
    sky_sigma = 10 ** (-0.4 * (26.5 - rel.zero_point))
    if rel.survey == "hsc":
        cat: dict[str, np.ndarray] = {
            "object_id": ids, "ra": truth["ra"][i], "dec": truth["dec"][i],
            "tract": np.full(i.size, tract, np.int32),
            "patch": (100 * det["px"] + det["py"]).astype(np.int32),
        }  # fmt: skip
    else:
        cat = {
            "objectId": ids, "coord_ra": truth["ra"][i], "coord_dec": truth["dec"][i],
            "tract": np.full(i.size, tract, np.int64),
            "patch": (det["py"] * rel.patches_per_tract_side + det["px"]).astype(np.int64),
        }  # fmt: skip
    for b in bands:
        true_flux = 10 ** (-0.4 * (truth[f"mag_{b}"][i] - rel.zero_point))
        err = np.full(i.size, 5.0 * sky_sigma)
        flux = true_flux + rng.normal(0, 1, i.size) * err
        cat.update(_band_columns(rel, b, flux, err, ext))
    if rel.survey == "hsc":
        cat["isprimary"] = det["primary"].astype(bool)
    else:
        cat["refExtendedness"] = ext
        if not rel.primaries_only:
            cat["detect_isPrimary"] = det["primary"].astype(bool)
    return cat


def _band_columns(
    rel: AfwRelease, band: str, flux: np.ndarray, err: np.ndarray, ext: np.ndarray
) -> dict[str, np.ndarray]:
    if rel.survey != "hsc":
        return {
            f"{band}_cModelFlux": flux, f"{band}_cModelFluxErr": err,
            f"{band}_psfFlux": flux * np.where(ext > 0.5, 0.7, 1.0),
            f"{band}_extendedness": ext,
            f"{band}_pixelFlags_saturated": np.zeros(flux.size, bool),
        }  # fmt: skip
    good = flux > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        mag = np.where(good, rel.zero_point - 2.5 * np.log10(np.where(good, flux, 1.0)), np.nan)
        magerr = np.where(good, 2.5 / np.log(10) * err / np.abs(flux), np.nan)
    return {
        f"{band}_cmodel_mag": mag.astype(np.float32),
        f"{band}_cmodel_magerr": magerr.astype(np.float32),
        f"{band}_extendedness_value": ext.astype(np.float32),
        f"{band}_cmodel_flag": ~good,
    }
