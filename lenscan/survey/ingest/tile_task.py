"""The ingest task of one tile: FITS band files -> one tile of the store, streamed in row blocks.

The task opens every band file of the tile (plain ``.fits`` or fpack ``.fits.fz`` through
:class:`astropy.io.fits.CompImageHDU`), checks shapes, WCS, pixel scale and zero point before it
writes anything, places the catalogue rows on the tile, then copies the science / weight / mask
planes band by band in blocks of shard rows (``hdu.section``: only those rows are decompressed)
into :meth:`lenscan.survey.SurveyStore.begin_tile`'s writer. A tile's planes are never held
whole: peak memory is one block of rows. The ``complete`` flag is written last.

fpack-quantised sources (a ``ZSCALE`` column: the float pixels were stored as integer steps)
are stored quantised too, with a power-of-two step no larger than the finest source step, so
no pixel moves by more than half a step of the FITS file's own quantisation.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, replace
from typing import Any

import fsspec
import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning

from lenscan.survey.ingest.catalog import (
    TileInputError,
    catalog_for_tile,
    needed_catalog_columns,
    place_sources,
    read_catalog_file,
)
from lenscan.survey.ingest.presets import IngestPreset
from lenscan.survey.store import NotQuantisableError, open_survey, quantise_step_for

__all__ = ["TileJob", "TileResult", "ingest_tile", "source_quantise_step"]


@dataclass(frozen=True)
class TileJob:
    """Everything one task needs (small and picklable)."""

    tile: str
    files: dict[str, str]  # band -> URL
    bands: tuple[str, ...]
    preset: IngestPreset
    expected_shape_yx: tuple[int, int] | None
    out: str
    storage_options: dict[str, Any] | None
    source_storage_options: dict[str, Any] | None
    catalog_file: str  # single file, or a template with {tilename} (one file per tile)
    catalog_rows: dict[str, np.ndarray] | None  # the tile's rows, read by the client
    chunk_pix: int
    shard_pix: int | None
    quantise: str | None = "source"


@dataclass(frozen=True)
class TileResult:
    """Outcome of one tile's task."""

    tile: str
    ok: bool
    message: str = ""
    n_sources: int = 0
    dropped: int = 0  # rows outside the tile
    bytes_read: int = 0
    no_coords: int = 0  # rows without finite RA/Dec


@dataclass
class _Band:
    """One band file of a tile, open, with its checked HDUs."""

    path: str
    hdul: Any
    science: Any
    weight: Any | None
    mask: Any | None
    nbytes: int


def ingest_tile(job: TileJob) -> TileResult:
    """Ingest one tile; every input problem becomes a failed result naming the file.

    A quantised source whose pixels a quantised store cannot hold (NaN, or a pixel beyond
    2**31 steps) is ingested again losslessly.
    """
    try:
        try:
            return _ingest_tile_unsafe(job)
        except NotQuantisableError:
            return _ingest_tile_unsafe(replace(job, quantise=None))
    except TileInputError as err:
        return TileResult(job.tile, False, str(err))
    except Exception as err:  # anything else still only fails this tile
        return TileResult(job.tile, False, f"{type(err).__name__}: {err}")


def _ingest_tile_unsafe(job: TileJob) -> TileResult:
    _check_band_files(job)
    with contextlib.ExitStack() as stack:
        bands = [_open_band(job, band, stack) for band in job.bands]
        wcs, header, shape = _check_bands(job, bands)
        catalog, (dropped, no_coords), cat_source = _tile_catalog(job, wcs, shape)
        step = source_quantise_step([b.science for b in bands]) if job.quantise else None
        store = open_survey(job.out, job.storage_options, mode="a")
        writer = store.begin_tile(
            job.tile,
            shape_yx=shape,
            wcs_header=header,
            catalog=catalog,
            pixel_scale_arcsec=_pixel_scale(wcs, job.preset),
            zero_point=job.preset.zero_point,
            weight=job.preset.hdu_weight is not None,
            mask_dtype=None if job.preset.hdu_mask is None else np.int32,
            chunk_pix=job.chunk_pix,
            shard_pix=job.shard_pix,
            quantise_step=step,
            extra_attrs={"ingest": _provenance(job, cat_source)},
        )
        for b, band in enumerate(bands):
            _stream_band(band, b, writer, shape, rows=job.shard_pix or 2048)
        writer.commit()
    nbytes = sum(b.nbytes for b in bands)
    return TileResult(job.tile, True, "", len(catalog["id"]), dropped, nbytes, no_coords)


def _provenance(job: TileJob, cat_source: str) -> dict[str, Any]:
    return {"preset": job.preset.name, "files": job.files, "catalog": cat_source}


