"""Synthetic survey tiles with injected lenses and a truth table (:func:`make_survey`).

A synthetic survey is a lenscan store of ``n_tiles`` coadd-like tiles on a small sky patch,
adjacent on a grid with a small overlap (as DES tiles overlap), so the same objects, lenses
included, appear in two tiles near the seams. Each tile holds

* field galaxies: elliptical Sersic profiles with number counts, sizes and colours of a
  DES-depth field: about three quarters blue discs, one quarter red early types whose colours
  follow a redshift-like parameter; most red ones fall inside the Jacobs et al. colour box
  (1.8 < g-i < 5, 0.6 < g-r < 3) and are *not* lenses, as in real data;
* stars: the band's Moffat PSF at sub-pixel positions, with stellar-locus colours;
* injected lenses drawn from :class:`lenscan.simulate.LensPopulation` and rendered by
  :func:`lenscan.simulate.render_systems` (lens light, lensed smooth or clumpy source, and
  for 30 % a catalogued neighbour 1-3" away); 30 % of red field galaxies get such a neighbour
  too (``neighbours.parquet``);
* each tile at its own seeing (``seeing_factor_range``: 0.85-1.35x the preset's FWHM for
  ground-based presets, scattered from band to band), recorded in the tile's attributes and
  the truth tables;
* the noise of the preset (Poisson noise of objects and sky through the preset's effective gain,
  sky subtracted, via :func:`lenscan.simulate.add_noise`), an inverse-variance weight plane, a
  mask plane (zero, except a bad column segment in some tiles, whose pixels have weight 0);
* a source catalogue with measured-like magnitudes (true flux plus noise consistent with the
  depth), errors, flags and DES-like ``extended_class``; with a ``vis`` band (the ``euclid``
  preset) also Euclid MER's detection columns measured on the noisy VIS image
  (:func:`lenscan.simulate.mer_detect.mer_detection_columns`: ``vis_det``,
  ``segmentation_area``, ``mu_max``, ``mumax_minus_mag``, ``spurious_prob`` = 0,
  ``point_like_prob``, ``extended_prob``) and ``gaia_match`` (stars with VIS < 20.5), under
  the names the ``euclid-q1`` ingest preset stores, so cut ``euclid-q1`` runs on such a store;
  the truth table carries the lens rows' values.

Objects are rendered as stamps and added into the tile, never as profiles over the whole tile,
so a 4-tile 2048^2 3-band survey takes seconds. The truth table (one row per injected lens) is
written to ``{url}/truth.parquet`` and returned.

Catalogue ids are global: an object in the overlap of two tiles has the same ``id`` in both
catalogues (unlike DES, where each tile has its own COADD_OBJECT_ID), so truth matching by id
works whichever tile a candidate came from; duplicates still occur and must be merged by the
scan's reduce step.
"""

from __future__ import annotations

import dataclasses
import math
import posixpath
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import torch
from astropy.wcs import WCS

from lenscan.simulate._field import (
    BAD_MAG,
    STAMP_BUCKETS,
    add_light_to_tile,
    measure_photometry,
    render_galaxies,
    render_stars,
    sample_field_galaxies,
    sample_stars,
    stamp_bucket,
)
from lenscan.simulate.artefacts import (
    add_bad_column,
    add_bright_star_features,
    add_cosmic_rays,
    add_satellite_trail,
    saturate,
)
from lenscan.simulate.confusers import CONFUSER_KINDS, ConfuserPopulation, render_confusers
from lenscan.simulate.confusers import sample_confusers as _sample_confusers
from lenscan.simulate.mer_detect import mer_detection_columns
from lenscan.simulate.physics import (
    add_noise,
    pixel_grid,
    psf_kernel,
)
from lenscan.simulate.population import (
    LensPopulation,
    RenderInfo,
    render_systems,
    sample_lens_systems,
)
from lenscan.simulate.presets import SurveyPreset, check_seeing_factor_range, get_survey_preset

__all__ = [
    "BAD_MAG",
    "JACOBS_BOX",
    "SyntheticSurveyInfo",
    "injected_ids",
    "make_survey",
    "passes_jacobs_box",
    "read_artefacts",
    "read_confusers",
    "read_truth",
]

#: The Jacobs et al. (2019) colour box: (colour, low, high), strict inequalities.
JACOBS_BOX: tuple[tuple[str, float, float], ...] = (("g-i", 1.8, 5.0), ("g-r", 0.6, 3.0))
#: Catalogue flag bits set by the simulator (SExtractor meanings).
FLAG_SATURATED = 4
FLAG_TRUNCATED = 8
#: Mask bit of a bad column (see lenscan.simulate.artefacts for the others).
MASK_BAD_COLUMN = 1
#: Confusers per arcmin^2 by default (~25 per 2048^2 DES tile: far more than a real sky holds,
#: so that a scan meets enough of them to measure how often each fools the model).
DEFAULT_CONFUSERS_PER_ARCMIN2 = 0.08
_COSMIC_RAYS_PER_ARCMIN2 = 0.3  # residual hits per tile area, after the coadd's rejection
_TRAIL_PROBABILITY = 0.3  # per tile
_BRIGHT_STAR_MAG_I = 17.5  # stars brighter than this get spikes and a halo
_SATURATION_COUNTS = 1.5e4  # noiseless counts per pixel above which a coadd pixel is masked

_LENS_STAMP_PIX = 81  # odd: centred unambiguously
_LENS_BORDER_PIX = 48  # lenses this far inside their tile, so their stamps are complete
_LENS_MIN_SEPARATION_PIX = 100
_FIELD_EXCLUSION_ARCSEC = 4.0  # no field object this close to an injected lens centre
_DETECTION_SNR = 5.0
_BLEND_RADIUS_ARCSEC = 1.0  # lensed-source light within this radius blends into the lens
_GAIA_MAG_VIS = 20.5  # stars brighter than this have a Gaia match (Euclid's GAIA_ID)
#: Euclid MER columns measured on the VIS image (lenscan.simulate.mer_detect), store names.
_MER_COLUMNS = ("vis_det", "segmentation_area", "mu_max", "mumax_minus_mag", "spurious_prob",
                "point_like_prob", "extended_prob")  # fmt: skip
#: Tile seeing: each band's factor is scattered about the tile's by this much (log-normal).
DEFAULT_SEEING_BAND_SCATTER = 0.05
#: Fraction of red field galaxies with a catalogued neighbour, and its distance range.
DEFAULT_NEIGHBOUR_FRACTION = 0.3
NEIGHBOUR_DISTANCE_ARCSEC = (1.0, 3.0)


@dataclass
class SyntheticSurveyInfo:
    """What :func:`make_survey` wrote.

    Attributes
    ----------
    url : str
        The survey store URL.
    tile_ids : list of str
        Tiles written.
    bands : tuple of str
        Bands of the images.
    preset : str
        Simulator preset name.
    truth : dict of str -> ndarray
        The truth table (also at ``{url}/truth.parquet``), one row per injected lens.
    truth_url : str
        Where the truth table was written.
    n_sources : dict
        Tile -> number of catalogue rows.
    fits : DesFitsExport or None
        The DES-style FITS export, when ``fits_dir`` was given.
    seconds : float
        Wall-clock time.
    """

    url: str
    tile_ids: list[str]
    bands: tuple[str, ...]
    preset: str
    truth: dict[str, np.ndarray] = field(repr=False)
    truth_url: str
    n_sources: dict[str, int] = field(default_factory=dict)
    fits: Any = None
    seconds: float = 0.0

    def __str__(self) -> str:
        n_lens = len(self.truth.get("id", ()))
        text = (
            f"synthetic survey at {self.url}: {len(self.tile_ids)} tile(s) "
            f"{', '.join(self.tile_ids)}, bands {''.join(self.bands)}, "
            f"{sum(self.n_sources.values())} catalogue sources, {n_lens} injected lenses "
            f"(truth: {self.truth_url}), {self.seconds:.1f} s"
        )
        if self.fits is not None:
            text += f"; DES-style FITS in {self.fits.out_dir}"
        return text


# --------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------


def passes_jacobs_box(mags: Mapping[str, np.ndarray]) -> np.ndarray:
    """True where catalogue magnitudes lie inside the Jacobs et al. colour box.

    Parameters
    ----------
    mags : mapping
        ``{"g": ..., "r": ..., "i": ...}`` magnitude arrays; values >= 90 or non-finite never
        pass.

    Returns
    -------
    ndarray of bool
    """
    g, r, i = (np.asarray(mags[b], dtype=np.float64) for b in ("g", "r", "i"))
    ok = np.isfinite(g) & np.isfinite(r) & np.isfinite(i) & (g < 90) & (r < 90) & (i < 90)
    cols = {"g-i": g - i, "g-r": g - r}
    for colour, lo, hi in JACOBS_BOX:
        with np.errstate(invalid="ignore"):
            ok &= (cols[colour] > lo) & (cols[colour] < hi)
    return ok


def _tile_wcs(ra_deg: float, dec_deg: float, size_pix: int, scale_arcsec: float) -> WCS:
    """A north-up TAN WCS of a ``size_pix`` square tile centred on ``(ra, dec)``."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra_deg, dec_deg]
    # FITS pixels are 1-based: the centre of a 0-based (n-1)/2 pixel is at (n+1)/2.
    w.wcs.crpix = [(size_pix + 1) / 2.0, (size_pix + 1) / 2.0]
    w.wcs.cd = [[-scale_arcsec / 3600.0, 0.0], [0.0, scale_arcsec / 3600.0]]
    w.wcs.radesys = "ICRS"
    w.wcs.equinox = 2000.0
    w.pixel_shape = (size_pix, size_pix)
    return w


def _tile_names(centres: Sequence[tuple[float, float]]) -> list[str]:
    """DES-style names; tiles closer than a name's resolution get a letter suffix."""
    from lenscan.simulate.fits_export import des_tilename

    names: list[str] = []
    for ra, dec in centres:
        base = des_tilename(ra, dec)
        name, k = base, 0
        while name in names:
            name = base + "abcdefghijklmnopqrstuvwxyz"[k]
            k += 1
        names.append(name)
    return names


