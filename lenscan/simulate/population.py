"""Lens populations (parameter ranges), sampling, and batched rendering in survey counts.

A *system* is a lens galaxy (SIE mass + external shear, elliptical Sersic light), a background
Sersic source, and optionally a companion galaxy near the lens (a neighbour that makes
non-lenses harder to reject). :func:`sample_lens_systems` draws ``N`` systems as a dict of
``(N,)`` tensors; :func:`render_systems` turns any such dict into ``(N, band, S, S)`` counts of
a :class:`~lenscan.simulate.presets.SurveyPreset`.

Parameter keys (angles in arcsec relative to the stamp centre, pixel ``S // 2``):

========================================  ==================================================
``theta_e_arcsec``                        SIE Einstein radius (lenstronomy convention)
``lens_q``, ``lens_phi_rad``              SIE axis ratio and position angle
``lens_center_x_arcsec``, ``..._y_...``   lens centre (mass and light)
``gamma1``, ``gamma2``                    external shear (about the lens centre)
``lens_r_eff_arcsec``, ``lens_n_sersic``  lens light Sersic radius and index
``lens_light_q``, ``lens_light_phi_rad``  lens light shape
``lens_mag_{band}``                       lens total AB magnitude per band
``source_x_arcsec``, ``source_y_arcsec``  source centre in the source plane
``source_r_eff_arcsec``, ``source_n_sersic``, ``source_q``, ``source_phi_rad``
``source_mag_{band}``                     unlensed source total AB magnitude per band
``companion_present``                     1.0 where a companion is drawn, else 0.0
``companion_x_arcsec``, ``companion_y_arcsec``, ``companion_r_eff_arcsec``,
``companion_n_sersic``, ``companion_q``, ``companion_phi_rad``, ``companion_mag_{band}``
``colour_t``                              redshift-like parameter in [0, 1] of the lens colours
``source_clumpy``                         1.0 for a clumpy star-forming source, else 0.0
``source_clump_mag_{band}``               total magnitude of the clumps (part of the source's)
``source_clump{j}_dx_arcsec``, ``..._dy_...``  clump ``j``'s offset from the source centre
``source_clump{j}_sigma_arcsec``          clump ``j``'s Gaussian sigma
``source_clump{j}_weight``                clump ``j``'s share of the clump light (0: absent)
========================================  ==================================================

Clumpy sources. ``source_mag_{band}`` is the whole source; a clumpy one puts the light of
``source_clump_mag_{band}`` (bluer than the rest: young star-forming knots) into up to
``MAX_CLUMPS`` compact Gaussians around the centre and the remainder into the smooth Sersic.
Both are lensed through the same ray-shooting. Populations without the clump keys (or with
``clumpy_fraction=0``, which draws none) render smooth sources only.

Colours. Lens galaxies are red early types whose colours move together with a redshift-like
parameter ``t`` (``g-r``, ``r-i``, ... interpolate linearly between the ends of their ranges,
plus a small scatter), as a passive galaxy's colours do for z ~ 0.3-0.8. Sources are blue
star-forming galaxies with independent colours. With the defaults, ~70 % of lensed systems
have catalogue-like colours (lens + arc light in a 1" radius aperture, ``RenderInfo.system_mag``)
inside the Jacobs et al. (2019) box 1.8 < g-i < 5, 0.6 < g-r < 3, and ~90 % lie within 0.5 mag
of it (the blue arc pulls the rest bluer).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Literal, overload

import torch

from lenscan.simulate._draws import Draws, colours_to_mags
from lenscan.simulate.physics import (
    add_noise,
    convolve,
    downsample,
    gaussian_light,
    magnitude_to_counts,
    pixel_grid,
    psf_kernel,
    psf_kernels_per_system,
    ray_shoot_lens_frame,
    sersic_amplitude_from_flux,
    sersic_profile,
    sersic_total_flux,
    to_lens_frame_params,
)
from lenscan.simulate.presets import SurveyPreset, get_survey_preset

__all__ = [
    "LENS_KEYS",
    "SOURCE_KEYS",
    "LensPopulation",
    "RenderInfo",
    "check_lens_params",
    "render_systems",
    "sample_lens_systems",
]

POPULATION_BANDS: tuple[str, ...] = ("g", "r", "i", "z", "y")
LENS_KEYS: tuple[str, ...] = (
    "theta_e_arcsec",
    "lens_q",
    "lens_phi_rad",
    "lens_center_x_arcsec",
    "lens_center_y_arcsec",
    "gamma1",
    "gamma2",
    "lens_r_eff_arcsec",
    "lens_n_sersic",
    "lens_light_q",
    "lens_light_phi_rad",
)
SOURCE_KEYS: tuple[str, ...] = (
    "source_x_arcsec",
    "source_y_arcsec",
    "source_r_eff_arcsec",
    "source_n_sersic",
    "source_q",
    "source_phi_rad",
)
#: Most star-forming clumps in one source.
MAX_CLUMPS = 5
#: Per-clump keys, formatted with the clump index ``j``.
CLUMP_KEYS: tuple[str, ...] = (
    "source_clump{j}_dx_arcsec",
    "source_clump{j}_dy_arcsec",
    "source_clump{j}_sigma_arcsec",
    "source_clump{j}_weight",
)
COMPANION_KEYS: tuple[str, ...] = (
    "companion_present",
    "companion_x_arcsec",
    "companion_y_arcsec",
    "companion_r_eff_arcsec",
    "companion_n_sersic",
    "companion_q",
    "companion_phi_rad",
)
# Sub-pixels evaluated at once in the supersampled stage: small chunks keep the many
# elementwise passes in cache (4x faster than whole batches on CPU) and bound memory.
_CHUNK_ELEMENTS = 2**20
# Stamp pixels rendered per block on CPU after the supersampled stage (PSF, noise, info).
_BLOCK_PIXELS = 2**19


Range = tuple[float, float]


@dataclass
class LensPopulation:
    """Ranges of the lens-system parameters (each drawn uniformly unless stated).

    Attributes
    ----------
    theta_e_arcsec : (float, float)
        Einstein radius.
    lens_q : (float, float)
        SIE axis ratio (in (0, 1]).
    shear_max : float
        Largest external shear ``|gamma|`` (magnitude uniform in [0, max], angle uniform).
    lens_center_max_offset_arcsec : float
        Lens centre offset from the stamp centre, uniform in +-max per axis (half a pixel
        mimics catalogue positions).
    lens_mag_i : (float, float)
        Lens galaxy total i magnitude.
    lens_r_eff_arcsec, lens_n_sersic, lens_light_q : (float, float)
        Lens light Sersic radius, index and axis ratio.
    lens_light_phi_scatter_deg : float
        Gaussian scatter of the light position angle about the mass position angle.
    lens_g_r, lens_r_i, lens_i_z, lens_z_y : (float, float)
        Lens colour ranges, traversed together by the redshift-like parameter ``t``; the
        defaults follow passive (redMaGiC-like) galaxies from z ~ 0.3 to z ~ 0.7 in DES.
    lens_colour_scatter : float
        Gaussian scatter (mag) added to each lens colour.
    source_mag_i : (float, float)
        Unlensed source total i magnitude.
    source_r_eff_arcsec, source_n_sersic, source_q : (float, float)
        Source Sersic radius, index and axis ratio.
    source_offset_frac : (float, float)
        Source-plane distance from the lens centre in units of ``theta_E`` (uniform in area).
        The default keeps sources well inside the caustics, where arcs, rings and quads form
        (sources near ``theta_E`` give a single bright image and a faint counter-image, which
        at DES seeing look like a companion rather than a lens).
    source_g_r, source_r_i, source_i_z, source_z_y : (float, float)
        Source colour ranges (independent).
    companion_probability : float
        Probability that a companion galaxy is drawn near the lens.
    companion_distance_arcsec, companion_dmag, companion_r_eff_arcsec, companion_n_sersic : \
