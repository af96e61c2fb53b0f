"""The ingest task of one tile: FITS band files -> one tile of the store, streamed in row blocks.

The task opens every band file of the tile (plain ``.fits`` or fpack ``.fits.fz`` through
:class:`astropy.io.fits.CompImageHDU`) with the reader of the preset's file layout
(:mod:`lenscan.survey.formats`: ``des_coadd``, ``afw_exposure``), checks shapes, WCS, pixel
scale and zero point before it writes anything, places the catalogue rows on the tile, then
copies the image / weight / mask planes band by band in blocks of shard rows (``hdu.section``:
only those rows are decompressed) into :meth:`lenscan.survey.SurveyStore.begin_tile`'s writer. A
tile's planes are never held whole: peak memory is one block of rows. The ``complete`` flag is
written last.

fpack-quantised sources (a ``ZSCALE`` column: the float pixels were stored as integer steps)
are stored quantised too, with a power-of-two step no larger than the finest source step, so
no pixel moves by more than half a step of the FITS file's own quantisation.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, replace
from typing import Any

import fsspec
import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning

from lenscan._secrets import safe_url
from lenscan.survey.formats import BandFile, PlaneFile, get_format
from lenscan.survey.ingest.catalog import (
    TileInputError,
    catalog_for_tile,
    catalog_tile_ids,
    check_catalog_tile,
    needed_catalog_columns,
    place_sources,
    read_catalog_file,
    resolve_catalog_glob,
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
    catalog_assigned: bool = False  # rows given to this tile by its catalogue's tile keyword


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
        catalog, (dropped, no_coords), cat_source = _tile_catalog(job, wcs, shape, bands[0].path)
        step = source_quantise_step([b.science for b in bands]) if job.quantise else None
        store = open_survey(job.out, job.storage_options, mode="a")
        writer = store.begin_tile(
            job.tile,
            shape_yx=shape,
            wcs_header=header,
            catalog=catalog,
            pixel_scale_arcsec=_pixel_scale(wcs, job.preset),
            zero_point=job.preset.zero_point,
            weight=bands[0].has_weight,
            mask_dtype=np.int32 if bands[0].has_mask else None,
            chunk_pix=job.chunk_pix,
            shard_pix=job.shard_pix,
            quantise_step=step,
            extra_attrs={"ingest": _provenance(job, cat_source, bands)},
        )
        for b, band in enumerate(bands):
            _stream_band(band, b, writer, shape, rows=job.shard_pix or 2048)
        writer.commit()
    nbytes = sum(b.nbytes for b in bands)
    return TileResult(job.tile, True, "", len(catalog["id"]), dropped, nbytes, no_coords)


def _provenance(job: TileJob, cat_source: str, bands: list[BandFile]) -> dict[str, Any]:
    # Recorded in the store: file URLs without user info or signed query parameters.
    files = {band: safe_url(str(url)) for band, url in job.files.items()}
    out: dict[str, Any] = {
        "preset": job.preset.name,
        "files": files,
        "catalog": safe_url(cat_source),
    }
    out["survey_tile"] = job.preset.survey_tile(job.tile)
    info = {b: f.info for b, f in zip(job.bands, bands, strict=True) if f.info}
    if info:
        out["format"] = info
    return out


def _check_band_files(job: TileJob) -> None:
    missing = [b for b in job.bands if b not in job.files]
    if missing:
        expected = [_expected_file(job.preset, job.tile, b) for b in missing]
        raise TileInputError(
            f"tile {job.tile}: missing band file(s) {expected} (band(s) {missing}) in the source"
        )


def _expected_file(preset: IngestPreset, tile: str, band: str, pattern: str | None = None) -> str:
    """The file name ``pattern`` (default: the preset's first) gives a tile and band (``*`` left
    as is)."""
    tract, _, patch = preset.survey_tile(tile).partition("-")
    fields = {"tilename": tile, "tract": tract, "patch": patch, "band": preset.band_tokens[band]}
    name = pattern or preset.file_patterns[0]
    for key, value in fields.items():
        name = name.replace("{" + key + "}", value)
    return name


def _open_band(job: TileJob, band: str, stack: contextlib.ExitStack) -> BandFile:
    """Open one band file (kept open by ``stack``) with the preset's file-layout reader."""
    path, preset = job.files[band], job.preset
    reader = get_format(preset.format)
    hdul, nbytes = _open_fits(job, path, stack)
    planes = {plane: _open_plane(job, band, plane, stack) for plane in preset.plane_patterns}
    try:
        if planes:
            return reader(hdul, path, nbytes, preset, planes=planes)
        return reader(hdul, path, nbytes, preset)
    except TileInputError:
        raise
    except Exception as err:
        raise TileInputError(f"{path}: not a readable FITS file ({err})") from None


def _open_fits(job: TileJob, path: str, stack: contextlib.ExitStack) -> tuple[fits.HDUList, int]:
    """A FITS file opened lazily (only the rows read are fetched) and its size on storage."""
    fs, p = fsspec.core.url_to_fs(path, **dict(job.source_storage_options or {}))
    try:
        nbytes = int(fs.size(p))
        f = stack.enter_context(fs.open(p, "rb"))
        return stack.enter_context(fits.open(f, memmap=False, lazy_load_hdus=True)), nbytes
    except Exception as err:
        raise TileInputError(f"{path}: cannot open ({err})") from None