# --------------------------------------------------------------------------------------------
# make_survey: plan (layout, objects, catalogues, truth) -> per-tile pixels -> write
# --------------------------------------------------------------------------------------------


@dataclass
class _Rngs:
    """The independent random streams of one survey (spawned from its seed, stable by index)."""

    layout: np.random.Generator
    objects: np.random.Generator
    measure: np.random.Generator
    confusers: np.random.Generator
    artefacts: np.random.Generator
    noise: torch.Generator  # lens parameters, then the pixel noise of each tile
    neighbours: np.random.Generator  # catalogued neighbours of field galaxies

    @classmethod
    def from_seed(cls, seed: int) -> _Rngs:
        """Spawn the streams; adding streams at the end keeps the earlier ones unchanged."""
        ss = np.random.SeedSequence(seed)
        layout, objects, measure, rng_torch, confusers, artefacts, neighbours = (
            np.random.default_rng(s) for s in ss.spawn(7)
        )
        noise = torch.Generator().manual_seed(int(rng_torch.integers(0, 2**62)))
        return cls(layout, objects, measure, confusers, artefacts, noise, neighbours)


@dataclass
class _Layout:
    """The tiles on the sky: names, WCSs, and the patch holding them (with a stamp margin)."""

    n_pix: int
    scale: float
    tile_ids: list[str]
    wcss: list[WCS]
    patch: WCS  # patch pixel (0, 0) is the patch centre
    half_w: float  # half extent of the patch in patch pixels, margin included
    half_h: float

    @property
    def area_arcmin2(self) -> float:
        """Area of the patch, margin included."""
        return (2 * self.half_w * self.scale / 60) * (2 * self.half_h * self.scale / 60)

    @property
    def tile_area_arcmin2(self) -> float:
        """Area of one tile."""
        return (self.n_pix * self.scale / 60) ** 2


@dataclass
class _Lenses:
    """Injected lenses: owner tile, pixel and sky positions, parameters, catalogues and truth.

    After :func:`_lens_catalogues`, ``params`` hold source and companion positions relative to
    the lens centre (see :func:`_recentre`).
    """

    tile: np.ndarray
    x: np.ndarray
    y: np.ndarray
    ra: np.ndarray
    dec: np.ndarray
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    comp_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    cat: dict[str, np.ndarray] = field(default_factory=dict)
    comp_cat: dict[str, np.ndarray] = field(default_factory=dict)
    truth: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n(self) -> int:
        """Number of lenses."""
        return len(self.x)


@dataclass
class _Confusers:
    """Injected confusers: positions (``where``), parameters, catalogues and truth."""

    where: dict[str, np.ndarray]
    params: dict[str, torch.Tensor]
    cat: dict[str, np.ndarray] = field(default_factory=dict)
    comp_cat: dict[str, np.ndarray] = field(default_factory=dict)
    truth: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n(self) -> int:
        """Number of confusers."""
        return len(self.where["tile"])


@dataclass
class _SurveyPlan:
    """Everything :func:`make_survey` decides before the first pixel is rendered."""

    preset: SurveyPreset
    bands: tuple[str, ...]
    layout: _Layout
    rngs: _Rngs
    galaxies: dict[str, np.ndarray]
    stars: dict[str, np.ndarray]
    lenses: _Lenses
    confusers: _Confusers
    kernels: torch.Tensor  # the bands' PSFs
    artefacts: bool
    bad_column_probability: float
    seeing_factor_range: tuple[float, float] | None = None  # None: the preset's seeing_spread
    seeing_band_scatter: float = 0.0


# long-function: signature and numpydoc docstring of 23 parameters are 100 lines; body: 3 steps
def make_survey(
    url: str,
    *,
    n_tiles: int = 4,
    seed: int = 0,
    preset: str | SurveyPreset = "des",
    bands: Sequence[str] | None = None,
    tile_size_pix: int = 2048,
    lenses_per_tile: int = 12,
    galaxies_per_arcmin2: float = 12.0,
    stars_per_arcmin2: float = 0.5,
    overlap_pix: int | None = None,
    centre_deg: tuple[float, float] = (40.0, -30.0),
    population: LensPopulation | None = None,
    bad_column_probability: float = 0.5,
    confusers_per_arcmin2: float = DEFAULT_CONFUSERS_PER_ARCMIN2,
    confuser_population: ConfuserPopulation | None = None,
    artefacts: bool = True,
    storage_options: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    lens_positions_deg: Sequence[tuple[float, float]] = (),
    chunk_pix: int = 128,
    shard_pix: int | None = 2048,
    fits_dir: str | None = None,
    fits_compress: bool = True,
    progress: bool = False,
    seeing_factor_range: tuple[float, float] | str | None = "preset",
    seeing_band_scatter: float = DEFAULT_SEEING_BAND_SCATTER,
    neighbour_fraction: float = DEFAULT_NEIGHBOUR_FRACTION,
) -> SyntheticSurveyInfo:
    """Write a synthetic survey store with injected lenses and their truth table.

    Parameters
    ----------
    url : str
        Store URL (local path or fsspec URL).
    n_tiles : int
        Number of tiles, laid out on a near-square grid around ``centre_deg``.
    seed : int
        Seed; the same seed gives the same pixels, catalogues and truth.
    preset : str or SurveyPreset
        Simulator survey preset (pixel scale, zero point, seeing, sky, depth).
    bands : sequence of str, optional
        Bands to simulate (default: the preset's default bands, g r i for DES).
    tile_size_pix : int
        Side of the square tiles.
    lenses_per_tile : int
        Lenses injected per tile (each placed at least 48 px inside its tile).
    galaxies_per_arcmin2 : float
        Field galaxies per arcmin^2 with 16 < i < 23.5 (DES DR2 detects ~10-20 per arcmin^2 to
        that depth; lower it to make tiles faster).
    stars_per_arcmin2 : float
        Stars per arcmin^2 with 15.5 < i < 23.5 (high Galactic latitude: ~0.3-1).
    overlap_pix : int, optional
        Overlap of neighbouring tiles in pixels; default ``tile_size_pix // 32`` (64 px for
        2048 px tiles, a few per cent of the tile, as DES tiles overlap).
    centre_deg : (float, float)
        RA, Dec of the patch centre.
    population : LensPopulation, optional
        Lens parameter ranges (default ``LensPopulation()``).
    bad_column_probability : float
        Probability that a tile has one bad column segment (masked, weight 0).
    confusers_per_arcmin2 : float
        Lens confusers (:mod:`lenscan.simulate.confusers`: spirals, rings, mergers, red
        galaxies with blue companions, edge-on discs) per arcmin^2, placed like lenses (inside
        their owner tile, apart from lenses and each other); their truth is written to
        ``{url}/confusers.parquet``. 0 for none.
    confuser_population : ConfuserPopulation, optional
        Their parameter ranges.
    artefacts : bool
        Add cosmic-ray residuals, satellite trails, diffraction spikes and halos of bright
        stars and saturated cores with bleed trails (:mod:`lenscan.simulate.artefacts`, with
        weight and mask set as a coadd sets them); truth in ``{url}/artefacts.parquet``.
    storage_options : mapping, optional
        fsspec options for ``url``.
    lens_positions_deg : sequence of (ra, dec)
        Sky positions (deg) where lenses must be: each takes one of its tile's
        ``lenses_per_tile`` slots (the first tile whose interior, away from the edges, holds it);
        the other slots are drawn at random. E.g. known lenses, to test cross-matching.
    overwrite : bool
        Replace an existing survey at ``url``.
    chunk_pix, shard_pix : int
        Store chunking (see ``SurveyStore.write_tile``).
    fits_dir : str, optional
        Also write the survey as DES DR2 style FITS tiles and catalogue there
        (:func:`lenscan.simulate.fits_export.write_des_fits`).
    fits_compress : bool
        ``.fits.fz`` (lossless) rather than ``.fits`` for ``fits_dir``.
    progress : bool
        Show a progress bar over tiles (a DES-like 2048 px tile takes a few seconds).
    seeing_factor_range : (float, float), "preset" or None
        Each tile's seeing is the preset's FWHM times a factor drawn uniformly from this range,
        every band scattered about it by ``seeing_band_scatter``; both in the tile's attributes
        (``synthetic.seeing_factor``, ``synthetic.seeing_factor_per_band``) and the truth
        tables (``seeing_factor``, ``seeing_fwhm_{band}``). ``"preset"`` (default): the
        preset's ``seeing_factor_range`` (0.85-1.35 for ground-based surveys, as DES tiles
        vary about the median; none for Euclid). None: the preset's ``seeing_spread`` (what
        surveys had before; DES: every tile at the median).
    seeing_band_scatter : float
        Log-normal scatter of each band's factor about the tile's (clipped at 2 sigma).
    neighbour_fraction : float
        Fraction of red (lens-like) field galaxies given a catalogued neighbour 1-3" away, its
        own catalogue row; truth in ``{url}/neighbours.parquet``. Lens hosts get theirs from
        ``population.companion_probability`` (the same 0.3 by default), so a neighbour tells
        lenses and non-lenses apart no more than on the sky.

    Returns
    -------
    SyntheticSurveyInfo
    """
    from lenscan.survey import create_survey

    t0 = time.perf_counter()
    p = get_survey_preset(preset)
    use = p.check_bands(bands)
    overlap_pix = _check_survey_args(
        n_tiles=n_tiles, tile_size_pix=tile_size_pix, lenses_per_tile=lenses_per_tile,
        galaxies_per_arcmin2=galaxies_per_arcmin2, stars_per_arcmin2=stars_per_arcmin2,
        overlap_pix=overlap_pix, bad_column_probability=bad_column_probability,
        confusers_per_arcmin2=confusers_per_arcmin2,
    )  # fmt: skip
    if isinstance(seeing_factor_range, str) and seeing_factor_range == "preset":
        seeing_factor_range = p.seeing_factor_range
    seeing_factor_range = check_seeing_factor_range(
        seeing_factor_range, "make_survey: seeing_factor_range"
    )
    _check_realism_args(seeing_band_scatter, neighbour_fraction)
    plan = _plan_survey(
        p, use, _Rngs.from_seed(seed), n_tiles=n_tiles, n_pix=int(tile_size_pix),
        overlap_pix=overlap_pix, centre_deg=centre_deg, lenses_per_tile=lenses_per_tile,
        lens_positions_deg=lens_positions_deg, population=population,
        galaxies_per_arcmin2=galaxies_per_arcmin2,
        stars_per_arcmin2=stars_per_arcmin2, confusers_per_arcmin2=confusers_per_arcmin2,
        confuser_population=confuser_population, artefacts=artefacts,
        bad_column_probability=bad_column_probability, neighbour_fraction=neighbour_fraction,
    )  # fmt: skip
    plan = dataclasses.replace(
        plan, seeing_factor_range=seeing_factor_range, seeing_band_scatter=seeing_band_scatter
    )
    store = create_survey(
        url, name=f"synthetic-{p.name}", bands=use, storage_options=storage_options,
        overwrite=overwrite,
    )  # fmt: skip
    n_sources, art_rows = _write_tiles(
        store, plan, seed=seed, chunk_pix=chunk_pix, shard_pix=shard_pix, progress=progress
    )
    store.consolidate_index()  # planning a scan of this survey is then one read
    truth_url = _write_truth(url, plan.lenses.truth, storage_options)
    _write_truth(url, plan.confusers.truth, storage_options, name="confusers.parquet")
    _write_truth(url, _stack_rows(art_rows), storage_options, name="artefacts.parquet")
    _write_truth(url, _neighbour_truth(plan), storage_options, name="neighbours.parquet")
    fits = None
    if fits_dir is not None:
        from lenscan.simulate.fits_export import write_des_fits

        fits = write_des_fits(store, fits_dir, compress=fits_compress)
    return SyntheticSurveyInfo(
        url=url,
        tile_ids=list(plan.layout.tile_ids),
        bands=tuple(use),
        preset=p.name,
        truth=plan.lenses.truth,
        truth_url=truth_url,
        n_sources=n_sources,
        fits=fits,
        seconds=time.perf_counter() - t0,
    )