(float, float)
        Companion distance, magnitude difference to the lens (fainter), radius and index.
    companion_blue_fraction : float
        Fraction of companions with source-like (blue) rather than lens-like colours.
    clumpy_fraction : float
        Fraction of sources that are clumpy star-forming galaxies (a smooth Sersic plus
        compact, bluer clumps). The default 0.5 follows the clumpy fraction of star-forming
        galaxies at z ~ 1-3, where lensed sources at DES depth lie: 40-60 % (Guo et al. 2015,
        ApJ 800, 39; Shibuya et al. 2016, ApJ 821, 72). 0 draws no clump parameters at all.
    n_clumps : (int, int)
        Number of clumps of a clumpy source, uniform over the integers in the range
        (at most ``MAX_CLUMPS``).
    clump_flux_fraction_i : (float, float)
        Share of the source's i-band light in its clumps (Guo et al. 2015: clumps hold
        10-40 % of a clumpy galaxy's rest-UV light).
    clump_bluer_mag : (float, float)
        How much bluer the clumps are than the whole source in each of g-r, r-i, i-z, z-y
        (star-forming clumps are ~0.2-0.5 mag bluer in rest UV-optical colours than the
        galaxy between them: Guo et al. 2012, ApJ 757, 120).
    clump_sigma_arcsec : (float, float)
        Gaussian sigma of a clump (~0.5-1.5 kpc at z ~ 1-2).
    clump_distance_reff : (float, float)
        Clump distance from the source centre in units of its ``r_eff`` (in the source's
        elliptical frame).
    """

    theta_e_arcsec: Range = (0.8, 3.0)
    lens_q: Range = (0.5, 1.0)
    shear_max: float = 0.1
    lens_center_max_offset_arcsec: float = 0.13
    lens_mag_i: Range = (18.0, 21.0)
    lens_r_eff_arcsec: Range = (0.5, 2.0)
    lens_n_sersic: Range = (3.0, 5.0)
    lens_light_q: Range = (0.5, 1.0)
    lens_light_phi_scatter_deg: float = 10.0
    lens_g_r: Range = (1.3, 1.9)
    lens_r_i: Range = (0.5, 0.9)
    lens_i_z: Range = (0.25, 0.45)
    lens_z_y: Range = (0.0, 0.15)
    lens_colour_scatter: float = 0.05
    source_mag_i: Range = (21.0, 24.5)
    source_r_eff_arcsec: Range = (0.05, 0.5)
    source_n_sersic: Range = (0.5, 2.0)
    source_q: Range = (0.4, 1.0)
    source_offset_frac: Range = (0.0, 0.6)
    source_g_r: Range = (0.0, 0.6)
    source_r_i: Range = (-0.1, 0.4)
    source_i_z: Range = (-0.1, 0.3)
    source_z_y: Range = (-0.1, 0.2)
    companion_probability: float = 0.3
    # catalogued neighbours 1-3" away: close enough to share a 64 px stamp with the arcs
    companion_distance_arcsec: Range = (1.0, 3.0)
    companion_dmag: Range = (0.5, 3.0)
    companion_r_eff_arcsec: Range = (0.2, 1.0)
    companion_n_sersic: Range = (0.8, 4.0)
    companion_blue_fraction: float = 0.5
    clumpy_fraction: float = 0.5
    n_clumps: Range = (1, 5)
    clump_flux_fraction_i: Range = (0.1, 0.4)
    clump_bluer_mag: Range = (0.05, 0.25)
    # >= 0.04": the 3x supersampled DES grid (0.088") integrates such a Gaussian to < 2 %
    clump_sigma_arcsec: Range = (0.04, 0.12)
    clump_distance_reff: Range = (0.0, 1.5)

    # bounds (low, high, low_open) for the ranges that have physical limits
    _BOUNDS = {  # noqa: RUF012 - class-level constant, not a dataclass field
        "theta_e_arcsec": (0.0, None, True),
        "lens_q": (0.0, 1.0, True),
        "lens_light_q": (0.0, 1.0, True),
        "source_q": (0.0, 1.0, True),
        "lens_r_eff_arcsec": (0.0, None, True),
        "source_r_eff_arcsec": (0.0, None, True),
        "companion_r_eff_arcsec": (0.0, None, True),
        "lens_n_sersic": (0.0, 10.0, True),
        "source_n_sersic": (0.0, 10.0, True),
        "companion_n_sersic": (0.0, 10.0, True),
        "source_offset_frac": (0.0, None, False),
        "companion_distance_arcsec": (0.0, None, False),
        "n_clumps": (1.0, float(MAX_CLUMPS), False),
        "clump_flux_fraction_i": (0.0, 0.9, True),
        "clump_bluer_mag": (0.0, None, False),
        "clump_sigma_arcsec": (0.0, None, True),
        "clump_distance_reff": (0.0, None, False),
    }

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (tuple, list)):
                if len(value) != 2:
                    raise ValueError(f"LensPopulation.{f.name} must be (low, high), got {value!r}")
                lo, hi = (float(v) for v in value)
                if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
                    raise ValueError(
                        f"LensPopulation.{f.name} must be finite with low <= high, got {value!r}"
                    )
                setattr(self, f.name, (lo, hi))
                bound = self._BOUNDS.get(f.name)
                if bound is not None:
                    low, high, low_open = bound
                    if (lo <= low) if low_open else (lo < low):
                        raise ValueError(
                            f"LensPopulation.{f.name} must be {'>' if low_open else '>='} {low}, "
                            f"got {value!r}"
                        )
                    if high is not None and hi > high:
                        raise ValueError(
                            f"LensPopulation.{f.name} must be <= {high}, got {value!r}"
                        )
            else:
                v = float(value)
                if not math.isfinite(v) or v < 0:
                    raise ValueError(
                        f"LensPopulation.{f.name} must be finite and >= 0, got {value!r}"
                    )
        for name in ("companion_probability", "companion_blue_fraction", "clumpy_fraction"):
            if getattr(self, name) > 1:
                raise ValueError(
                    f"LensPopulation.{name} must be in [0, 1], got {getattr(self, name)}"
                )
        if self.shear_max >= 1:
            raise ValueError(f"LensPopulation.shear_max must be < 1, got {self.shear_max}")


# --------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------
def sample_lens_systems(
    population: LensPopulation | None = None,
    n: int = 1,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Draw ``n`` lens systems from ``population``.

    Parameters
    ----------
    population : LensPopulation, optional
        Parameter ranges; default ``LensPopulation()``.
    n : int
        Number of systems (>= 1).
    generator : torch.Generator, optional
        Seeded generator on ``device`` for reproducible draws.
    device : torch.device or str, optional
        Device of the tensors (default: the generator's device, else CPU).
    dtype : torch.dtype
        Floating dtype.

    Returns
    -------
    dict[str, Tensor]
        ``(n,)`` tensors with the keys listed in the module docstring, magnitudes for bands
        g, r, i, z, y.
    """
    population = LensPopulation() if population is None else population
    if not isinstance(population, LensPopulation):
        raise TypeError(f"population must be a LensPopulation, got {type(population).__name__}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    draw = Draws(n, generator, torch.device(device), dtype)
    out: dict[str, torch.Tensor] = {}
    lens_i = _sample_lens(population, draw, out)
    _sample_source(population, draw, out)
    _sample_companion(population, draw, out, lens_i)
    if population.clumpy_fraction > 0:
        # drawn last, so the other parameters are those of a population without clumps
        _sample_clumps(population, draw, out)
    return out


def _sample_lens(p: LensPopulation, draw: Draws, out: dict[str, torch.Tensor]) -> torch.Tensor:
    """Lens mass, shear, light and colours into ``out``; return the lens i magnitude."""
    u, uniform = draw.u, draw.uniform
    out["theta_e_arcsec"] = uniform(p.theta_e_arcsec)
    out["lens_q"] = uniform(p.lens_q)
    out["lens_phi_rad"] = math.pi * u()
    off = p.lens_center_max_offset_arcsec
    out["lens_center_x_arcsec"] = off * (2 * u() - 1)
    out["lens_center_y_arcsec"] = off * (2 * u() - 1)
    g = p.shear_max * u()
    ang = math.pi * u()
    out["gamma1"] = g * torch.cos(2 * ang)
    out["gamma2"] = g * torch.sin(2 * ang)
    out["lens_r_eff_arcsec"] = uniform(p.lens_r_eff_arcsec)
    out["lens_n_sersic"] = uniform(p.lens_n_sersic)
    out["lens_light_q"] = uniform(p.lens_light_q)
    out["lens_light_phi_rad"] = (
        out["lens_phi_rad"] + math.radians(p.lens_light_phi_scatter_deg) * draw.normal()
    )

    t = u()
    out["colour_t"] = t
    sc = p.lens_colour_scatter
    lens_colours = [
        rng[0] + (rng[1] - rng[0]) * t + sc * draw.normal()
        for rng in (p.lens_g_r, p.lens_r_i, p.lens_i_z, p.lens_z_y)
    ]
    lens_i = uniform(p.lens_mag_i)
    for band, mag in colours_to_mags(lens_i, *lens_colours).items():
        out[f"lens_mag_{band}"] = mag
    return lens_i


def _sample_source(p: LensPopulation, draw: Draws, out: dict[str, torch.Tensor]) -> None:
    """The source, uniform in area within the annulus of fractions of theta_E about the lens."""
    u, uniform = draw.u, draw.uniform
    lo, hi = p.source_offset_frac
    rad = out["theta_e_arcsec"] * torch.sqrt(lo * lo + (hi * hi - lo * lo) * u())
    pa = 2 * math.pi * u()
    out["source_x_arcsec"] = out["lens_center_x_arcsec"] + rad * torch.cos(pa)
    out["source_y_arcsec"] = out["lens_center_y_arcsec"] + rad * torch.sin(pa)
    out["source_r_eff_arcsec"] = uniform(p.source_r_eff_arcsec)
    out["source_n_sersic"] = uniform(p.source_n_sersic)
    out["source_q"] = uniform(p.source_q)
    out["source_phi_rad"] = math.pi * u()
    src_colours = [uniform(rng) for rng in (p.source_g_r, p.source_r_i, p.source_i_z, p.source_z_y)]
    for band, mag in colours_to_mags(uniform(p.source_mag_i), *src_colours).items():
        out[f"source_mag_{band}"] = mag


def _sample_companion(
    p: LensPopulation, draw: Draws, out: dict[str, torch.Tensor], lens_i: torch.Tensor
) -> None:
    """A neighbour of the lens with either lens-like (red) or source-like (blue) colours."""
    u, uniform = draw.u, draw.uniform
    out["companion_present"] = (u() < p.companion_probability).to(out["theta_e_arcsec"].dtype)
    dist = uniform(p.companion_distance_arcsec)
    pa = 2 * math.pi * u()
    out["companion_x_arcsec"] = out["lens_center_x_arcsec"] + dist * torch.cos(pa)
    out["companion_y_arcsec"] = out["lens_center_y_arcsec"] + dist * torch.sin(pa)
    out["companion_r_eff_arcsec"] = uniform(p.companion_r_eff_arcsec)
    out["companion_n_sersic"] = uniform(p.companion_n_sersic)
    out["companion_q"] = uniform((0.3, 1.0))
    out["companion_phi_rad"] = math.pi * u()
    blue = u() < p.companion_blue_fraction
    comp_i = lens_i + uniform(p.companion_dmag)
    red_c = [
        rng[0] + (rng[1] - rng[0]) * u() for rng in (p.lens_g_r, p.lens_r_i, p.lens_i_z, p.lens_z_y)
    ]
    blue_c = [uniform(rng) for rng in (p.source_g_r, p.source_r_i, p.source_i_z, p.source_z_y)]
    comp_colours = [torch.where(blue, b, r) for b, r in zip(blue_c, red_c, strict=True)]
    for band, mag in colours_to_mags(comp_i, *comp_colours).items():
        out[f"companion_mag_{band}"] = mag


def _sample_clumps(p: LensPopulation, draw: Draws, out: dict[str, torch.Tensor]) -> None:
    """Star-forming clumps: how many, where in the source, how big, how bright and blue."""
    u, uniform = draw.u, draw.uniform
    clumpy = u() < p.clumpy_fraction
    out["source_clumpy"] = clumpy.to(out["theta_e_arcsec"].dtype)
    lo, hi = int(p.n_clumps[0]), int(p.n_clumps[1])
    n_clumps = torch.floor(lo + (hi - lo + 1) * u()).clamp(lo, hi)
    frac = uniform(p.clump_flux_fraction_i)
    src = {b: out[f"source_mag_{b}"] for b in POPULATION_BANDS}
    colours = [src["g"] - src["r"], src["r"] - src["i"], src["i"] - src["z"], src["z"] - src["y"]]
    bluer = [c - uniform(p.clump_bluer_mag) for c in colours]
    clump_i = src["i"] - 2.5 * torch.log10(frac)
    for band, mag in colours_to_mags(clump_i, *bluer).items():
        out[f"source_clump_mag_{band}"] = mag
    q, phi, r_eff = out["source_q"], out["source_phi_rad"], out["source_r_eff_arcsec"]
    raw = []
    for j in range(MAX_CLUMPS):
        # uniform in the source's elliptical frame, then rotated to the sky
        rad = r_eff * uniform(p.clump_distance_reff)
        ang = 2 * math.pi * u()
        a, b = rad * torch.cos(ang) / torch.sqrt(q), rad * torch.sin(ang) * torch.sqrt(q)
        out[f"source_clump{j}_dx_arcsec"] = a * torch.cos(phi) - b * torch.sin(phi)
        out[f"source_clump{j}_dy_arcsec"] = a * torch.sin(phi) + b * torch.cos(phi)
        out[f"source_clump{j}_sigma_arcsec"] = uniform(p.clump_sigma_arcsec)
        raw.append((0.2 + u()) * ((j < n_clumps) & clumpy).to(q.dtype))
    total = torch.stack(raw).sum(dim=0).clamp_min(1e-30)
    for j in range(MAX_CLUMPS):
        out[f"source_clump{j}_weight"] = raw[j] / total


# --------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------
def _check_tensor(params: Mapping[str, torch.Tensor], key: str, n: int | None) -> torch.Tensor:
    if key not in params:
        raise ValueError(f"lens parameters lack {key!r} (see lenscan.simulate.population)")
    t = params[key]
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"parameter {key!r} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != 1 or (n is not None and t.shape[0] != n):
        raise ValueError(
            f"parameter {key!r} must have shape ({n if n else 'N'},), got {tuple(t.shape)}"
        )
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"parameter {key!r} contains non-finite values (NaN or inf)")
    return t