def _check_band_files(job: TileJob) -> None:
    missing = [b for b in job.bands if b not in job.files]
    if missing:
        expected = [
            job.preset.file_patterns[0].format(tilename=job.tile, band=job.preset.band_tokens[b])
            for b in missing
        ]
        raise TileInputError(
            f"tile {job.tile}: missing band file(s) {expected} (band(s) {missing}) in the source"
        )


def _open_band(job: TileJob, band: str, stack: contextlib.ExitStack) -> _Band:
    """Open one band file (kept open by ``stack``) and find its science, weight, mask HDUs."""
    path, preset = job.files[band], job.preset
    fs, p = fsspec.core.url_to_fs(path, **dict(job.source_storage_options or {}))
    try:
        nbytes = int(fs.size(p))
        f = stack.enter_context(fs.open(p, "rb"))
    except Exception as err:
        raise TileInputError(f"{path}: cannot open ({err})") from None
    try:
        hdul = stack.enter_context(fits.open(f, memmap=False, lazy_load_hdus=True))
        sci = _hdu(hdul, preset.hdu_science, path, "science")
    except TileInputError:
        raise
    except Exception as err:
        raise TileInputError(f"{path}: not a readable FITS file ({err})") from None
    return _Band(path, hdul, sci, None, None, nbytes)


def _find_aux_hdus(band: _Band, preset: IngestPreset) -> None:
    """Find the band's weight and mask HDUs (as the preset names them) and check their shape."""
    shape = tuple(int(s) for s in band.science.shape)
    for what, key in (("weight", preset.hdu_weight), ("mask", preset.hdu_mask)):
        if key is None:
            continue
        hdu = _hdu(band.hdul, key, band.path, what)
        if tuple(hdu.shape) != shape:
            raise TileInputError(f"{band.path}: {what} HDU shape {hdu.shape} != {shape}")
        setattr(band, what, hdu)


def _check_bands(job: TileJob, bands: list[_Band]) -> tuple[WCS, fits.Header, tuple[int, int]]:
    """Check every band's shape, WCS, zero point and pixel scale; return the shared grid."""
    ref = bands[0]
    ref_wcs = None
    for band in bands:
        shape = tuple(int(s) for s in band.science.shape)
        if job.expected_shape_yx is not None and shape != tuple(job.expected_shape_yx):
            raise TileInputError(
                f"{band.path}: image shape {shape} differs from the expected "
                f"{tuple(job.expected_shape_yx)} (override with expected_shape_yx / --shape)"
            )
        wcs = _wcs(band.science.header, band.path)
        _check_zero_point(band.science.header, job.preset, band.path)
        if ref_wcs is None:
            ref_wcs, ref_shape = wcs, shape
            _check_pixel_scale(wcs, job.preset, band.path)
        elif shape != ref_shape or not _same_wcs(ref_wcs, wcs):
            raise TileInputError(
                f"{band.path}: WCS or shape {shape} does not match band {job.bands[0]} "
                f"({ref.path}); all bands of a tile must share one pixel grid"
            )
        _find_aux_hdus(band, job.preset)
    assert ref_wcs is not None
    return ref_wcs, _store_header(ref.science.header), ref_shape  # type: ignore[return-value]


def _tile_catalog(
    job: TileJob, wcs: WCS, shape: tuple[int, int]
) -> tuple[dict[str, np.ndarray], tuple[int, int], str]:
    """The tile's rows in lenscan columns, placed; (outside, without RA/Dec) counts; source."""
    per_tile = "{tilename}" in job.catalog_file
    cat_source = job.catalog_file.replace("{tilename}", job.tile)
    if job.catalog_rows is not None:
        raw = job.catalog_rows
    else:
        raw = read_catalog_file(
            cat_source,
            needed_catalog_columns(job.preset, job.bands),
            tile_column=None if per_tile else job.preset.catalog_tile_column,
            tile=None if per_tile else job.tile,
            storage_options=job.source_storage_options,
        )
    catalog = catalog_for_tile(raw, job.preset, job.bands, cat_source)
    placed, outside, no_coords = place_sources(catalog, wcs, shape)
    return placed, (outside, no_coords), cat_source


def source_quantise_step(hdus: list[Any]) -> float | None:
    """The store step for fpack-quantised science HDUs: a power of two <= the finest source step.

    fpack stores a quantised float image as integers times a step per compressed tile (the
    ``ZSCALE`` column; ``sigma / quantize_level`` of that tile). Storing at a power of two no
    larger than the smallest of them keeps every pixel within half a source step of the FITS
    values. Returns None (store losslessly) when any HDU is not quantised.

    Parameters
    ----------
    hdus : list of astropy HDUs
        The science HDU of every band.

    Returns
    -------
    float or None
    """
    steps = []
    for hdu in hdus:
        compressed = isinstance(hdu, fits.CompImageHDU)
        table = getattr(hdu, "compressed_data", None) if compressed else None
        if table is None or "ZSCALE" not in table.names:
            return None
        zscale = np.asarray(table["ZSCALE"], dtype=np.float64)
        zscale = zscale[np.isfinite(zscale) & (zscale > 0)]
        if zscale.size == 0:
            return None
        steps.append(float(zscale.min()))
    return quantise_step_for(min(steps), 1.0) if steps else None