def _open_plane(job: TileJob, band: str, plane: str, stack: contextlib.ExitStack) -> PlaneFile:
    """The band's ``plane`` file (Euclid RMS / FLAG); a missing one names the file expected."""
    path = job.files.get(job.preset.plane_key(band, plane))
    if path is None:
        image = job.files[band]
        want = _expected_file(job.preset, job.tile, band, job.preset.plane_patterns[plane][0])
        raise TileInputError(
            f"{image}: its {plane.upper()} file {want} (band {band}) is missing from the source"
        )
    hdul, nbytes = _open_fits(job, path, stack)
    return PlaneFile(hdul, path, nbytes)


def _check_bands(job: TileJob, bands: list[BandFile]) -> tuple[WCS, fits.Header, tuple[int, int]]:
    """Check every band's shape, WCS and pixel scale; return the shared grid."""
    ref = bands[0]
    ref_wcs = None
    for band in bands:
        shape = band.shape_yx
        if job.expected_shape_yx is not None and shape != tuple(job.expected_shape_yx):
            raise TileInputError(
                f"{band.path}: image shape {shape} differs from the expected "
                f"{tuple(job.expected_shape_yx)} (override with expected_shape_yx / --shape)"
            )
        wcs = _wcs(band.header, band.path)
        if ref_wcs is None:
            ref_wcs, ref_shape = wcs, shape
            _check_pixel_scale(wcs, job.preset, band.path)
        elif shape != ref_shape or not _same_wcs(ref_wcs, wcs):
            raise TileInputError(
                f"{band.path}: WCS or shape {shape} does not match band {job.bands[0]} "
                f"({ref.path}); all bands of a tile must share one pixel grid"
            )
        if band.check_planes is not None:
            band.check_planes()
        if (band.has_weight, band.has_mask) != (ref.has_weight, ref.has_mask):
            raise TileInputError(f"{band.path}: its weight / mask planes differ from {ref.path}")
    assert ref_wcs is not None
    return ref_wcs, _store_header(ref.header), ref_shape


def _tile_catalog(
    job: TileJob, wcs: WCS, shape: tuple[int, int], image_path: str
) -> tuple[dict[str, np.ndarray], tuple[int, int], str]:
    """The tile's rows in lenscan columns, placed; (outside, without RA/Dec) counts; source."""
    per_tile = "{tilename}" in job.catalog_file
    cat_source = job.catalog_file.replace("{tilename}", job.tile)
    if per_tile and "*" in cat_source:  # Euclid names carry a hash and a timestamp
        cat_source = resolve_catalog_glob(cat_source, job.source_storage_options)
    if job.catalog_rows is not None:
        raw = job.catalog_rows
    else:
        raw = _read_tile_rows(job, cat_source, per_tile)
    if per_tile and job.preset.catalog_tile_keyword:
        check_catalog_tile(cat_source, job.preset, job.tile, job.source_storage_options)
    catalog = catalog_for_tile(raw, job.preset, job.bands, cat_source)
    fraction = job.preset.catalog_inner_margin_fraction
    whole = per_tile or job.catalog_assigned
    margin = 0 if whole or fraction is None else round(fraction * min(shape))
    placed, dropped, no_coords = place_sources(catalog, wcs, shape, margin=margin)
    n = len(catalog["id"])
    if per_tile and fraction is not None and n and dropped * 2 > n:
        raise TileInputError(
            f"catalogue {cat_source}: {dropped} of its {n} rows lie outside tile {job.tile} "
            f"({image_path}): the catalogue of another tile?"
        )
    # Primary rows lie in the patch's inner region, well inside its image: more than a tenth
    # outside means the file is not the patch the catalogue says (or its WCS is wrong).
    if job.preset.uses_tract_patch and n and dropped * 10 > n:
        raise TileInputError(
            f"{image_path}: its WCS puts {dropped} of the {n} catalogue rows of "
            f"{job.preset.survey_tile(job.tile)} (tract-patch, {cat_source}) outside the image: "
            "the file's WCS disagrees with the catalogue's tract/patch"
        )
    return placed, (dropped, no_coords), cat_source


def _read_tile_rows(job: TileJob, cat_source: str, per_tile: bool) -> dict[str, np.ndarray]:
    """Read the tile's rows from its catalogue file (a tile-column or tract filter pushed down)."""
    p = job.preset
    needed = needed_catalog_columns(p, job.bands)
    if per_tile:
        return read_catalog_file(cat_source, needed, storage_options=job.source_storage_options)
    if not p.uses_tract_patch:
        return read_catalog_file(
            cat_source,
            needed,
            tile_column=p.catalog_tile_column,
            tile=job.tile,
            storage_options=job.source_storage_options,
        )
    assert p.catalog_tract_column is not None
    tract = int(job.tile.split("-", 1)[0])
    raw = read_catalog_file(
        cat_source,
        needed,
        equals=[(p.catalog_tract_column, tract)],
        storage_options=job.source_storage_options,
    )
    keep = catalog_tile_ids(raw, p) == job.tile
    return {c: np.asarray(v)[keep] for c, v in raw.items()}


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


def _stream_band(band: BandFile, b: int, writer: Any, shape: tuple[int, int], *, rows: int) -> None:
    """Copy one band's planes into the writer, ``rows`` rows at a time."""
    ny = shape[0]
    for y0 in range(0, ny, rows):
        y1 = min(ny, y0 + rows)
        image, weight, mask = band.read_rows(y0, y1)
        writer.write_rows(y0, band=b, image=image, weight=weight, mask=mask)


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