def check_lens_params(
    params: Mapping[str, torch.Tensor],
    bands: Sequence[str],
    *,
    with_lens: bool = True,
    with_source: bool = True,
) -> int:
    """Validate a lens-parameter dict for rendering; return the number of systems ``N``.

    Raises
    ------
    ValueError
        Naming the parameter: missing key, wrong shape, non-finite value, negative or zero
        Einstein radius, axis ratio outside (0, 1], non-positive radius or Sersic index,
        or a band without magnitudes.
    """
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a mapping of tensors, got {type(params).__name__}")
    keys: list[str] = list(LENS_KEYS)
    if with_lens:
        keys += [f"lens_mag_{b}" for b in bands]
        if "companion_present" in params:
            keys += list(COMPANION_KEYS[1:]) + [f"companion_mag_{b}" for b in bands]
    if with_source:
        keys += list(SOURCE_KEYS) + [f"source_mag_{b}" for b in bands]
        if "source_clumpy" in params:
            keys += ["source_clumpy"] + [f"source_clump_mag_{b}" for b in bands]
            keys += [k.format(j=j) for j in range(MAX_CLUMPS) for k in CLUMP_KEYS]
    n = int(_check_tensor(params, keys[0], None).shape[0])
    for key in keys[1:]:
        _check_tensor(params, key, n)
    if "companion_present" in params:
        _check_tensor(params, "companion_present", n)
    positive = ["theta_e_arcsec", "lens_r_eff_arcsec", "lens_n_sersic"]
    unit = ["lens_q", "lens_light_q"]
    if with_source:
        positive += ["source_r_eff_arcsec", "source_n_sersic"]
        unit += ["source_q"]
        if "source_clumpy" in params:
            positive += [f"source_clump{j}_sigma_arcsec" for j in range(MAX_CLUMPS)]
    if with_lens and "companion_present" in params:
        positive += ["companion_r_eff_arcsec", "companion_n_sersic"]
        unit += ["companion_q"]
    for key in positive:
        if bool((params[key] <= 0).any()):
            raise ValueError(
                f"parameter {key!r} must be > 0; got min {float(params[key].min()):.6g}"
            )
    for key in unit:
        t = params[key]
        if bool(((t <= 0) | (t > 1)).any()):
            raise ValueError(
                f"parameter {key!r} (axis ratio) must be in (0, 1]; got range "
                f"[{float(t.min()):.6g}, {float(t.max()):.6g}]"
            )
    return n


