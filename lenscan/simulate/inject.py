"""Injection-recovery on a user's own survey: simulated arcs around its real galaxies.

:func:`inject_arcs` copies a survey store tile by tile into a new store (the original is never
written), adding to each tile the lensed-source light of ``n_per_tile`` simulated lens systems
centred on real catalogue galaxies that pass the colour cut (the hosts keep their own light, as in
the poster's "real galaxy + simulated arc" training class). The arcs carry their own Poisson
noise (no extra sky). It returns the injection table (host id, Einstein radius, source
magnitudes, arc S/N); scanning the new store and matching host ids measures completeness.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from astropy.table import Table, vstack

from lenscan.select import colour_cut_mask, get_colour_cut
from lenscan.simulate.population import (
    LensPopulation,
    RenderInfo,
    render_systems,
    sample_lens_systems,
)
from lenscan.simulate.presets import SurveyPreset, get_survey_preset
from lenscan.survey import create_survey, open_survey

__all__ = ["ARC_STAMP_PIX", "inject_arcs"]

#: Side of the stamp each arc is rendered in (pixels); arcs of theta_E <= 3.5" fit easily.
ARC_STAMP_PIX = 64


def _hosts(
    tile: Any, catalog: Mapping[str, np.ndarray], cut: Any, n: int, rng: np.random.Generator
) -> np.ndarray:
    """Row indices of up to ``n`` hosts: sources passing the cut, a stamp away from the edges."""
    ny, nx = tile.shape_yx
    half = ARC_STAMP_PIX // 2 + 1
    x, y = np.asarray(catalog["x"]), np.asarray(catalog["y"])
    inside = (x > half) & (x < nx - half) & (y > half) & (y < ny - half)
    rows = np.flatnonzero(colour_cut_mask(catalog, cut) & inside)
    return np.sort(rng.choice(rows, size=min(n, rows.size), replace=False))


def _arcs(
    n: int,
    x: np.ndarray,
    y: np.ndarray,
    tile: Any,
    population: LensPopulation | None,
    preset: SurveyPreset,
    seed: int,
) -> tuple[np.ndarray, dict[str, np.ndarray], RenderInfo]:
    """Render ``n`` arcs (lensed source only) centred at sub-pixel offsets of their hosts."""
    gen = torch.Generator().manual_seed(seed)
    params = sample_lens_systems(population, n, generator=gen)
    scale = tile.pixel_scale_arcsec
    for key, pos in (("x", x), ("y", y)):
        offset = torch.as_tensor((pos - np.round(pos)) * scale, dtype=torch.float32)
        shift = offset - params[f"lens_center_{key}_arcsec"]
        for name in (f"lens_center_{key}_arcsec", f"source_{key}_arcsec"):
            params[name] = params[name] + shift
    images, info = render_systems(
        params, preset, ARC_STAMP_PIX, bands=tile.bands, with_lens=False, generator=gen,
        sky_counts_override=0.0, return_info=True,
    )  # fmt: skip
    # The preset renders in its own zero point; scale to the tile's.
    gain = 10 ** (0.4 * (tile.zero_point - preset.zero_point))
    return images.numpy() * gain, {k: v.numpy() for k, v in params.items()}, info


def inject_arcs(
    src_url: str,
    dst_url: str,
    *,
    n_per_tile: int = 20,
    seed: int = 0,
    population: LensPopulation | None = None,
    cut: Any = "des-jacobs19",
    preset: Any = "des",
    storage_options: Mapping[str, Any] | None = None,
    dst_storage_options: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Table:
    """Copy the survey at ``src_url`` to ``dst_url`` with simulated arcs around real galaxies.

    Parameters
    ----------
    src_url, dst_url : str
        The survey to read (never written) and the new store (must not exist).
    n_per_tile : int
        Arcs per tile (fewer when fewer galaxies pass the cut).
    seed : int
        Seed of host choice and lens parameters.
    population : LensPopulation, optional
        Parameter ranges of the injected systems (default ``LensPopulation()``).
    cut : str or ColourCut
        Hosts are drawn from the sources passing this cut.
    preset : str
        Survey preset whose PSF, noise and zero point render the arcs; its pixel scale must be
        the survey's.
    overwrite : bool
        Replace a lenscan survey already at ``dst_url``.

    Returns
    -------
    astropy.table.Table
        One row per injected arc: ``tile, id`` (the host), ``ra, dec, theta_e_arcsec``,
        ``source_mag_<band>``, ``source_snr``, ``lensed_source_mag_<band>``.
    """
    if n_per_tile < 1:
        raise ValueError(f"n_per_tile must be at least 1, got {n_per_tile}")
    if str(src_url).rstrip("/") == str(dst_url).rstrip("/"):
        raise ValueError(f"inject_arcs writes a new store: dst_url must differ from {src_url}")
    src = open_survey(src_url, storage_options=storage_options)
    the_preset = get_survey_preset(preset)
    if abs(the_preset.pixel_scale_arcsec - src.tile(src.tile_ids[0]).pixel_scale_arcsec) > 1e-6:
        raise ValueError(
            f'preset {preset!r} renders at {the_preset.pixel_scale_arcsec}"/px but {src_url} '
            f'has {src.tile(src.tile_ids[0]).pixel_scale_arcsec}"/px; pick a matching preset'
        )
    dst = create_survey(
        dst_url, name=f"{src.name}+arcs", bands=src.bands, storage_options=dst_storage_options,
        overwrite=overwrite,
    )  # fmt: skip
    rng = np.random.default_rng(seed)
    the_cut = get_colour_cut(cut)
    rows = []
    for k, tile_id in enumerate(src.tile_ids):
        tile = src.tile(tile_id)
        catalog = tile.catalog()
        hosts = _hosts(tile, catalog, the_cut, n_per_tile, rng)
        image = np.asarray(tile.image[...], dtype=np.float32)
        if hosts.size:
            tile_seed = seed * 100_003 + k
            rows.append(_add_arcs(image, tile, catalog, hosts, population, the_preset, tile_seed))
        dst.write_tile(
            tile_id, image=image, wcs_header=tile.header, catalog=catalog,
            pixel_scale_arcsec=tile.pixel_scale_arcsec, zero_point=tile.zero_point,
            weight=None if tile.weight is None else np.asarray(tile.weight[...]),
            mask=None if tile.mask is None else np.asarray(tile.mask[...]),
        )  # fmt: skip
    table = vstack(rows) if rows else Table()
    table.meta.update(source_survey=str(src_url), seed=seed, n_per_tile=n_per_tile)
    return table


def _add_arcs(
    image: np.ndarray,
    tile: Any,
    catalog: Mapping[str, np.ndarray],
    hosts: np.ndarray,
    population: LensPopulation | None,
    preset: SurveyPreset,
    seed: int,
) -> Table:
    """Add arcs around the ``hosts`` rows of ``catalog`` into ``image``; their table rows."""
    x, y = np.asarray(catalog["x"])[hosts], np.asarray(catalog["y"])[hosts]
    arcs, params, info = _arcs(hosts.size, x, y, tile, population, preset, seed)
    h = ARC_STAMP_PIX // 2
    for arc, cx, cy in zip(arcs, np.round(x).astype(int), np.round(y).astype(int), strict=True):
        image[:, cy - h : cy - h + ARC_STAMP_PIX, cx - h : cx - h + ARC_STAMP_PIX] += arc
    return _injection_rows(tile, catalog, hosts, params, info)


def _injection_rows(
    tile: Any,
    catalog: Mapping[str, np.ndarray],
    hosts: np.ndarray,
    params: Mapping[str, np.ndarray],
    info: RenderInfo,
) -> Table:
    """One table row per injected arc: its host, lens and source parameters, S/N."""
    out = Table(
        {
            "tile": [tile.id] * hosts.size,
            "id": np.asarray(catalog["id"], np.int64)[hosts],
            "ra": np.asarray(catalog["ra"])[hosts],
            "dec": np.asarray(catalog["dec"])[hosts],
            "theta_e_arcsec": params["theta_e_arcsec"],
            "source_snr": info.source_snr_total.numpy(),
        }
    )
    for b, band in enumerate(info.bands):
        out[f"source_mag_{band}"] = params[f"source_mag_{band}"]
        out[f"lensed_source_mag_{band}"] = info.lensed_source_mag[:, b].numpy()
    return out