def _stream_band(band: _Band, b: int, writer: Any, shape: tuple[int, int], *, rows: int) -> None:
    """Copy one band's planes into the writer, ``rows`` rows at a time."""
    ny = shape[0]
    for y0 in range(0, ny, rows):
        y1 = min(ny, y0 + rows)
        try:
            image = np.asarray(band.science.section[y0:y1, :], dtype=np.float32)
            weight = mask = None
            if band.weight is not None:
                weight = np.asarray(band.weight.section[y0:y1, :], dtype=np.float32)
                if np.any(weight < 0):
                    # An inverse variance is never negative: corrupt input.
                    raise TileInputError(f"{band.path}: the weight HDU has negative values")
            if band.mask is not None:
                mask = np.asarray(band.mask.section[y0:y1, :]).astype(np.int32, copy=False)
        except TileInputError:
            raise
        except Exception as err:
            raise TileInputError(f"{band.path}: pixel data could not be read ({err})") from None
        writer.write_rows(y0, band=b, image=image, weight=weight, mask=mask)


def _hdu(hdul: fits.HDUList, key: str | int, path: str, what: str) -> Any:
    try:
        hdu = hdul[key]
    except (KeyError, IndexError):
        names = [h.name for h in hdul]
        raise TileInputError(f"{path}: no {what} HDU {key!r} (HDUs: {names})") from None
    if not hdu.is_image or hdu.shape is None or len(hdu.shape) != 2:
        raise TileInputError(f"{path}: {what} HDU {key!r} is not a 2-D image (shape {hdu.shape})")
    return hdu


def _wcs(header: fits.Header, path: str) -> WCS:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            wcs = WCS(header)
    except Exception as err:
        raise TileInputError(f"{path}: invalid WCS in the science header ({err})") from None
    if not wcs.has_celestial or wcs.pixel_n_dim != 2:
        raise TileInputError(f"{path}: the science header has no 2-D celestial WCS")
    return wcs


def _same_wcs(a: WCS, b: WCS) -> bool:
    return (
        list(a.wcs.ctype) == list(b.wcs.ctype)
        and np.allclose(a.wcs.crval, b.wcs.crval, rtol=0, atol=1e-9)
        and np.allclose(a.wcs.crpix, b.wcs.crpix, rtol=0, atol=1e-6)
        and np.allclose(a.pixel_scale_matrix, b.pixel_scale_matrix, rtol=1e-9, atol=1e-14)
    )


def _store_header(header: fits.Header) -> fits.Header:
    """Science header without the FITS structure / compression cards."""
    drop = {"XTENSION", "BITPIX", "PCOUNT", "GCOUNT", "EXTEND", "SIMPLE", "CHECKSUM", "DATASUM"}
    out = fits.Header()
    for card in header.cards:
        key = card.keyword
        if key in drop or key in ("", "COMMENT", "HISTORY") or key.startswith(("ZIMAGE", "ZTENS")):
            continue
        out.append(card)
    return out


def _check_zero_point(header: fits.Header, preset: IngestPreset, path: str) -> None:
    key = preset.zero_point_keyword
    if not key or key not in header:
        return
    try:
        value = float(header[key])
    except (TypeError, ValueError):
        raise TileInputError(f"{path}: header {key}={header[key]!r} is not a number") from None
    if not math.isclose(value, preset.zero_point, abs_tol=1e-4):
        raise TileInputError(
            f"{path}: header {key}={value} differs from the preset's zero point "
            f"{preset.zero_point}; lenscan stores one zero point per survey preset"
        )


def _wcs_pixel_scale(wcs: WCS) -> float:
    from astropy.wcs.utils import proj_plane_pixel_scales

    return float(np.mean(proj_plane_pixel_scales(wcs.celestial)) * 3600.0)


def _check_pixel_scale(wcs: WCS, preset: IngestPreset, path: str) -> None:
    if preset.pixel_scale_arcsec is None:
        return
    got = _wcs_pixel_scale(wcs)
    if abs(got / preset.pixel_scale_arcsec - 1) > preset.pixel_scale_rtol:
        raise TileInputError(
            f"{path}: WCS pixel scale {got:.4f} arcsec differs from the preset's "
            f"{preset.pixel_scale_arcsec} arcsec by more than {preset.pixel_scale_rtol:.0%}"
        )


def _pixel_scale(wcs: WCS, preset: IngestPreset) -> float:
    return preset.pixel_scale_arcsec if preset.pixel_scale_arcsec else _wcs_pixel_scale(wcs)