# --------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------
@dataclass
class RenderInfo:
    """Per-system measurements made while rendering (noiseless quantities).

    Attributes
    ----------
    bands : tuple of str
        Band order of the per-band tensors.
    source_snr : Tensor
        ``(N, B)`` matched-filter S/N of the lensed source per band:
        ``sqrt(sum_pixels S^2 / var)`` with ``S`` the PSF-convolved lensed-source counts and
        ``var = (lens + source light + sky)/gain + read^2`` the pixel variance against the
        preset's background (also when ``sky_counts_override`` is given). Zero without a source.
    source_snr_total : Tensor
        ``(N,)`` S/N over all bands, ``sqrt(sum_b source_snr_b^2)``.
    lensed_source_mag : Tensor
        ``(N, B)`` magnitude of the lensed source light inside the stamp (inf without a source).
    magnification : Tensor
        ``(N,)`` lensed flux inside the stamp over the unlensed source flux.
    system_mag : Tensor
        ``(N, B)`` catalogue-like magnitude: lens + lensed-source light (PSF convolved,
        noiseless, companion excluded) inside a circular aperture about the lens centre
        (radius ``catalog_aperture_radius_arcsec``, default 1", i.e. DES's 2" aperture
        magnitudes; deblended catalogue photometry similarly keeps distant arcs apart).
    """

    bands: tuple[str, ...]
    source_snr: torch.Tensor
    source_snr_total: torch.Tensor
    lensed_source_mag: torch.Tensor
    magnification: torch.Tensor
    system_mag: torch.Tensor