def _check_realism_args(seeing_band_scatter: float, neighbour_fraction: float) -> None:
    """Check :func:`make_survey`'s seeing scatter and neighbour fraction."""
    if not (math.isfinite(seeing_band_scatter) and 0 <= seeing_band_scatter < 1):
        raise ValueError(
            f"make_survey: seeing_band_scatter must be in [0, 1), got {seeing_band_scatter!r}"
        )
    if not (math.isfinite(neighbour_fraction) and 0 <= neighbour_fraction <= 1):
        raise ValueError(
            f"make_survey: neighbour_fraction must be in [0, 1], got {neighbour_fraction!r}"
        )


def _check_survey_args(
    *,
    n_tiles: int,
    tile_size_pix: int,
    lenses_per_tile: int,
    galaxies_per_arcmin2: float,
    stars_per_arcmin2: float,
    overlap_pix: int | None,
    bad_column_probability: float,
    confusers_per_arcmin2: float,
) -> int:
    """Check :func:`make_survey`'s arguments; return the tile overlap in pixels."""
    for name, value in (("n_tiles", n_tiles), ("tile_size_pix", tile_size_pix)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"make_survey: {name} must be a positive integer, got {value!r}")
    if tile_size_pix < 2 * _LENS_BORDER_PIX + 1:
        raise ValueError(
            f"make_survey: tile_size_pix must be > {2 * _LENS_BORDER_PIX} to hold lenses, "
            f"got {tile_size_pix}"
        )
    if lenses_per_tile < 0:
        raise ValueError(f"make_survey: lenses_per_tile must be >= 0, got {lenses_per_tile}")
    for name, density in (
        ("galaxies_per_arcmin2", galaxies_per_arcmin2),
        ("stars_per_arcmin2", stars_per_arcmin2),
    ):
        if not (math.isfinite(density) and density >= 0):
            raise ValueError(f"make_survey: {name} must be finite and >= 0, got {density!r}")
    if overlap_pix is None:
        overlap_pix = tile_size_pix // 32
    if not (0 <= overlap_pix < tile_size_pix // 2):
        raise ValueError(
            f"make_survey: overlap_pix must be in [0, tile_size_pix/2), got {overlap_pix}"
        )
    if not (0.0 <= bad_column_probability <= 1.0):
        raise ValueError(
            f"make_survey: bad_column_probability must be in [0, 1], got {bad_column_probability}"
        )
    if not (math.isfinite(confusers_per_arcmin2) and confusers_per_arcmin2 >= 0):
        raise ValueError(
            f"make_survey: confusers_per_arcmin2 must be finite and >= 0, got "
            f"{confusers_per_arcmin2!r}"
        )
    return int(overlap_pix)


def _plan_survey(
    p: SurveyPreset,
    use: tuple[str, ...],
    rngs: _Rngs,
    *,
    n_tiles: int,
    n_pix: int,
    overlap_pix: int,
    centre_deg: tuple[float, float],
    lenses_per_tile: int,
    lens_positions_deg: Sequence[tuple[float, float]],
    population: LensPopulation | None,
    galaxies_per_arcmin2: float,
    stars_per_arcmin2: float,
    confusers_per_arcmin2: float,
    confuser_population: ConfuserPopulation | None,
    artefacts: bool,
    bad_column_probability: float,
    neighbour_fraction: float = 0.0,
) -> _SurveyPlan:
    """The population step: layout, lenses, confusers, field objects, ids and catalogues."""
    layout = _plan_layout(p, n_tiles, n_pix, overlap_pix, centre_deg)
    lenses = _place_lenses(rngs.layout, layout, lenses_per_tile, lens_positions_deg)
    if lenses.n:
        lenses.params = sample_lens_systems(population, lenses.n, generator=rngs.noise)
    confusers = _place_confusers_and_sample(
        rngs.confusers, layout, lenses, confusers_per_arcmin2, confuser_population
    )
    gal, star = _field_objects(
        rngs.objects, layout, use, galaxies_per_arcmin2, stars_per_arcmin2,
        np.r_[lenses.ra, confusers.where["ra"]], np.r_[lenses.dec, confusers.where["dec"]],
        neighbours=(rngs.neighbours, neighbour_fraction),
    )  # fmt: skip
    _assign_ids(lenses, confusers, gal, star)
    _measure_field(rngs.measure, gal, star, p, use)
    if lenses.n:
        _lens_catalogues(rngs.measure, lenses, layout, p, use)
    confusers.cat, confusers.comp_cat, confusers.truth = _confuser_catalogues(
        confusers.where, confusers.params, p, use, rngs.confusers, layout.tile_ids, layout.wcss
    )
    if not lenses.truth:  # no lenses: an empty table with the key columns
        truth = {"id": np.zeros(0, np.int64), "tile": np.zeros(0, dtype="U1")}
        truth |= {c: np.zeros(0) for c in ("ra", "dec", "x", "y", "theta_e_arcsec", "source_snr")}
        lenses.truth = truth
    return _SurveyPlan(
        preset=p, bands=use, layout=layout, rngs=rngs, galaxies=gal, stars=star, lenses=lenses,
        confusers=confusers, kernels=psf_kernel(p, use), artefacts=artefacts,
        bad_column_probability=bad_column_probability,
    )  # fmt: skip


def _plan_layout(
    p: SurveyPreset, n_tiles: int, n_pix: int, overlap_pix: int, centre_deg: tuple[float, float]
) -> _Layout:
    """Tile centres on a near-square grid on the patch's tangent plane, their names and WCSs."""
    scale = p.pixel_scale_arcsec
    ncols = math.ceil(math.sqrt(n_tiles))
    nrows = math.ceil(n_tiles / ncols)
    step = n_pix - overlap_pix
    patch = _tile_wcs(centre_deg[0], centre_deg[1], 1, scale)
    patch.wcs.crpix = [0.0, 0.0]  # patch pixel (0, 0) is the patch centre
    centres = []
    for k in range(n_tiles):
        r, c = divmod(k, ncols)
        px = (c - (ncols - 1) / 2) * step
        py = (r - (nrows - 1) / 2) * step
        ra, dec = patch.all_pix2world([[px, py]], 0)[0]
        centres.append((float(ra), float(dec)))
    # Patch extent (patch pixels) with a margin so objects just outside a tile still spill in.
    margin = max(STAMP_BUCKETS) // 2
    return _Layout(
        n_pix=n_pix,
        scale=scale,
        tile_ids=_tile_names(centres),
        wcss=[_tile_wcs(ra, dec, n_pix, scale) for ra, dec in centres],
        patch=patch,
        half_w=((ncols - 1) * step + n_pix) / 2 + margin,
        half_h=((nrows - 1) * step + n_pix) / 2 + margin,
    )


def _tiles_pix2world(
    wcss: Sequence[WCS], tile: np.ndarray, x: np.ndarray, y: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Sky positions of pixel positions ``(x, y)`` in their tiles ``tile`` (indices)."""
    ra, dec = np.zeros(len(x)), np.zeros(len(x))
    for k, wcs in enumerate(wcss):
        sel = tile == k
        if sel.any():
            ra[sel], dec[sel] = wcs.all_pix2world(x[sel], y[sel], 0)
    return ra, dec


def _place_lenses(
    rng: np.random.Generator,
    layout: _Layout,
    per_tile: int,
    fixed_deg: Sequence[tuple[float, float]] = (),
) -> _Lenses:
    """Lens positions: per owner tile, away from its edges and from each other.

    Positions in ``fixed_deg`` take the first slots of the first tile whose interior holds them.
    """
    n_tiles, n_pix = len(layout.wcss), layout.n_pix
    n_lens = per_tile * n_tiles
    lens_tile = np.repeat(np.arange(n_tiles), per_tile)
    lens_x = np.zeros(n_lens)
    lens_y = np.zeros(n_lens)
    fixed = _fixed_lens_pixels(layout, fixed_deg, per_tile)
    for k in range(n_tiles):
        placed: list[tuple[float, float]] = list(fixed.get(k, []))
        for j, (x, y) in enumerate(placed):
            lens_x[k * per_tile + j], lens_y[k * per_tile + j] = x, y
        for j in range(len(placed), per_tile):
            for _ in range(1000):
                cand = rng.uniform(_LENS_BORDER_PIX, n_pix - 1 - _LENS_BORDER_PIX, 2)
                if all(
                    math.hypot(cand[0] - a, cand[1] - b) >= _LENS_MIN_SEPARATION_PIX
                    for a, b in placed
                ):
                    break
            placed.append((float(cand[0]), float(cand[1])))
            lens_x[k * per_tile + j], lens_y[k * per_tile + j] = cand
    ra, dec = _tiles_pix2world(layout.wcss, lens_tile, lens_x, lens_y)
    return _Lenses(tile=lens_tile, x=lens_x, y=lens_y, ra=ra, dec=dec)


def _fixed_lens_pixels(
    layout: _Layout, positions: Sequence[tuple[float, float]], per_tile: int
) -> dict[int, list[tuple[float, float]]]:
    """Pixel positions of given sky positions in the first tile whose interior holds each."""
    fixed: dict[int, list[tuple[float, float]]] = {}
    lo, hi = _LENS_BORDER_PIX, layout.n_pix - 1 - _LENS_BORDER_PIX
    for ra, dec in positions:
        for k, wcs in enumerate(layout.wcss):
            x, y = (float(v) for v in wcs.all_world2pix([[ra, dec]], 0)[0])
            if lo <= x <= hi and lo <= y <= hi:
                if len(fixed.setdefault(k, [])) >= per_tile:
                    raise ValueError(
                        f"lens_positions_deg: more than lenses_per_tile={per_tile} in one tile"
                    )
                fixed[k].append((x, y))
                break
        else:
            raise ValueError(
                f"lens_positions_deg: ({ra}, {dec}) is not inside any tile's interior "
                f"(farther than {_LENS_BORDER_PIX} px from the edges)"
            )
    return fixed


def _place_confusers_and_sample(
    rng: np.random.Generator,
    layout: _Layout,
    lenses: _Lenses,
    per_arcmin2: float,
    population: ConfuserPopulation | None,
) -> _Confusers:
    """Confuser positions (apart from the lenses) and parameters."""
    where = _place_confusers(
        rng, layout.wcss, layout.n_pix, lenses.x, lenses.y, lenses.tile,
        per_arcmin2 * layout.tile_area_arcmin2,
    )  # fmt: skip
    n_conf = len(where["tile"])
    params: dict[str, torch.Tensor] = {}
    if n_conf:
        cgen = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
        params = _sample_confusers(population, n_conf, generator=cgen)
    return _Confusers(where=where, params=params)


def _field_objects(
    rng: np.random.Generator,
    layout: _Layout,
    use: Sequence[str],
    galaxies_per_arcmin2: float,
    stars_per_arcmin2: float,
    avoid_ra: np.ndarray,
    avoid_dec: np.ndarray,
    neighbours: tuple[np.random.Generator, float] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Field galaxies and stars, uniform on the patch, none within 4" of ``avoid_ra/dec``.

    ``neighbours`` (generator, fraction) gives that fraction of red galaxies a neighbour.
    """
    n_gal = int(rng.poisson(galaxies_per_arcmin2 * layout.area_arcmin2))
    n_star = int(rng.poisson(stars_per_arcmin2 * layout.area_arcmin2))
    gal = sample_field_galaxies(rng, n_gal, use)
    star = sample_stars(rng, n_star, use)
    for obj, n in ((gal, n_gal), (star, n_star)):
        px = rng.uniform(-layout.half_w, layout.half_w, n)
        py = rng.uniform(-layout.half_h, layout.half_h, n)
        if obj is gal:
            rng_nb, fraction = neighbours if neighbours is not None else (rng, 0.0)
            px, py = _add_field_neighbours(rng_nb, gal, px, py, fraction, layout.scale, use)
        obj["ra"], obj["dec"] = layout.patch.all_pix2world(px, py, 0)
    # Keep field objects off the injected lenses, so the truth stays recoverable.
    if len(avoid_ra):
        import astropy.units as u
        from astropy.coordinates import SkyCoord

        lens_c = SkyCoord(avoid_ra * u.deg, avoid_dec * u.deg)
        for obj in (gal, star):
            if len(obj["ra"]) == 0:
                continue
            _, sep, _ = SkyCoord(obj["ra"] * u.deg, obj["dec"] * u.deg).match_to_catalog_sky(lens_c)
            keep = sep.arcsec > _FIELD_EXCLUSION_ARCSEC
            for key in list(obj):
                obj[key] = np.asarray(obj[key])[keep]
    return gal, star


def _add_field_neighbours(
    rng: np.random.Generator,
    gal: dict[str, np.ndarray],
    px: np.ndarray,
    py: np.ndarray,
    fraction: float,
    scale: float,
    use: Sequence[str],
) -> tuple[np.ndarray, np.ndarray]:
    """Give ``fraction`` of the red galaxies a neighbour 1-3" away (rows appended to ``gal``).

    The neighbour is 0.5-3 mag fainter than its host, red or blue like any field galaxy.
    Columns ``row`` (index before any filtering) and ``host_row`` (the host's ``row`` for a
    neighbour, else -1) let the neighbour truth name both by id later. Returns the positions
    (patch pixels) of all rows.
    """
    n = len(px)
    gal["row"] = np.arange(n)
    gal["host_row"] = np.full(n, -1)
    hosts = np.zeros(0, np.int64)
    if fraction > 0:
        hosts = np.flatnonzero(gal["red"] & (rng.random(n) < fraction))
    m = len(hosts)
    if m == 0:
        return px, py
    nb = sample_field_galaxies(rng, m, use)
    shift = gal["mag_true_i"][hosts] + rng.uniform(0.5, 3.0, m) - nb["mag_true_i"]
    for key in [k for k in nb if k.startswith("mag_true_")]:
        nb[key] = nb[key] + shift
    dist = rng.uniform(*NEIGHBOUR_DISTANCE_ARCSEC, m) / scale
    ang = rng.uniform(0.0, 2 * math.pi, m)
    nb["row"] = n + np.arange(m)
    nb["host_row"] = hosts
    for key in gal:
        gal[key] = np.concatenate([gal[key], nb[key]])
    return np.r_[px, px[hosts] + dist * np.cos(ang)], np.r_[py, py[hosts] + dist * np.sin(ang)]


def _neighbour_truth(plan: _SurveyPlan) -> dict[str, np.ndarray]:
    """One row per catalogued neighbour of a red field galaxy: its id, its host's, distance."""
    gal = plan.galaxies
    if "host_row" not in gal:
        return {"id": np.zeros(0, np.int64), "host_id": np.zeros(0, np.int64)}
    nb = np.flatnonzero(gal["host_row"] >= 0)
    id_of_row = dict(zip(gal["row"].tolist(), gal["id"].tolist(), strict=True))
    host_id = np.array([id_of_row.get(int(r), -1) for r in gal["host_row"][nb]], np.int64)
    index_of_id = {int(i): k for k, i in enumerate(gal["id"].tolist())}
    host = np.array([index_of_id.get(int(h), -1) for h in host_id], dtype=np.int64)
    sep = np.full(len(nb), np.nan)
    ok = host >= 0
    if ok.any():
        import astropy.units as u
        from astropy.coordinates import SkyCoord

        a = SkyCoord(gal["ra"][nb[ok]] * u.deg, gal["dec"][nb[ok]] * u.deg)
        b = SkyCoord(gal["ra"][host[ok]] * u.deg, gal["dec"][host[ok]] * u.deg)
        sep[ok] = a.separation(b).arcsec
    return {
        "id": gal["id"][nb].astype(np.int64),
        "host_id": host_id,
        "distance_arcsec": sep,
        "mag_i": gal["mag_true_i"][nb].astype(np.float64),
        "host_mag_i": np.where(ok, gal["mag_true_i"][np.maximum(host, 0)], np.nan),
        "detected": gal["detected"][nb],
    }


def _assign_ids(
    lenses: _Lenses,
    confusers: _Confusers,
    gal: dict[str, np.ndarray],
    star: dict[str, np.ndarray],
) -> None:
    """Global catalogue ids, stable across tiles: lenses, companions, galaxies, stars, ..."""
    n_lens, n_conf = lenses.n, confusers.n
    counts = (n_lens, n_lens, len(gal["ra"]), len(star["ra"]), n_conf, n_conf)
    starts = 1_000_001 + np.cumsum((0, *counts[:-1]))
    ids = [np.arange(s, s + c, dtype=np.int64) for s, c in zip(starts, counts, strict=True)]
    lenses.ids, lenses.comp_ids, gal["id"], star["id"] = ids[:4]
    confusers.where["id"], confusers.where["companion_id"] = ids[4:]


def _measure_field(
    rng: np.random.Generator,
    gal: dict[str, np.ndarray],
    star: dict[str, np.ndarray],
    p: SurveyPreset,
    use: Sequence[str],
) -> None:
    """Catalogue photometry, detection, class and flags of field objects (one per object)."""
    n_gal, n_star = len(gal["ra"]), len(star["ra"])
    fwhm = np.array([p.seeing_for(b) for b in use])
    gal_radius = np.maximum(0.975, 1.5 * np.sqrt(gal["r_eff_arcsec"] ** 2 + (fwhm.max() / 2) ** 2))
    star_radius = np.full(n_star, 0.975)
    det_snr_gal = np.zeros(n_gal)
    det_snr_star = np.zeros(n_star)
    for b in use:
        flux = 10 ** (-0.4 * (gal[f"mag_true_{b}"] - p.zero_point))
        gal[f"mag_{b}"], gal[f"magerr_{b}"], snr = measure_photometry(rng, flux, gal_radius, p, b)
        det_snr_gal = np.hypot(det_snr_gal, snr)
        flux = 10 ** (-0.4 * (star[f"mag_true_{b}"] - p.zero_point))
        star[f"mag_{b}"], star[f"magerr_{b}"], snr = measure_photometry(
            rng, flux, star_radius, p, b
        )
        det_snr_star = np.hypot(det_snr_star, snr)
    gal["detected"] = det_snr_gal >= _DETECTION_SNR
    star["detected"] = det_snr_star >= _DETECTION_SNR
    bright = gal["mag_true_i"] < 22.0
    gal["extended_class"] = np.where(
        bright, 3, rng.choice([1, 2, 3], n_gal, p=[0.05, 0.35, 0.6])
    ).astype(np.int16)
    star["extended_class"] = np.where(
        star["mag_true_i"] < 21.0, 0, rng.choice([0, 1, 2], n_star, p=[0.5, 0.3, 0.2])
    ).astype(np.int16)
    star["flags"] = np.where(star["mag_true_i"] < 17.0, FLAG_SATURATED, 0).astype(np.int32)
    gal["flags"] = np.zeros(n_gal, dtype=np.int32)


def _lens_catalogues(
    rng: np.random.Generator, lenses: _Lenses, layout: _Layout, p: SurveyPreset, use: Sequence[str]
) -> None:
    """Catalogue rows of the lenses and their companions, and the truth table (in place)."""
    # Make source and companion positions relative to the lens centre (re-centred per tile).
    params = {k: v.clone() for k, v in lenses.params.items()}
    lcx = params["lens_center_x_arcsec"].clone()
    lcy = params["lens_center_y_arcsec"].clone()
    for key in ("source_x_arcsec", "companion_x_arcsec"):
        params[key] -= lcx
    for key in ("source_y_arcsec", "companion_y_arcsec"):
        params[key] -= lcy
    lenses.params = params
    centred = _recentre(params, np.zeros(lenses.n), np.zeros(lenses.n), layout.scale)
    _, info = render_systems(centred, p, _LENS_STAMP_PIX, bands=use, noise=False, return_info=True)
    lenses.cat = _lens_catalogue(rng, lenses, centred, p, use)
    lenses.comp_cat = _companion_catalogue(rng, lenses, layout, p, use)
    lenses.truth = _lens_truth(lenses, info, layout.tile_ids, use)


def _lens_catalogue(
    rng: np.random.Generator,
    lenses: _Lenses,
    centred: Mapping[str, torch.Tensor],
    p: SurveyPreset,
    use: Sequence[str],
) -> dict[str, np.ndarray]:
    """Catalogue rows of the lens galaxies, as a deblending photometer measures them.

    The lens light plus the lensed-source light within ``_BLEND_RADIUS_ARCSEC`` of the lens
    centre; arcs further out are deblended into separate detections (not catalogued here).
    """
    arcs = render_systems(centred, p, _LENS_STAMP_PIX, bands=use, noise=False, with_lens=False)
    gx_, gy_ = pixel_grid(_LENS_STAMP_PIX, p.pixel_scale_arcsec)
    core = (gx_**2 + gy_**2) <= _BLEND_RADIUS_ARCSEC**2
    blended = (arcs * core).sum(dim=(-2, -1)).numpy().astype(np.float64)
    params = lenses.params
    lens_radius = np.maximum(0.975, 1.5 * params["lens_r_eff_arcsec"].numpy())
    cat = {"id": lenses.ids, "ra": lenses.ra, "dec": lenses.dec}
    for bi, b in enumerate(use):
        lens_flux = 10 ** (
            -0.4 * (params[f"lens_mag_{b}"].numpy().astype(np.float64) - p.zero_point)
        )
        cat[f"mag_{b}"], cat[f"magerr_{b}"], _ = measure_photometry(
            rng, lens_flux + blended[:, bi], lens_radius, p, b
        )
    cat["flags"] = np.zeros(lenses.n, dtype=np.int32)
    cat["extended_class"] = np.full(lenses.n, 3, dtype=np.int16)
    return cat


def _companion_catalogue(
    rng: np.random.Generator, lenses: _Lenses, layout: _Layout, p: SurveyPreset, use: Sequence[str]
) -> dict[str, np.ndarray]:
    """Catalogue rows of the lens companions: separate objects next to their lens."""
    params = lenses.params
    has_comp = params["companion_present"].numpy() > 0.5
    cxs = params["companion_x_arcsec"].numpy() / layout.scale
    cys = params["companion_y_arcsec"].numpy() / layout.scale
    comp_ra, comp_dec = _tiles_pix2world(layout.wcss, lenses.tile, lenses.x + cxs, lenses.y + cys)
    cat = {"id": lenses.comp_ids, "ra": comp_ra, "dec": comp_dec}
    comp_r = np.maximum(0.975, 1.5 * params["companion_r_eff_arcsec"].numpy())
    for b in use:
        flux = 10 ** (
            -0.4 * (params[f"companion_mag_{b}"].numpy().astype(np.float64) - p.zero_point)
        )
        cat[f"mag_{b}"], cat[f"magerr_{b}"], _ = measure_photometry(rng, flux, comp_r, p, b)
    cat["flags"] = np.zeros(lenses.n, dtype=np.int32)
    cat["extended_class"] = np.full(lenses.n, 3, dtype=np.int16)
    return {k: v[has_comp] for k, v in cat.items()}


def _lens_truth(
    lenses: _Lenses, info: RenderInfo, tile_ids: Sequence[str], use: Sequence[str]
) -> dict[str, np.ndarray]:
    """The truth table: one row per injected lens."""
    params = lenses.params

    def f64(key: str) -> np.ndarray:
        return params[key].numpy().astype(np.float64)

    has_comp = params["companion_present"].numpy() > 0.5
    truth = {
        "id": lenses.ids,
        "tile": np.asarray([tile_ids[k] for k in lenses.tile]),
        "ra": lenses.ra,
        "dec": lenses.dec,
        "x": lenses.x,
        "y": lenses.y,
        "theta_e_arcsec": f64("theta_e_arcsec"),
        "lens_q": f64("lens_q"),
        "shear": np.hypot(params["gamma1"].numpy(), params["gamma2"].numpy()).astype(np.float64),
        "lens_r_eff_arcsec": f64("lens_r_eff_arcsec"),
        "lens_n_sersic": f64("lens_n_sersic"),
        "source_r_eff_arcsec": f64("source_r_eff_arcsec"),
        "source_offset_arcsec": np.hypot(
            params["source_x_arcsec"].numpy(), params["source_y_arcsec"].numpy()
        ).astype(np.float64),
        "magnification": info.magnification.numpy().astype(np.float64),
        "source_snr": info.source_snr_total.numpy().astype(np.float64),
        "companion_id": np.where(has_comp, lenses.comp_ids, -1).astype(np.int64),
        # the variants recall is split by (benchmarks/recall_bundled.py)
        "has_neighbour": has_comp,
        "neighbour_distance_arcsec": np.where(
            has_comp, np.hypot(f64("companion_x_arcsec"), f64("companion_y_arcsec")), np.nan
        ),
        "source_clumpy": (
            params["source_clumpy"].numpy() > 0.5
            if "source_clumpy" in params
            else np.zeros(lenses.n, dtype=bool)
        ),
    }
    for bi, b in enumerate(use):
        truth[f"lens_mag_{b}"] = f64(f"lens_mag_{b}")
        truth[f"source_mag_{b}"] = f64(f"source_mag_{b}")
        truth[f"lensed_source_mag_{b}"] = info.lensed_source_mag[:, bi].numpy().astype(np.float64)
        truth[f"source_snr_{b}"] = info.source_snr[:, bi].numpy().astype(np.float64)
        truth[f"mag_{b}"] = lenses.cat[f"mag_{b}"].astype(np.float64)
    if all(b in use for b in ("g", "r", "i")):
        truth["passes_colour_cut"] = passes_jacobs_box({b: lenses.cat[f"mag_{b}"] for b in "gri"})
    else:
        truth["passes_colour_cut"] = np.zeros(lenses.n, dtype=bool)
    truth["n_tiles"] = np.zeros(lenses.n, dtype=np.int64)
    return truth


# ---- the rendering step: one tile's pixels and catalogue ----


def _write_tiles(
    store: Any,
    plan: _SurveyPlan,
    *,
    seed: int,
    chunk_pix: int,
    shard_pix: int | None,
    progress: bool = False,
) -> tuple[dict[str, int], list[dict[str, np.ndarray]]]:
    """The writing step: render each tile and write it; return catalogue sizes, artefact rows."""
    from tqdm.auto import tqdm

    n_sources: dict[str, int] = {}
    art_rows: list[dict[str, np.ndarray]] = []
    tiles = zip(plan.layout.tile_ids, plan.layout.wcss, strict=True)
    bar = tqdm(tiles, total=len(plan.layout.tile_ids), desc="survey", unit="tile",
               disable=not progress)  # fmt: skip
    for k, (tile_id, wcs) in enumerate(bar):
        factor, per_band, tile_plan = _tile_seeing(plan, seed, k)
        _record_seeing(plan, k, factor, per_band)
        image, weight, mask, catalog = _render_tile(tile_plan, k, art_rows)
        _record_mer(plan, k, catalog)
        store.write_tile(
            tile_id,
            image=image,
            wcs_header=wcs.to_header(),
            catalog=catalog,
            pixel_scale_arcsec=plan.layout.scale,
            zero_point=plan.preset.zero_point,
            weight=weight,
            mask=mask,
            chunk_pix=chunk_pix,
            shard_pix=shard_pix,
            extra_attrs={
                "synthetic": {
                    "seed": int(seed), "preset": plan.preset.name, "index": k,
                    "seeing_factor": factor, "seeing_factor_per_band": per_band,
                }
            },
        )  # fmt: skip
        n_sources[tile_id] = len(catalog["id"])
    return n_sources, art_rows


def _tile_seeing(
    plan: _SurveyPlan, seed: int, k: int
) -> tuple[float, dict[str, float], _SurveyPlan]:
    """Tile ``k``'s seeing factor, per-band factors and a plan rendering at them.

    With ``plan.seeing_factor_range`` the factor is uniform in it and each band's is scattered
    about it by ``plan.seeing_band_scatter``; without, the preset's ``seeing_spread``. The
    draws come from their own generator seeded by ``(seed, k)``, so the survey's other draws
    are those of a survey at fixed seeing.
    """
    rng = np.random.default_rng([int(seed), k, 0x5EE])
    if plan.seeing_factor_range is None:
        spread = plan.preset.seeing_spread
        if spread == 0:
            return 1.0, dict.fromkeys(plan.bands, 1.0), plan
        factor = round(math.exp(spread * float(np.clip(rng.standard_normal(), -2, 2))), 4)
        per_band = dict.fromkeys(plan.bands, factor)
    else:
        factor = round(float(rng.uniform(*plan.seeing_factor_range)), 4)
        scatter = np.clip(rng.standard_normal(len(plan.bands)), -2, 2)
        per_band = {
            b: round(factor * math.exp(plan.seeing_band_scatter * float(t)), 4)
            for b, t in zip(plan.bands, scatter, strict=True)
        }
    tile_preset = plan.preset.with_seeing_factor(per_band)
    return (
        factor,
        per_band,
        dataclasses.replace(plan, preset=tile_preset, kernels=psf_kernel(tile_preset, plan.bands)),
    )


def _record_seeing(plan: _SurveyPlan, k: int, factor: float, per_band: Mapping[str, float]) -> None:
    """Write tile ``k``'s seeing into the truth rows of the lenses and confusers it owns."""
    for truth, owner in (
        (plan.lenses.truth, plan.lenses.tile),
        (plan.confusers.truth, plan.confusers.where["tile"]),
    ):
        n = len(truth["id"])
        if "seeing_factor" not in truth:
            truth["seeing_factor"] = np.full(n, np.nan)
            for b in plan.bands:
                truth[f"seeing_fwhm_{b}"] = np.full(n, np.nan)
        mine = np.asarray(owner)[:n] == k
        truth["seeing_factor"][mine] = factor
        for b in plan.bands:
            truth[f"seeing_fwhm_{b}"][mine] = plan.preset.seeing_for(b) * per_band[b]


def _render_tile(
    plan: _SurveyPlan, k: int, art_rows: list[dict[str, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Noisy image, weight, mask and catalogue of tile ``k``; its artefact rows are appended."""
    p, use, layout = plan.preset, plan.bands, plan.layout
    n_pix, wcs, tile_id = layout.n_pix, layout.wcss[k], layout.tile_ids[k]
    image = np.zeros((len(use), n_pix, n_pix), dtype=np.float32)
    gx, gy = _paste_field_galaxies(image, wcs, plan)
    sx, sy, near_s = _paste_stars(image, wcs, plan)
    cat_parts: list[dict[str, np.ndarray]] = []
    if plan.lenses.n:
        cat_parts += _paste_lenses(image, wcs, plan)
    if plan.confusers.n:
        cat_parts += _paste_tile_confusers(image, wcs, plan)
    inv_var = np.array([1.0 / p.pixel_noise_sigma(b) ** 2 for b in use], dtype=np.float32)
    weight = np.broadcast_to(inv_var[:, None, None], image.shape).copy()
    mask = np.zeros(image.shape, dtype=np.int32)
    if plan.artefacts:
        art_rows += _add_bright_stars(image, weight, mask, plan, sx, sy, near_s, tile_id)
    # Noise (Poisson of objects + sky, sky subtracted).
    noisy = add_noise(
        torch.from_numpy(image)[None],
        sky_counts=[p.sky_counts(b) for b in use],
        gain_e_per_count=[p.gain(b) for b in use],
        read_noise_counts=p.read_noise_counts,
        sky_subtracted=True,
        generator=plan.rngs.noise,
    )[0].numpy()
    if plan.artefacts:
        sigma = [p.pixel_noise_sigma(b) for b in use]
        rng_art, area = plan.rngs.artefacts, layout.tile_area_arcmin2
        art_rows.append(_tile_artefacts_after_noise(rng_art, noisy, weight, sigma, area, tile_id))
    rng_layout = plan.rngs.layout
    if rng_layout.random() < plan.bad_column_probability:
        col = _bad_column(rng_layout, n_pix, plan.lenses.x[plan.lenses.tile == k])
        y0 = int(rng_layout.integers(0, n_pix // 2))
        y1 = min(n_pix, y0 + int(rng_layout.integers(n_pix // 8, n_pix // 2)))
        row = add_bad_column(noisy, weight, mask, col, y0, y1)
        art_rows.append(row | {"tile": np.array([tile_id])})
    gal, star = plan.galaxies, plan.stars
    cat_parts.append(_subset(gal, _inside(gx, gy, n_pix) & gal["detected"], gx, gy))
    cat_parts.append(_subset(star, _inside(sx, sy, n_pix) & star["detected"], sx, sy))
    catalog = _tile_catalogue(cat_parts, n_pix)
    if "vis" in use:
        catalog |= _mer_columns(plan, noisy[use.index("vis")], weight[use.index("vis")], catalog)
    return noisy, weight, mask, catalog


def _mer_columns(
    plan: _SurveyPlan, vis: np.ndarray, weight: np.ndarray, catalog: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Euclid MER detection columns measured on the noisy VIS image, and ``gaia_match``.

    Stars brighter than ``_GAIA_MAG_VIS`` get a Gaia match (Gaia reaches G ~ 20.7).
    """
    p = plan.preset
    with np.errstate(divide="ignore"):
        sigma = np.where(weight > 0, 1.0 / np.sqrt(weight), 0.0)
    cols = mer_detection_columns(
        vis, sigma, catalog["x"], catalog["y"], catalog["mag_vis"],
        psf_fwhm_pix=p.seeing_for("vis") / p.pixel_scale_arcsec,
        pixel_scale_arcsec=p.pixel_scale_arcsec, zero_point=p.zero_point,
    )  # fmt: skip
    star = plan.stars
    gaia = star["id"][star["mag_true_vis"] < _GAIA_MAG_VIS]
    cols["gaia_match"] = np.isin(catalog["id"], gaia).astype(np.int8)
    return cols


def _record_mer(plan: _SurveyPlan, k: int, catalog: Mapping[str, np.ndarray]) -> None:
    """Copy the MER columns of the lenses tile ``k`` owns into their truth rows."""
    truth = plan.lenses.truth
    if "vis_det" not in catalog or not len(truth["id"]):
        return
    row = {int(i): j for j, i in enumerate(catalog["id"].tolist())}
    for c in (*_MER_COLUMNS, "gaia_match"):
        if c not in truth:
            truth[c] = np.zeros(len(truth["id"]), catalog[c].dtype)
            if catalog[c].dtype.kind == "f":
                truth[c][:] = np.nan
    mine = np.flatnonzero(np.asarray(plan.lenses.tile)[: len(truth["id"])] == k)
    for j in mine:
        r = row.get(int(truth["id"][j]))
        if r is not None:
            for c in (*_MER_COLUMNS, "gaia_match"):
                truth[c][j] = catalog[c][r]


def _near(x: np.ndarray, y: np.ndarray, n_pix: int, halo: int) -> np.ndarray:
    """True where a stamp of half side ``halo`` centred at ``(x, y)`` may touch the tile."""
    return (x > -halo) & (x < n_pix - 1 + halo) & (y > -halo) & (y < n_pix - 1 + halo)


def _paste_field_galaxies(
    image: np.ndarray, wcs: WCS, plan: _SurveyPlan
) -> tuple[np.ndarray, np.ndarray]:
    """Add the field galaxies near the tile, in stamp-size buckets; return their positions."""
    gal, p, scale = plan.galaxies, plan.preset, plan.layout.scale
    gx, gy = wcs.all_world2pix(gal["ra"], gal["dec"], 0)
    near = _near(gx, gy, plan.layout.n_pix, max(STAMP_BUCKETS) // 2)
    fwhm = np.array([p.seeing_for(b) for b in plan.bands])
    need = np.ceil(
        (np.where(gal["red"], 8.0, 4.5) * gal["r_eff_arcsec"] + 2.0 * fwhm.max()) / scale
    )
    sizes = stamp_bucket(2 * need + 1)

    def render(
        params: dict[str, np.ndarray], dx: np.ndarray, dy: np.ndarray, size: int
    ) -> np.ndarray:
        return render_galaxies(params, dx, dy, p, plan.bands, plan.kernels, size)

    _add_by_stamp_size(image, gal, gx, gy, near, sizes, render)
    return gx, gy


def _paste_stars(
    image: np.ndarray, wcs: WCS, plan: _SurveyPlan
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Add the stars near the tile; return their positions and which are near."""
    star = plan.stars
    sx, sy = wcs.all_world2pix(star["ra"], star["dec"], 0)
    near_s = _near(sx, sy, plan.layout.n_pix, max(STAMP_BUCKETS) // 2)
    star_size = np.where(star["mag_true_i"] < 18.0, 65, 31)

    def render(
        params: dict[str, np.ndarray], dx: np.ndarray, dy: np.ndarray, size: int
    ) -> np.ndarray:
        return render_stars(params, dx, dy, plan.preset, plan.bands, size)

    _add_by_stamp_size(image, star, sx, sy, near_s, star_size, render)
    return sx, sy, near_s


def _add_by_stamp_size(
    image: np.ndarray,
    objects: Mapping[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    near: np.ndarray,
    sizes: np.ndarray,
    render: Callable[[dict[str, np.ndarray], np.ndarray, np.ndarray, int], np.ndarray],
) -> None:
    """Render the ``near`` objects one stamp size at a time and add their light to ``image``.

    Each stamp is centred on the pixel nearest the object; ``render`` gets the objects'
    parameters, their sub-pixel offsets from that pixel and the stamp size.
    """
    for s in np.unique(sizes[near]):
        sel = np.flatnonzero(near & (sizes == s))
        ix, iy = np.round(x[sel]), np.round(y[sel])
        stamps = render({k: v[sel] for k, v in objects.items()}, x[sel] - ix, y[sel] - iy, int(s))
        add_light_to_tile(image, stamps, ix.astype(int), iy.astype(int))


def _paste_lenses(image: np.ndarray, wcs: WCS, plan: _SurveyPlan) -> list[dict[str, np.ndarray]]:
    """Add the lenses owned here or spilling in through the overlap; their catalogue rows."""
    lenses, n_pix = plan.lenses, plan.layout.n_pix
    lx, ly = wcs.all_world2pix(lenses.ra, lenses.dec, 0)
    sel = np.flatnonzero(_near(lx, ly, n_pix, _LENS_STAMP_PIX // 2))
    if len(sel):
        ix, iy = np.round(lx[sel]), np.round(ly[sel])
        sub = {kk: v[torch.as_tensor(sel)] for kk, v in lenses.params.items()}
        stamps = render_systems(
            _recentre(sub, lx[sel] - ix, ly[sel] - iy, plan.layout.scale),
            plan.preset,
            _LENS_STAMP_PIX,
            bands=plan.bands,
            noise=False,
        ).numpy()
        add_light_to_tile(image, stamps, ix.astype(int), iy.astype(int))
    inside_l = _inside(lx, ly, n_pix)
    lenses.truth["n_tiles"] += inside_l
    cx, cy = wcs.all_world2pix(lenses.comp_cat["ra"], lenses.comp_cat["dec"], 0)
    return [
        _subset(lenses.cat, inside_l, lx, ly),
        _subset(lenses.comp_cat, _inside(cx, cy, n_pix), cx, cy),
    ]


def _paste_tile_confusers(
    image: np.ndarray, wcs: WCS, plan: _SurveyPlan
) -> list[dict[str, np.ndarray]]:
    """Add the confusers owned here or spilling in through the overlap; their catalogue rows."""
    conf, n_pix = plan.confusers, plan.layout.n_pix
    _paste_confusers(image, wcs, conf.where, conf.params, plan.preset, plan.bands, n_pix)
    cx_, cy_ = wcs.all_world2pix(conf.where["ra"], conf.where["dec"], 0)
    conf.truth["n_tiles"] += _inside(cx_, cy_, n_pix)
    mx_, my_ = wcs.all_world2pix(conf.comp_cat["ra"], conf.comp_cat["dec"], 0)
    return [
        _subset(conf.cat, _inside(cx_, cy_, n_pix), cx_, cy_),
        _subset(conf.comp_cat, _inside(mx_, my_, n_pix), mx_, my_),
    ]


def _add_bright_stars(
    image: np.ndarray,
    weight: np.ndarray,
    mask: np.ndarray,
    plan: _SurveyPlan,
    sx: np.ndarray,
    sy: np.ndarray,
    near_s: np.ndarray,
    tile_id: str,
) -> list[dict[str, np.ndarray]]:
    """Spikes and halos of the bright stars, then saturated cores; their truth rows."""
    star, p = plan.stars, plan.preset
    rows = []
    for j in np.flatnonzero(near_s & (star["mag_true_i"] < _BRIGHT_STAR_MAG_I)):
        flux = [10 ** (-0.4 * (star[f"mag_true_{b}"][j] - p.zero_point)) for b in plan.bands]
        add_bright_star_features(image, float(sx[j]), float(sy[j]), flux)
        rows.append(
            {"kind": np.array(["bright_star"]), "band": np.array([-1], np.int16),
             "x": np.array([sx[j]]), "y": np.array([sy[j]]),
             "mag_i": np.array([star["mag_true_i"][j]]), "tile": np.array([tile_id])}
        )  # fmt: skip
    saturate(image, weight, mask, _SATURATION_COUNTS)
    return rows


def _tile_catalogue(parts: Sequence[dict[str, np.ndarray]], n_pix: int) -> dict[str, np.ndarray]:
    """One tile's catalogue: the parts joined, edge objects flagged truncated, sorted by id."""
    catalog = {c: np.concatenate([part[c] for part in parts]) for c in parts[-1]}
    edge = (
        (catalog["x"] < 3)
        | (catalog["y"] < 3)
        | (catalog["x"] > n_pix - 4)
        | (catalog["y"] > n_pix - 4)
    )
    catalog["flags"] = catalog["flags"] | np.where(edge, FLAG_TRUNCATED, 0).astype(np.int32)
    order = np.argsort(catalog["id"], kind="stable")
    return {c: v[order] for c, v in catalog.items()}


_CATALOG_KEYS = ("id", "ra", "dec", "flags", "extended_class")


def _subset(
    obj: Mapping[str, np.ndarray], keep: np.ndarray, x: np.ndarray, y: np.ndarray
) -> dict[str, np.ndarray]:
    cols = [c for c in obj if c in _CATALOG_KEYS or c.startswith(("mag_", "magerr_"))]
    cols = [c for c in cols if not c.startswith("mag_true")]
    out = {c: np.asarray(obj[c])[keep] for c in cols}
    out["x"] = np.asarray(x, dtype=np.float64)[keep]
    out["y"] = np.asarray(y, dtype=np.float64)[keep]
    return {c: out[c] for c in sorted(out)}


def _inside(x: np.ndarray, y: np.ndarray, n_pix: int) -> np.ndarray:
    return (x >= -0.5) & (x < n_pix - 0.5) & (y >= -0.5) & (y < n_pix - 0.5)


def _recentre(
    params: Mapping[str, torch.Tensor], dx: np.ndarray, dy: np.ndarray, scale: float
) -> dict[str, torch.Tensor]:
    """Put each lens centre at sub-pixel offset (dx, dy) from the stamp centre.

    ``params`` holds source and companion positions relative to the lens centre.
    """
    out = dict(params)
    ox = torch.as_tensor(dx * scale, dtype=params["theta_e_arcsec"].dtype)
    oy = torch.as_tensor(dy * scale, dtype=params["theta_e_arcsec"].dtype)
    out["lens_center_x_arcsec"] = ox
    out["lens_center_y_arcsec"] = oy
    for key in ("source_x_arcsec", "companion_x_arcsec"):
        out[key] = params[key] + ox
    for key in ("source_y_arcsec", "companion_y_arcsec"):
        out[key] = params[key] + oy
    return out


def _bad_column(rng: np.random.Generator, n_pix: int, lens_cols: np.ndarray) -> int:
    """A column at least 40 px from every lens of the tile (so truth stamps stay clean)."""
    for _ in range(100):
        col = int(rng.integers(0, n_pix))
        if lens_cols.size == 0 or np.min(np.abs(lens_cols - col)) >= 40:
            return col
    return int(rng.integers(0, n_pix))


def _write_truth(
    url: str,
    truth: Mapping[str, np.ndarray],
    storage_options: Mapping[str, Any] | None,
    *,
    name: str = "truth.parquet",
) -> str:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({k: np.asarray(v) for k, v in truth.items()})
    fs, root = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    path = posixpath.join(root, name)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    with fs.open(path, "wb") as f:
        f.write(buf.getvalue())
    return fs.unstrip_protocol(path)


def read_truth(
    url: str, *, storage_options: Mapping[str, Any] | None = None
) -> dict[str, np.ndarray]:
    """Read the truth table written by :func:`make_survey` beside the store at ``url``."""
    import pyarrow.parquet as pq

    fs, root = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    path = posixpath.join(root, "truth.parquet")
    if not fs.exists(path):
        raise FileNotFoundError(f"no truth table at {url}/truth.parquet (not a make_survey store?)")
    with fs.open(path, "rb") as f:
        table = pq.read_table(f)
    return {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}


def injected_ids(truth: Mapping[str, np.ndarray]) -> np.ndarray:
    """Catalogue ids of everything injected with a lens: the lens galaxies and their companions.

    Ids are global in a synthetic survey (an object in a tile overlap has the same id in both
    tiles), so excluding these ids in every tile removes all catalogue entries whose stamp is
    centred on an injected lens system, e.g. when drawing "real field galaxy" negatives.
    """
    ids = np.asarray(truth["id"], dtype=np.int64)
    comp = np.asarray(truth.get("companion_id", np.zeros(0)), dtype=np.int64)
    return np.unique(np.concatenate([ids, comp[comp >= 0]]))


# --------------------------------------------------------------------------------------------
# Confusers and artefacts
# --------------------------------------------------------------------------------------------


def _place_confusers(
    rng: np.random.Generator,
    wcss: Sequence[WCS],
    n_pix: int,
    lens_x: np.ndarray,
    lens_y: np.ndarray,
    lens_tile: np.ndarray,
    mean_per_tile: float,
) -> dict[str, np.ndarray]:
    """Confuser positions: inside their owner tile, apart from lenses and from each other."""
    tiles, xs, ys = [], [], []
    for k in range(len(wcss)):
        taken = [(a, b) for a, b, t in zip(lens_x, lens_y, lens_tile, strict=True) if t == k]
        for _ in range(int(rng.poisson(mean_per_tile))):
            for _ in range(200):
                cand = rng.uniform(_LENS_BORDER_PIX, n_pix - 1 - _LENS_BORDER_PIX, 2)
                if all(
                    math.hypot(cand[0] - a, cand[1] - b) >= _LENS_MIN_SEPARATION_PIX
                    for a, b in taken
                ):
                    taken.append((float(cand[0]), float(cand[1])))
                    tiles.append(k)
                    xs.append(float(cand[0]))
                    ys.append(float(cand[1]))
                    break
    out = {
        "tile": np.asarray(tiles, dtype=np.int64),
        "x": np.asarray(xs, dtype=np.float64),
        "y": np.asarray(ys, dtype=np.float64),
    }
    out["ra"], out["dec"] = _tiles_pix2world(wcss, out["tile"], out["x"], out["y"])
    return out


def _confuser_catalogues(
    conf: Mapping[str, np.ndarray],
    params: Mapping[str, torch.Tensor],
    p: SurveyPreset,
    use: Sequence[str],
    rng: np.random.Generator,
    tile_ids: Sequence[str],
    wcss: Sequence[WCS],
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Catalogue rows of the confuser hosts and merger companions, and the confuser truth."""
    n = len(conf["tile"])
    truth: dict[str, np.ndarray] = {
        "id": np.asarray(conf["id"], np.int64),
        "kind": np.asarray([CONFUSER_KINDS[int(i)] for i in params["kind"]] if n else [], "U16"),
        "tile": np.asarray([tile_ids[k] for k in conf["tile"]], dtype="U32"),
        "ra": conf["ra"],
        "dec": conf["dec"],
        "companion_id": np.full(n, -1, np.int64),
        "n_tiles": np.zeros(n, np.int64),
    }
    empty = {"id": np.zeros(0, np.int64), "ra": np.zeros(0), "dec": np.zeros(0)}
    if not n:
        for b in use:
            empty[f"mag_{b}"] = np.zeros(0, np.float32)
            empty[f"magerr_{b}"] = np.zeros(0, np.float32)
        empty["flags"] = np.zeros(0, np.int32)
        empty["extended_class"] = np.zeros(0, np.int16)
        truth["passes_colour_cut"] = np.zeros(0, bool)
        return empty, dict(empty), truth
    zero = {"center_x_arcsec": torch.zeros(n), "center_y_arcsec": torch.zeros(n)}
    _, fluxes = render_confusers(
        {**params, **zero}, p, _LENS_STAMP_PIX, bands=use, noise=False, supersample=1
    )
    host_flux = fluxes["host_flux"].numpy().astype(np.float64)
    comp_flux = fluxes["companion_flux"].numpy().astype(np.float64)
    radius = np.maximum(0.975, 1.5 * params["host_r_eff_arcsec"].numpy())
    cat = {"id": truth["id"], "ra": conf["ra"], "dec": conf["dec"]}
    merger = comp_flux[:, 0] > 0
    scale = p.pixel_scale_arcsec
    comp: dict[str, np.ndarray] = {"id": np.asarray(conf["companion_id"], np.int64)}
    cx = conf["x"] + params["companion_x_arcsec"].numpy() / scale
    cy = conf["y"] + params["companion_y_arcsec"].numpy() / scale
    comp["ra"], comp["dec"] = _tiles_pix2world(wcss, conf["tile"], cx, cy)
    comp_r = np.maximum(0.975, 1.5 * params["companion_r_eff_arcsec"].numpy())
    for bi, b in enumerate(use):
        cat[f"mag_{b}"], cat[f"magerr_{b}"], _ = measure_photometry(
            rng, host_flux[:, bi], radius, p, b
        )
        comp[f"mag_{b}"], comp[f"magerr_{b}"], _ = measure_photometry(
            rng, np.maximum(comp_flux[:, bi], 1e-3), comp_r, p, b
        )
        truth[f"mag_{b}"] = cat[f"mag_{b}"].astype(np.float64)
        truth[f"host_mag_{b}"] = params[f"host_mag_{b}"].numpy().astype(np.float64)
        truth[f"feature_mag_{b}"] = params[f"feature_mag_{b}"].numpy().astype(np.float64)
    for c in (cat, comp):
        c["flags"] = np.zeros(n, np.int32)
        c["extended_class"] = np.full(n, 3, np.int16)
    comp = {k: v[merger] for k, v in comp.items()}
    truth["companion_id"] = np.where(merger, conf["companion_id"], -1).astype(np.int64)
    truth["x"], truth["y"] = conf["x"], conf["y"]
    for key in ("host_r_eff_arcsec", "host_q", "ring_radius_arcsec", "n_knots"):
        truth[key] = params[key].numpy().astype(np.float64)
    if all(b in use for b in ("g", "r", "i")):
        truth["passes_colour_cut"] = passes_jacobs_box({b: cat[f"mag_{b}"] for b in "gri"})
    else:
        truth["passes_colour_cut"] = np.zeros(n, dtype=bool)
    return cat, comp, truth


def _paste_confusers(
    image: np.ndarray,
    wcs: WCS,
    conf: Mapping[str, np.ndarray],
    params: Mapping[str, torch.Tensor],
    p: SurveyPreset,
    use: Sequence[str],
    n_pix: int,
) -> None:
    """Render the confusers near this tile at their sub-pixel offsets and add them in."""
    x, y = wcs.all_world2pix(conf["ra"], conf["dec"], 0)
    half = _LENS_STAMP_PIX // 2
    near = (x > -half) & (x < n_pix - 1 + half) & (y > -half) & (y < n_pix - 1 + half)
    sel = np.flatnonzero(near)
    if not len(sel):
        return
    ix, iy = np.round(x[sel]), np.round(y[sel])
    scale = p.pixel_scale_arcsec
    sub = {k: v[torch.as_tensor(sel)] for k, v in params.items()}
    sub["center_x_arcsec"] = torch.as_tensor((x[sel] - ix) * scale, dtype=torch.float32)
    sub["center_y_arcsec"] = torch.as_tensor((y[sel] - iy) * scale, dtype=torch.float32)
    stamps, _ = render_confusers(sub, p, _LENS_STAMP_PIX, bands=use, noise=False)
    add_light_to_tile(image, stamps.numpy(), ix.astype(int), iy.astype(int))


def _tile_artefacts_after_noise(
    rng: np.random.Generator,
    image: np.ndarray,
    weight: np.ndarray,
    sigma: Sequence[float],
    tile_area_arcmin2: float,
    tile_id: str,
) -> dict[str, np.ndarray]:
    """Cosmic-ray residuals and (sometimes) a satellite trail; their truth rows."""
    rows = [add_cosmic_rays(image, weight, rng, int(rng.poisson(
        _COSMIC_RAYS_PER_ARCMIN2 * tile_area_arcmin2)), sigma)]  # fmt: skip
    if rng.random() < _TRAIL_PROBABILITY:
        rows.append(add_satellite_trail(image, weight, rng, sigma))
    out = _stack_rows(rows)
    out["tile"] = np.full(len(out["kind"]), tile_id)
    return out


def _stack_rows(rows: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate truth rows with differing columns (missing values: NaN)."""
    rows = [r for r in rows if len(r.get("kind", ()))]
    if not rows:
        return {"kind": np.zeros(0, "U16"), "tile": np.zeros(0, "U32"), "x": np.zeros(0),
                "y": np.zeros(0)}  # fmt: skip
    cols: dict[str, None] = {}
    for r in rows:
        cols.update(dict.fromkeys(r))
    out = {}
    for c in cols:
        parts = []
        for r in rows:
            m = len(r["kind"])
            if c in r:
                parts.append(np.asarray(r[c]))
            elif c in ("kind", "tile"):
                parts.append(np.full(m, ""))
            else:
                parts.append(np.full(m, np.nan))
        if c in ("kind", "tile"):
            out[c] = np.concatenate([np.asarray(q, dtype=str) for q in parts])
        else:
            out[c] = np.concatenate([np.asarray(q, dtype=np.float64) for q in parts])
    return out


def read_confusers(
    url: str, *, storage_options: Mapping[str, Any] | None = None
) -> dict[str, np.ndarray]:
    """Read the confuser truth table (``{url}/confusers.parquet``) of a synthetic survey."""
    return _read_table(url, "confusers.parquet", storage_options)


def read_artefacts(
    url: str, *, storage_options: Mapping[str, Any] | None = None
) -> dict[str, np.ndarray]:
    """Read the artefact truth table (``{url}/artefacts.parquet``) of a synthetic survey."""
    return _read_table(url, "artefacts.parquet", storage_options)


def _read_table(
    url: str, name: str, storage_options: Mapping[str, Any] | None
) -> dict[str, np.ndarray]:
    """Read the Parquet table ``name`` beside the survey store at ``url``."""
    import pyarrow.parquet as pq

    fs, root = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    path = posixpath.join(root, name)
    if not fs.exists(path):
        raise FileNotFoundError(f"no {name} at {url} (not a make_survey store, or an old one?)")
    with fs.open(path, "rb") as f:
        table = pq.read_table(f)
    return {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