def _band_counts(
    params: Mapping[str, torch.Tensor],
    prefix: str,
    bands: Sequence[str],
    zero_point: float,
    like: torch.Tensor,
) -> torch.Tensor:
    """``(N, B)`` counts of the ``{prefix}_mag_{band}`` magnitudes, in ``like``'s dtype."""
    mags = torch.stack([params[f"{prefix}_mag_{b}"] for b in bands], dim=1).to(like.dtype)
    return magnitude_to_counts(mags, zero_point)


def _render_unit(
    params: Mapping[str, torch.Tensor],
    idx: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    component: str,
    ss: int,
) -> torch.Tensor:
    """Supersampled stage: unit-amplitude light of the lens or companion for systems ``idx``.

    Returns ``(len(idx), S, S)`` pixel means of the surface brightness for amplitude 1;
    multiply by the amplitude (counts/arcsec^2) and the pixel area to get counts.
    """

    def p(key: str) -> torch.Tensor:
        return params[key][idx].to(x.dtype)

    if component == "lens":
        sb = sersic_profile(
            x, y, 1.0, p("lens_r_eff_arcsec"), p("lens_n_sersic"), p("lens_light_q"),
            p("lens_light_phi_rad"), p("lens_center_x_arcsec"), p("lens_center_y_arcsec"),
        )  # fmt: skip
    else:
        sb = sersic_profile(
            x, y, 1.0, p("companion_r_eff_arcsec"), p("companion_n_sersic"),
            p("companion_q"), p("companion_phi_rad"), p("companion_x_arcsec"),
            p("companion_y_arcsec"),
        )  # fmt: skip
    return downsample(sb, ss)


def _render_source_units(
    params: Mapping[str, torch.Tensor],
    idx: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    ss: int,
    clumps: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Supersampled stage of the lensed source of systems ``idx``, ray-traced once.

    Returns the smooth Sersic's unit-amplitude pixel means (as :func:`_render_unit`) and,
    with ``clumps``, the clumps' light for a total unlensed flux of 1 (pixel means times the
    pixel area give the fraction of the clump flux in each pixel once multiplied by it).
    """

    def p(key: str) -> torch.Tensor:
        return params[key][idx].to(x.dtype)

    lens_frame = {
        "center_x": p("lens_center_x_arcsec"), "center_y": p("lens_center_y_arcsec"),
        "phi": p("lens_phi_rad"),
    }  # fmt: skip
    # the source is evaluated in the lens frame: its centre and angle rotate, not the pixels
    bx, by, _, _ = ray_shoot_lens_frame(
        x, y, theta_e=p("theta_e_arcsec"), q=p("lens_q"), gamma1=p("gamma1"),
        gamma2=p("gamma2"), **lens_frame,
    )  # fmt: skip
    sx, sy, sphi = to_lens_frame_params(
        p("source_x_arcsec"), p("source_y_arcsec"), p("source_phi_rad"), **lens_frame
    )
    sb = sersic_profile(
        bx, by, 1.0, p("source_r_eff_arcsec"), p("source_n_sersic"), p("source_q"), sphi, sx, sy
    )
    if not clumps:
        return downsample(sb, ss), None
    light = torch.zeros_like(bx)
    for j in range(MAX_CLUMPS):
        weight = p(f"source_clump{j}_weight")
        if not bool((weight > 0).any()):
            continue  # no system of this chunk has a j-th clump
        cx, cy, _ = to_lens_frame_params(
            p("source_x_arcsec") + p(f"source_clump{j}_dx_arcsec"),
            p("source_y_arcsec") + p(f"source_clump{j}_dy_arcsec"),
            p("source_phi_rad"), **lens_frame,
        )  # fmt: skip
        light = light + gaussian_light(bx, by, weight, p(f"source_clump{j}_sigma_arcsec"), cx, cy)
    return downsample(sb, ss), downsample(light, ss)


@dataclass(frozen=True)
class _RenderOptions:
    """The validated options of one :func:`render_systems` call, shared by its blocks."""

    preset: SurveyPreset
    band_t: tuple[str, ...]
    size_pix: int
    with_source: bool
    with_lens: bool
    noise: bool
    psf: bool
    supersample: int
    generator: torch.Generator | None
    return_info: bool
    catalog_aperture_radius_arcsec: float
    dtype: torch.dtype


@dataclass
class _Components:
    """Rendered light of each component, ``(N, B, S, S)`` counts (None when not rendered)."""

    lens: torch.Tensor | None
    companion: torch.Tensor | None
    source: torch.Tensor | None
    magnification: torch.Tensor  # (N,) lensed over unlensed source flux; NaN without source


@overload
def render_systems(
    params: Mapping[str, torch.Tensor],
    preset: SurveyPreset | str,
    size_pix: int,
    *,
    bands: Sequence[str] | None = ...,
    with_source: bool = ...,
    with_lens: bool = ...,
    noise: bool = ...,
    psf: bool = ...,
    supersample: int = ...,
    generator: torch.Generator | None = ...,
    sky_counts_override: float | Sequence[float] | torch.Tensor | None = ...,
    seeing_factor: torch.Tensor | None = ...,
    return_info: Literal[False] = ...,
    catalog_aperture_radius_arcsec: float = ...,
    dtype: torch.dtype = ...,
) -> torch.Tensor: ...


@overload
def render_systems(
    params: Mapping[str, torch.Tensor],
    preset: SurveyPreset | str,
    size_pix: int,
    *,
    bands: Sequence[str] | None = ...,
    with_source: bool = ...,
    with_lens: bool = ...,
    noise: bool = ...,
    psf: bool = ...,
    supersample: int = ...,
    generator: torch.Generator | None = ...,
    sky_counts_override: float | Sequence[float] | torch.Tensor | None = ...,
    seeing_factor: torch.Tensor | None = ...,
    return_info: Literal[True],
    catalog_aperture_radius_arcsec: float = ...,
    dtype: torch.dtype = ...,
) -> tuple[torch.Tensor, RenderInfo]: ...


def render_systems(
    params: Mapping[str, torch.Tensor],
    preset: SurveyPreset | str,
    size_pix: int,
    *,
    bands: Sequence[str] | None = None,
    with_source: bool = True,
    with_lens: bool = True,
    noise: bool = True,
    psf: bool = True,
    supersample: int = 3,
    generator: torch.Generator | None = None,
    sky_counts_override: float | Sequence[float] | torch.Tensor | None = None,
    seeing_factor: torch.Tensor | None = None,
    return_info: bool = False,
    catalog_aperture_radius_arcsec: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor | tuple[torch.Tensor, RenderInfo]:
    """Render lens systems as ``(N, band, S, S)`` stamps in the preset's counts.

    Steps: ray-trace the (supersampled) pixel grid through SIE + shear, evaluate the source
    (Sersic + clumps) and lens/companion light, average sub-pixels, scale each band to its
    magnitude, convolve with the PSF, add noise. Batched in torch on ``params``' device.

    Parameters
    ----------
    params : Mapping[str, Tensor]
        ``(N,)`` tensors as returned by :func:`sample_lens_systems`.
    preset : SurveyPreset or str
        Survey (pixel scale, zero point, PSF, sky, gain) or its name.
    size_pix : int
        Stamp side ``S``; the stamp centre (coordinate origin) is pixel ``S // 2``.
    bands : sequence of str, optional
        Bands to render; default ``preset.default_bands``. Unknown bands raise ValueError.
    with_source, with_lens : bool
        Include the lensed source / the lens galaxy (and its companion, if any).
    noise : bool
        Add Poisson noise of light + sky (via the preset's gain) and read noise. Images are
        sky subtracted like DES coadds: zero-mean background with the sky's Poisson noise.
    psf, supersample : bool, int
        Convolve with the preset's PSF; sub-pixels per pixel along each axis.
    generator : torch.Generator, optional
        Generator for the noise (on the params' device).
    sky_counts_override : float, sequence or Tensor, optional
        Sky counts per pixel (scalar, per band or (N, B)) used for the noise instead of the
        preset's sky; 0 gives the light's own Poisson noise only (arcs added to real images).
    seeing_factor : Tensor, optional
        ``(N,)`` or ``(N, B)`` multipliers of the preset's FWHM (each system at its seeing).
    return_info : bool
        Also return a :class:`RenderInfo` (source S/N, lensed magnitudes, magnification).
    catalog_aperture_radius_arcsec : float
        Radius about the lens centre of the aperture of ``RenderInfo.system_mag``.
    dtype : torch.dtype
        Floating dtype of the computation and result.

    Returns
    -------
    Tensor or (Tensor, RenderInfo)
        ``(N, B, S, S)`` counts.

    Examples
    --------
    >>> import torch
    >>> gen = torch.Generator().manual_seed(0)
    >>> params = sample_lens_systems(LensPopulation(), 4, generator=gen)
    >>> images, info = render_systems(params, "des", 64, generator=gen, return_info=True)
    >>> images.shape, info.source_snr.shape
    (torch.Size([4, 3, 64, 64]), torch.Size([4, 3]))
    """
    preset = get_survey_preset(preset)
    band_t = preset.check_bands(bands)
    n = _check_render_args(
        params, band_t, with_lens, with_source, supersample, sky_counts_override, seeing_factor
    )
    opts = _RenderOptions(
        preset, band_t, size_pix, with_source, with_lens, noise, psf, supersample, generator,
        return_info, catalog_aperture_radius_arcsec, dtype,
    )  # fmt: skip
    return _join_blocks(_render_blocks(params, sky_counts_override, opts, n, seeing_factor), opts)


def _check_render_args(
    params: Mapping[str, torch.Tensor],
    band_t: tuple[str, ...],
    with_lens: bool,
    with_source: bool,
    supersample: int,
    sky_counts_override: float | Sequence[float] | torch.Tensor | None,
    seeing_factor: torch.Tensor | None = None,
) -> int:
    """Check :func:`render_systems`'s arguments; return the number of systems."""
    if not (with_lens or with_source):
        raise ValueError("render_systems needs with_lens or with_source (or both)")
    n = check_lens_params(params, band_t, with_lens=with_lens, with_source=with_source)
    if isinstance(supersample, bool) or not isinstance(supersample, int) or supersample < 1:
        raise ValueError(f"supersample must be a positive int, got {supersample!r}")
    override = sky_counts_override
    if isinstance(override, torch.Tensor) and override.ndim == 2 and override.shape[0] != n:
        raise ValueError(
            f"sky_counts_override of shape {tuple(override.shape)} does not match {n} systems"
        )
    if seeing_factor is not None and int(torch.as_tensor(seeing_factor).shape[0]) != n:
        raise ValueError(f"seeing_factor must have one row per system ({n})")
    return n


def _render_blocks(
    params: Mapping[str, torch.Tensor],
    override: float | Sequence[float] | torch.Tensor | None,
    opts: _RenderOptions,
    n: int,
    seeing: torch.Tensor | None = None,
) -> list[tuple[torch.Tensor, RenderInfo | None]]:
    """Render the systems block by block (CPU: blocks that stay in cache; GPU: one block)."""
    device = params["theta_e_arcsec"].device
    size = opts.size_pix
    block = n if device.type != "cpu" else max(1, _BLOCK_PIXELS // (size * size))
    parts = []
    for a in range(0, n, block):
        sub = {k: v[a : a + block] for k, v in params.items()}
        sky = override
        if isinstance(override, torch.Tensor) and override.ndim == 2:
            sky = override[a : a + block]
        block_seeing = None if seeing is None else seeing[a : a + block]
        parts.append(_render_block(sub, sky, opts, block_seeing))
    return parts


def _join_blocks(
    parts: Sequence[tuple[torch.Tensor, RenderInfo | None]], opts: _RenderOptions
) -> torch.Tensor | tuple[torch.Tensor, RenderInfo]:
    """The blocks' images (and infos, with ``return_info``) joined in order."""
    images = parts[0][0] if len(parts) == 1 else torch.cat([p[0] for p in parts])
    if not opts.return_info:
        return images
    infos = [info for _, info in parts if info is not None]
    if len(infos) == 1:
        return images, infos[0]
    return images, RenderInfo(
        bands=opts.band_t,
        **{
            f.name: torch.cat([getattr(i, f.name) for i in infos])
            for f in fields(RenderInfo)
            if f.name != "bands"
        },
    )


def _render_block(
    params: Mapping[str, torch.Tensor],
    sky_counts_override: float | Sequence[float] | torch.Tensor | None,
    opts: _RenderOptions,
    seeing: torch.Tensor | None = None,
) -> tuple[torch.Tensor, RenderInfo | None]:
    """:func:`render_systems` for one block of validated systems: images and (maybe) info."""
    comps = _render_components(params, opts)
    if opts.psf:
        device = comps.magnification.device
        if seeing is None:
            kernels = psf_kernel(opts.preset, opts.band_t, device=device, dtype=opts.dtype)
        else:
            kernels = psf_kernels_per_system(opts.preset, opts.band_t, seeing.to(device),
                                             device=device, dtype=opts.dtype)  # fmt: skip
        comps.lens = convolve(comps.lens, kernels) if comps.lens is not None else None
        comps.companion = (
            convolve(comps.companion, kernels) if comps.companion is not None else None
        )
        comps.source = convolve(comps.source, kernels) if comps.source is not None else None
    clean = _clean_image(comps)
    if opts.noise:
        sky_preset, gain = _sky_and_gain(opts, clean.device)
        sky = sky_preset if sky_counts_override is None else sky_counts_override
        images = add_noise(
            clean,
            sky_counts=sky,
            gain_e_per_count=gain,
            read_noise_counts=opts.preset.read_noise_counts,
            sky_subtracted=True,
            generator=opts.generator,
        )
    else:
        images = clean
    if not opts.return_info:
        return images, None
    return images, _render_info(params, comps, clean, opts)


def _sky_and_gain(opts: _RenderOptions, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The preset's sky (counts per pixel) and gain (e-/count) per band."""
    preset, dtype = opts.preset, opts.dtype
    sky = torch.tensor([preset.sky_counts(b) for b in opts.band_t], device=device, dtype=dtype)
    gain = torch.tensor([preset.gain(b) for b in opts.band_t], device=device, dtype=dtype)
    return sky, gain


def _amplitudes(
    params: Mapping[str, torch.Tensor], prefix: str, opts: _RenderOptions, like: torch.Tensor
) -> torch.Tensor:
    """Per-band Sersic amplitudes (surface brightness at r_eff, counts/arcsec^2), ``(N, B)``."""
    counts = _band_counts(params, prefix, opts.band_t, opts.preset.zero_point, like)
    r = params[f"{prefix}_r_eff_arcsec"].to(opts.dtype).unsqueeze(1)
    nn = params[f"{prefix}_n_sersic"].to(opts.dtype).unsqueeze(1)
    return sersic_amplitude_from_flux(counts, r, nn)


@dataclass
class _SourceLight:
    """The source's light split into the smooth Sersic and the clumps, ``(N, B)`` each."""

    amplitude: torch.Tensor  # smooth Sersic amplitude (counts/arcsec^2 at r_eff)
    smooth_counts: torch.Tensor
    clump_counts: torch.Tensor | None  # None: no clump parameters (smooth sources only)


def _source_light(params: Mapping[str, torch.Tensor], opts: _RenderOptions) -> _SourceLight:
    """Split each band's source counts between the smooth Sersic and the (bluer) clumps."""
    like = params["theta_e_arcsec"].to(opts.dtype)
    total = _band_counts(params, "source", opts.band_t, opts.preset.zero_point, like)
    clumps = None
    if "source_clumpy" in params:
        raw = _band_counts(params, "source_clump", opts.band_t, opts.preset.zero_point, like)
        # a clump brighter than its whole galaxy in a blue band would be unphysical: cap it
        clumps = torch.minimum(raw, 0.9 * total) * params["source_clumpy"].to(opts.dtype)[:, None]
        total = total - clumps
    r = params["source_r_eff_arcsec"].to(opts.dtype).unsqueeze(1)
    nn = params["source_n_sersic"].to(opts.dtype).unsqueeze(1)
    return _SourceLight(sersic_amplitude_from_flux(total, r, nn), total, clumps)


def _render_components(params: Mapping[str, torch.Tensor], opts: _RenderOptions) -> _Components:
    """The supersampled stage: each component's light in counts, before the PSF."""
    n = int(params["theta_e_arcsec"].shape[0])
    device, dtype, size = params["theta_e_arcsec"].device, opts.dtype, opts.size_pix
    x, y = pixel_grid(size, opts.preset.pixel_scale_arcsec, opts.supersample, device, dtype=dtype)
    everyone = torch.arange(n, device=device)
    jobs: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    if opts.with_lens:
        jobs.append(("lens", everyone, _amplitudes(params, "lens", opts, x)))
    if opts.with_lens and "companion_present" in params:
        # only systems that have a companion pay for rendering one
        present = torch.nonzero(params["companion_present"] > 0).flatten()
        amp = _amplitudes(params, "companion", opts, x)
        jobs.append(
            ("companion", present, amp * params["companion_present"].to(dtype).unsqueeze(1))
        )
    # chunks of systems small enough to keep the supersampled passes in cache (CPU)
    per_chunk = _CHUNK_ELEMENTS if device.type == "cpu" else 2**25
    chunk = max(1, per_chunk // x.numel())
    shape = (n, len(opts.band_t), size, size)
    pix_area = opts.preset.pixel_scale_arcsec**2
    out: dict[str, torch.Tensor] = {}
    for component, members, amp in jobs:
        img = out[component] = torch.zeros(shape, device=device, dtype=dtype)
        for start in range(0, members.numel(), chunk):
            idx = members[start : start + chunk]
            unit = _render_unit(params, idx, x, y, component=component, ss=opts.supersample)
            img[idx] = unit.unsqueeze(1) * (amp[idx] * pix_area)[:, :, None, None]
    magnification = torch.full((n,), float("nan"), device=device, dtype=dtype)
    if opts.with_source:
        out["source"], magnification = _render_source(params, opts, x, y, chunk)
    return _Components(out.get("lens"), out.get("companion"), out.get("source"), magnification)


def _render_source(
    params: Mapping[str, torch.Tensor],
    opts: _RenderOptions,
    x: torch.Tensor,
    y: torch.Tensor,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The lensed source's counts ``(N, B, S, S)`` and its magnification ``(N,)``.

    The magnification is the lensed flux in the stamp over the unlensed flux, summed over the
    bands (for a smooth source, the same in every band).
    """
    n, dtype = int(params["theta_e_arcsec"].shape[0]), opts.dtype
    pix_area = opts.preset.pixel_scale_arcsec**2
    light = _source_light(params, opts)
    img = torch.zeros((n, len(opts.band_t), opts.size_pix, opts.size_pix), device=x.device,
                      dtype=dtype)  # fmt: skip
    smooth_sum = torch.zeros(n, device=x.device, dtype=dtype)
    clump_sum = torch.zeros(n, device=x.device, dtype=dtype)
    clumpy = light.clump_counts is not None
    for start in range(0, n, chunk):
        idx = torch.arange(start, min(start + chunk, n), device=x.device)
        unit, clump_unit = _render_source_units(params, idx, x, y, ss=opts.supersample,
                                                clumps=clumpy)  # fmt: skip
        img[idx] = unit.unsqueeze(1) * (light.amplitude[idx] * pix_area)[:, :, None, None]
        smooth_sum[idx] = unit.sum(dim=(-2, -1)) * pix_area
        if clump_unit is not None and light.clump_counts is not None:
            clump_px = clump_unit * pix_area  # fraction of the clump flux in each pixel
            img[idx] += clump_px.unsqueeze(1) * light.clump_counts[idx][:, :, None, None]
            clump_sum[idx] = clump_px.sum(dim=(-2, -1))
    unit_total = sersic_total_flux(
        torch.ones(n, device=x.device, dtype=dtype),
        params["source_r_eff_arcsec"].to(dtype),
        params["source_n_sersic"].to(dtype),
    )
    mu_smooth = smooth_sum / unit_total
    if light.clump_counts is None:
        return img, mu_smooth
    smooth_flux, clump_flux = light.smooth_counts.sum(dim=1), light.clump_counts.sum(dim=1)
    return img, (mu_smooth * smooth_flux + clump_sum * clump_flux) / (smooth_flux + clump_flux)


def _clean_image(comps: _Components) -> torch.Tensor:
    """The noiseless image: the sum of the rendered components, clamped at 0."""
    if comps.lens is not None:
        clean = comps.lens.clone()
    else:
        assert comps.source is not None  # render_systems renders the lens or the source
        clean = torch.zeros_like(comps.source)
    if comps.companion is not None:
        clean = clean + comps.companion
    if comps.source is not None:
        clean = clean + comps.source
    return clean.clamp_min(0.0)  # FFT round-off can leave -1e-7 in empty pixels


def _render_info(
    params: Mapping[str, torch.Tensor],
    comps: _Components,
    clean: torch.Tensor,
    opts: _RenderOptions,
) -> RenderInfo:
    """Source S/N, lensed and catalogue-like magnitudes of the rendered (PSF-convolved) light."""
    n, nb, dtype, device = clean.shape[0], len(opts.band_t), opts.dtype, clean.device
    zp = opts.preset.zero_point
    sky_preset, gain = _sky_and_gain(opts, device)
    view = (1, nb, 1, 1)
    if comps.source is not None:
        var = (clean + sky_preset.view(view)) / gain.view(view) + opts.preset.read_noise_counts**2
        snr = torch.sqrt((comps.source.clamp_min(0.0) ** 2 / var).sum(dim=(-2, -1)))
        src_flux = comps.source.sum(dim=(-2, -1))
        lensed_mag = zp - 2.5 * torch.log10(src_flux.clamp_min(1e-30))
    else:
        snr = torch.zeros((n, nb), device=device, dtype=dtype)
        lensed_mag = torch.full((n, nb), float("inf"), device=device, dtype=dtype)
    # catalogue-like photometry of the lens: PSF-convolved lens + arc light in an aperture
    # about the lens centre (deblended catalogue photometry keeps arcs beyond ~1" apart)
    xp, yp = pixel_grid(opts.size_pix, opts.preset.pixel_scale_arcsec, 1, device, dtype=dtype)
    dx = xp - params["lens_center_x_arcsec"].to(dtype).view(-1, 1, 1)
    dy = yp - params["lens_center_y_arcsec"].to(dtype).view(-1, 1, 1)
    radius = opts.catalog_aperture_radius_arcsec
    aperture = (dx * dx + dy * dy <= radius**2).to(dtype).unsqueeze(1)
    sys_light = torch.zeros_like(clean)
    if comps.lens is not None:
        sys_light = sys_light + comps.lens
    if comps.source is not None:
        sys_light = sys_light + comps.source
    sys_flux = (sys_light * aperture).sum(dim=(-2, -1))
    return RenderInfo(
        bands=opts.band_t,
        source_snr=snr,
        source_snr_total=torch.sqrt((snr**2).sum(dim=1)),
        lensed_source_mag=lensed_mag,
        magnification=comps.magnification,
        system_mag=zp - 2.5 * torch.log10(sys_flux.clamp_min(1e-30)),
    )
