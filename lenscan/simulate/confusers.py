"""Lens confusers: non-lens galaxies that lens searches actually meet among their false positives.

Each confuser is a *host* galaxy at the stamp centre plus a *feature* whose light and colour make
it look like a lens and its arc:

==================  ===========================================================================
kind                what is rendered
==================  ===========================================================================
``spiral``          red bulge + two blue logarithmic spiral arms
``ring``            red galaxy + blue (clumpy) ring of star formation, 1-3" in radius
``merger``          red galaxy + a second galaxy 1-3" away + a curved tidal tail about the pair
``blue_companions`` red galaxy + 1-3 compact blue knots 1-3" away (the classic false arc)
``edge_on_disc``    thin blue disc (axis ratio 0.07-0.25) with a small red bulge
==================  ===========================================================================

:func:`sample_confusers` draws parameters from a :class:`ConfuserPopulation` as ``(N,)``
tensors (key ``kind`` indexes :data:`CONFUSER_KINDS`); :func:`render_confusers` renders them as
``(N, band, S, S)`` counts of a survey preset, PSF-convolved, optionally with noise, and
returns catalogue-like magnitudes (host light plus the feature light within 1" of the centre,
as a deblending photometer measures them; the merger's second galaxy is its own detection).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from lenscan.simulate._draws import Draws, colours_to_mags
from lenscan.simulate.physics import (
    add_noise,
    convolve,
    downsample,
    pixel_grid,
    psf_kernel,
    psf_kernels_per_system,
    sersic_profile,
    sersic_total_flux,
)
from lenscan.simulate.presets import SurveyPreset, get_survey_preset

__all__ = [
    "CONFUSER_KINDS",
    "ConfuserPopulation",
    "render_confusers",
    "sample_confusers",
]

#: Confuser kinds, in the order of the ``kind`` index.
CONFUSER_KINDS: tuple[str, ...] = (
    "spiral",
    "ring",
    "merger",
    "blue_companions",
    "edge_on_disc",
)
_MAX_KNOTS = 3
_BANDS5 = ("g", "r", "i", "z", "y")
Range = tuple[float, float]


@dataclass
class ConfuserPopulation:
    """Parameter ranges of the confusers (each drawn uniformly unless stated).

    Attributes
    ----------
    kind_weights : mapping of str to float
        Relative frequency of each kind in :data:`CONFUSER_KINDS` (missing kinds: 0).
    host_mag_i : (float, float)
        Host total i magnitude (for ``edge_on_disc``: the disc's).
    host_r_eff_arcsec, host_n_sersic, host_q : (float, float)
        Host Sersic radius, index, axis ratio.
    feature_dmag : (float, float)
        Feature total i magnitude minus the host's (arms, ring, tail, knots; the bulge of an
        edge-on disc uses ``bulge_dmag``).
    spiral_scale_arcsec, spiral_pitch_deg, spiral_width_arcsec : (float, float)
        Exponential scale length of the arm light, arm pitch angle, arm Gaussian width.
    ring_radius_arcsec, ring_width_arcsec : (float, float)
        Ring radius and Gaussian width.
    merger_separation_arcsec, merger_dmag : (float, float)
        Distance and magnitude difference (fainter) of the second galaxy.
    tail_radius_arcsec, tail_span_deg, tail_width_arcsec : (float, float)
        Radius of curvature, angular extent and width of the tidal tail.
    knot_distance_arcsec, knot_r_eff_arcsec : (float, float)
        Distance and size of the blue knots (1 to 3 knots, uniform).
    disc_q, disc_r_eff_arcsec, bulge_dmag : (float, float)
        Edge-on disc axis ratio and radius, and its bulge's magnitude difference.
    host_g_r, host_r_i, host_i_z, host_z_y : (float, float)
        Red host colours, traversed together by a redshift-like parameter (as lens galaxies).
    blue_g_r, blue_r_i, blue_i_z, blue_z_y : (float, float)
        Colours of blue features and discs (independent).
    """

    kind_weights: Mapping[str, float] = field(
        default_factory=lambda: dict.fromkeys(CONFUSER_KINDS, 1.0)
    )
    host_mag_i: Range = (18.0, 21.5)
    host_r_eff_arcsec: Range = (0.4, 1.5)
    host_n_sersic: Range = (2.5, 4.5)
    host_q: Range = (0.6, 1.0)
    feature_dmag: Range = (0.3, 2.5)
    spiral_scale_arcsec: Range = (0.8, 2.0)
    spiral_pitch_deg: Range = (12.0, 30.0)
    spiral_width_arcsec: Range = (0.15, 0.35)
    ring_radius_arcsec: Range = (1.0, 3.0)
    ring_width_arcsec: Range = (0.12, 0.35)
    merger_separation_arcsec: Range = (1.0, 3.0)
    merger_dmag: Range = (0.0, 1.5)
    tail_radius_arcsec: Range = (1.5, 4.0)
    tail_span_deg: Range = (60.0, 150.0)
    tail_width_arcsec: Range = (0.2, 0.5)
    knot_distance_arcsec: Range = (1.0, 3.0)
    knot_r_eff_arcsec: Range = (0.05, 0.4)
    disc_q: Range = (0.07, 0.25)
    disc_r_eff_arcsec: Range = (0.8, 2.5)
    bulge_dmag: Range = (1.0, 3.0)
    host_g_r: Range = (1.3, 1.9)
    host_r_i: Range = (0.5, 0.9)
    host_i_z: Range = (0.25, 0.45)
    host_z_y: Range = (0.0, 0.15)
    blue_g_r: Range = (0.0, 0.6)
    blue_r_i: Range = (-0.1, 0.4)
    blue_i_z: Range = (-0.1, 0.3)
    blue_z_y: Range = (-0.1, 0.2)

    def __post_init__(self) -> None:
        weights = {str(k): float(v) for k, v in dict(self.kind_weights).items()}
        unknown = sorted(set(weights) - set(CONFUSER_KINDS))
        if unknown:
            raise ValueError(
                f"ConfuserPopulation.kind_weights: unknown kinds {unknown}; known: "
                f"{list(CONFUSER_KINDS)}"
            )
        if any(not math.isfinite(w) or w < 0 for w in weights.values()) or not any(
            weights.values()
        ):
            raise ValueError(
                f"ConfuserPopulation.kind_weights must be finite, >= 0 and not all 0: {weights}"
            )
        self.kind_weights = weights
        for f in fields(self):
            if f.name == "kind_weights":
                continue
            value = getattr(self, f.name)
            if not isinstance(value, tuple | list) or len(value) != 2:
                raise ValueError(f"ConfuserPopulation.{f.name} must be (low, high), got {value!r}")
            lo, hi = (float(v) for v in value)
            if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
                raise ValueError(
                    f"ConfuserPopulation.{f.name} must be finite with low <= high, got {value!r}"
                )
            positive = f.name.endswith(("_arcsec", "_q", "_n_sersic")) or f.name == "disc_q"
            if positive and lo <= 0:
                raise ValueError(f"ConfuserPopulation.{f.name} must be > 0, got {value!r}")
            if f.name in ("host_q", "disc_q") and hi > 1:
                raise ValueError(f"ConfuserPopulation.{f.name} must be <= 1, got {value!r}")
            setattr(self, f.name, (lo, hi))

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> ConfuserPopulation:
        """Build from plain data (YAML); unknown keys raise ValueError naming the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ConfuserPopulation fields {unknown}; known: {sorted(known)}")
        values: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in data.items()
        }
        return cls(**values)


def sample_confusers(
    population: ConfuserPopulation | None = None,
    n: int = 1,
    *,
    kinds: Sequence[str] | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """Draw ``n`` confusers.

    Parameters
    ----------
    population : ConfuserPopulation, optional
        Parameter ranges (default ``ConfuserPopulation()``).
    n : int
        Number of confusers (>= 1).
    kinds : sequence of str, optional
        Force these kinds (length ``n``) instead of drawing them with ``kind_weights``.
    generator : torch.Generator, optional
        Seeded generator (its device is used when ``device`` is None).
    device : torch.device or str, optional
        Device of the tensors.

    Returns
    -------
    dict of str to Tensor
        ``(n,)`` tensors: ``kind`` (int64 index into :data:`CONFUSER_KINDS`), host and feature
        parameters, ``host_mag_{band}`` and ``feature_mag_{band}`` for g, r, i, z, y,
        ``companion_mag_{band}`` (merger) and ``knot{j}_*`` (blue companions).
    """
    pop = ConfuserPopulation() if population is None else population
    if not isinstance(pop, ConfuserPopulation):
        raise TypeError(f"population must be a ConfuserPopulation, got {type(pop).__name__}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    draw = Draws(n, generator, device)
    out: dict[str, torch.Tensor] = {"kind": _draw_kinds(pop, n, kinds, generator, device)}
    red, blue2 = _sample_hosts(pop, draw, out)
    _sample_features(pop, draw, out, red, blue2)
    out["n_knots"] = torch.randint(1, _MAX_KNOTS + 1, (n,), generator=generator, device=device)
    for j in range(_MAX_KNOTS):
        d = draw.uniform(pop.knot_distance_arcsec)
        a = 2 * math.pi * draw.u()
        out[f"knot{j}_x_arcsec"] = d * torch.cos(a)
        out[f"knot{j}_y_arcsec"] = d * torch.sin(a)
        out[f"knot{j}_r_eff_arcsec"] = draw.uniform(pop.knot_r_eff_arcsec)
        out[f"knot{j}_weight"] = draw.uniform((0.3, 1.0)) * (j < out["n_knots"]).float()
    return out


def _draw_kinds(
    pop: ConfuserPopulation,
    n: int,
    kinds: Sequence[str] | None,
    generator: torch.Generator | None,
    device: torch.device | str,
) -> torch.Tensor:
    """Kind indices: ``kinds`` when given, else drawn with ``pop.kind_weights``."""
    if kinds is None:
        w = torch.tensor([pop.kind_weights.get(k, 0.0) for k in CONFUSER_KINDS], device=device)
        return torch.multinomial(w, n, replacement=True, generator=generator)
    if len(kinds) != n:
        raise ValueError(f"kinds has {len(kinds)} entries for n={n}")
    bad = sorted({k for k in kinds if k not in CONFUSER_KINDS})
    if bad:
        raise ValueError(f"unknown confuser kinds {bad}; known: {list(CONFUSER_KINDS)}")
    return torch.tensor([CONFUSER_KINDS.index(k) for k in kinds], device=device)


def _sample_hosts(
    pop: ConfuserPopulation, draw: Draws, out: dict[str, torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Host shape, position and colours, and the feature colours, into ``out``.

    Returns the red (host-like) and a second set of blue colours, which the merger companion
    chooses between.
    """
    uni, u = draw.uniform, draw.u
    out["host_mag_i"] = uni(pop.host_mag_i)
    out["host_r_eff_arcsec"] = uni(pop.host_r_eff_arcsec)
    out["host_n_sersic"] = uni(pop.host_n_sersic)
    out["host_q"] = uni(pop.host_q)
    out["host_phi_rad"] = math.pi * u()
    out["center_x_arcsec"] = 0.13 * (2 * u() - 1)
    out["center_y_arcsec"] = 0.13 * (2 * u() - 1)
    t = u()
    red = [lo + (hi - lo) * t + 0.05 * draw.normal()
           for lo, hi in (pop.host_g_r, pop.host_r_i, pop.host_i_z, pop.host_z_y)]  # fmt: skip
    blue = [uni(r) for r in (pop.blue_g_r, pop.blue_r_i, pop.blue_i_z, pop.blue_z_y)]
    blue2 = [uni(r) for r in (pop.blue_g_r, pop.blue_r_i, pop.blue_i_z, pop.blue_z_y)]
    disc = out["kind"] == CONFUSER_KINDS.index("edge_on_disc")
    # an edge-on disc: the "host" is the blue disc, the "feature" its small red bulge
    host_c = [torch.where(disc, b, r) for b, r in zip(blue, red, strict=True)]
    feat_c = [torch.where(disc, r, b) for b, r in zip(blue2, red, strict=True)]
    dmag = torch.where(disc, uni(pop.bulge_dmag), uni(pop.feature_dmag))
    for band, mag in colours_to_mags(out["host_mag_i"], *host_c).items():
        out[f"host_mag_{band}"] = mag
    for band, mag in colours_to_mags(out["host_mag_i"] + dmag, *feat_c).items():
        out[f"feature_mag_{band}"] = mag
    out["host_r_eff_arcsec"] = torch.where(
        disc, uni(pop.disc_r_eff_arcsec), out["host_r_eff_arcsec"]
    )
    out["host_n_sersic"] = torch.where(disc, torch.ones_like(t), out["host_n_sersic"])
    out["host_q"] = torch.where(disc, uni(pop.disc_q), out["host_q"])
    return red, blue2


def _sample_features(
    pop: ConfuserPopulation,
    draw: Draws,
    out: dict[str, torch.Tensor],
    red: Sequence[torch.Tensor],
    blue2: Sequence[torch.Tensor],
) -> None:
    """Feature geometry of every kind: arms, ring, merger companion and tail (into ``out``).

    Every kind draws every parameter: simple, vectorised, reproducible.
    """
    uni, u = draw.uniform, draw.u
    out["feature_q"] = uni((0.5, 1.0))  # inclination of arms / rings
    out["spiral_scale_arcsec"] = uni(pop.spiral_scale_arcsec)
    out["spiral_pitch_rad"] = torch.deg2rad(uni(pop.spiral_pitch_deg))
    out["spiral_width_arcsec"] = uni(pop.spiral_width_arcsec)
    out["feature_phase_rad"] = 2 * math.pi * u()
    out["ring_radius_arcsec"] = uni(pop.ring_radius_arcsec)
    out["ring_width_arcsec"] = uni(pop.ring_width_arcsec)
    sep = uni(pop.merger_separation_arcsec)
    pa = 2 * math.pi * u()
    out["companion_x_arcsec"] = sep * torch.cos(pa)
    out["companion_y_arcsec"] = sep * torch.sin(pa)
    out["companion_r_eff_arcsec"] = uni((0.3, 1.2))
    out["companion_n_sersic"] = uni((1.0, 4.0))
    comp_c = [torch.where(u() < 0.5, b, r) for b, r in zip(blue2, red, strict=True)]
    for band, mag in colours_to_mags(out["host_mag_i"] + uni(pop.merger_dmag), *comp_c).items():
        out[f"companion_mag_{band}"] = mag
    out["tail_radius_arcsec"] = uni(pop.tail_radius_arcsec)
    out["tail_span_rad"] = torch.deg2rad(uni(pop.tail_span_deg))
    out["tail_width_arcsec"] = uni(pop.tail_width_arcsec)


def _frame(
    x: torch.Tensor,
    y: torch.Tensor,
    cx: torch.Tensor,
    cy: torch.Tensor,
    phi: torch.Tensor,
    q: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate/stretch (N,H,W) coordinates into a host frame; returns radius and angle."""
    dx, dy = x - cx, y - cy
    c, s = torch.cos(phi), torch.sin(phi)
    xr = c * dx + s * dy
    yr = (-s * dx + c * dy) / q
    return torch.hypot(xr, yr), torch.atan2(yr, xr)


def _feature_unit(
    params: Mapping[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """Unnormalised feature surface brightness (N, H, W) for every kind (selected per row)."""

    def p(key: str) -> torch.Tensor:
        return params[key].to(x.dtype).view(-1, 1, 1)

    kind = params["kind"].view(-1, 1, 1)
    cx, cy = p("center_x_arcsec"), p("center_y_arcsec")
    r, th = _frame(x, y, cx, cy, p("host_phi_rad"), p("feature_q"))
    # two logarithmic arms: angular distance to the nearest arm, converted to a width
    pitch = p("spiral_pitch_rad")
    arm = torch.log(r.clamp_min(0.05) / 0.5) / torch.tan(pitch) + p("feature_phase_rad")
    d = torch.remainder(th - arm, math.pi)
    d = torch.minimum(d, math.pi - d)
    perp = r * d * torch.sin(pitch)
    spiral = (
        torch.exp(-0.5 * (perp / p("spiral_width_arcsec")) ** 2)
        * torch.exp(-r / p("spiral_scale_arcsec"))
        * (1 - torch.exp(-((r / 0.6) ** 2)))
    )
    ring = torch.exp(-0.5 * ((r - p("ring_radius_arcsec")) / p("ring_width_arcsec")) ** 2) * (
        1 + 0.6 * torch.cos(3 * th + p("feature_phase_rad"))
    )
    # merger: the tail curves about the midpoint of the pair, from the companion's side
    mx = cx + 0.5 * p("companion_x_arcsec")
    my = cy + 0.5 * p("companion_y_arcsec")
    rho = torch.hypot(x - mx, y - my)
    ang = torch.atan2(y - my, x - mx)
    start = torch.atan2(p("companion_y_arcsec"), p("companion_x_arcsec"))
    along = torch.remainder(ang - start, 2 * math.pi)
    window = torch.sigmoid((p("tail_span_rad") - along) / 0.15) * torch.sigmoid(along / 0.15)
    tail = (
        torch.exp(-0.5 * ((rho - p("tail_radius_arcsec")) / p("tail_width_arcsec")) ** 2)
        * window
        * torch.exp(-along)
    )

    def flat(key: str) -> torch.Tensor:
        return params[key].to(x.dtype)

    fcx, fcy = flat("center_x_arcsec"), flat("center_y_arcsec")
    knots = torch.zeros_like(r)
    for j in range(_MAX_KNOTS):
        knots = knots + p(f"knot{j}_weight") * sersic_profile(
            x, y, 1.0, flat(f"knot{j}_r_eff_arcsec"), 1.0, 1.0, 0.0,
            fcx + flat(f"knot{j}_x_arcsec"), fcy + flat(f"knot{j}_y_arcsec"),
        )  # fmt: skip
    bulge = sersic_profile(x, y, 1.0, 0.3, 3.0, 0.8, flat("host_phi_rad"), fcx, fcy)
    out = torch.where(kind == 0, spiral, torch.zeros_like(r))
    out = torch.where(kind == 1, ring, out)
    out = torch.where(kind == 2, tail, out)
    out = torch.where(kind == 3, knots, out)
    return torch.where(kind == 4, bulge, out)


def _unit_sersic(
    params: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    prefix: str,
    cx: torch.Tensor,
    cy: torch.Tensor,
) -> torch.Tensor:
    """Sersic of total flux 1 (per arcsec^2), (N, H, W)."""

    r_eff = params[f"{prefix}_r_eff_arcsec"].to(x.dtype)
    n_s = params[f"{prefix}_n_sersic"].to(x.dtype)
    q = params["host_q"].to(x.dtype) if prefix == "host" else torch.ones_like(r_eff)
    phi = params["host_phi_rad"].to(x.dtype) if prefix == "host" else torch.zeros_like(r_eff)
    sb = sersic_profile(x, y, 1.0, r_eff, n_s, q, phi, cx, cy)
    return sb / sersic_total_flux(torch.ones_like(r_eff), r_eff, n_s).view(-1, 1, 1)


def render_confusers(
    params: Mapping[str, torch.Tensor],
    preset: SurveyPreset | str,
    size_pix: int,
    *,
    bands: Sequence[str] | None = None,
    noise: bool = True,
    supersample: int = 3,
    generator: torch.Generator | None = None,
    with_companion: bool = True,
    catalog_aperture_radius_arcsec: float = 1.0,
    seeing_factor: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Render confusers as ``(N, band, S, S)`` counts of ``preset``.

    Parameters
    ----------
    params : mapping of str to Tensor
        From :func:`sample_confusers` (positions relative to the stamp centre, pixel ``S//2``).
    preset : SurveyPreset or str
        Survey (pixel scale, zero point, PSF, sky, gain).
    size_pix : int
        Stamp side ``S``.
    bands : sequence of str, optional
        Bands to render (default: the preset's default bands).
    noise : bool
        Add the preset's sky-subtracted Poisson noise.
    supersample : int
        Sub-pixels per pixel.
    generator : torch.Generator, optional
        Noise generator.
    with_companion : bool
        Render a merger's second galaxy (False when it is rendered as its own catalogue object).
    catalog_aperture_radius_arcsec : float
        Feature light within this radius of the centre blends into the host's photometry.
    seeing_factor : Tensor, optional
        ``(N,)`` or ``(N, B)`` multipliers of the preset's FWHM (as ``render_systems``).

    Returns
    -------
    images : Tensor
        ``(N, B, S, S)`` counts.
    catalog_flux : dict of str to Tensor
        ``host_flux`` ``(N, B)``: host light plus the feature light in the aperture (noiseless
        counts, what a deblending photometer assigns to the host); ``companion_flux`` ``(N,
        B)``: the merger companion's total counts (0 for other kinds).
    """
    p = get_survey_preset(preset)
    band_t = p.check_bands(bands)
    kind = params["kind"]
    n = int(kind.shape[0])
    device = kind.device
    if isinstance(supersample, bool) or not isinstance(supersample, int) or supersample < 1:
        raise ValueError(f"supersample must be a positive int, got {supersample!r}")
    x, y = pixel_grid(size_pix, p.pixel_scale_arcsec, supersample, device)
    opts = _ConfuserRender(
        p, band_t, supersample, with_companion, catalog_aperture_radius_arcsec,
        kernels=psf_kernel(p, band_t, device=device), x=x, y=y,
        xp_yp=pixel_grid(size_pix, p.pixel_scale_arcsec, 1, device),
    )  # fmt: skip
    images = torch.empty((n, len(band_t), size_pix, size_pix), device=device)
    host_flux = torch.empty((n, len(band_t)), device=device)
    comp_flux = torch.zeros((n, len(band_t)), device=device)
    block = max(1, 2**20 // x.numel())
    for a in range(0, n, block):
        sl = slice(a, min(a + block, n))
        images[sl], host_flux[sl], comp_flux[sl] = _render_confuser_block(
            {k: v[sl] for k, v in params.items()}, opts,
            None if seeing_factor is None else seeing_factor[sl],
        )  # fmt: skip
    if noise:
        images = add_noise(
            images,
            sky_counts=[p.sky_counts(b) for b in band_t],
            gain_e_per_count=[p.gain(b) for b in band_t],
            read_noise_counts=p.read_noise_counts,
            sky_subtracted=True,
            generator=generator,
        )
    return images, {"host_flux": host_flux, "companion_flux": comp_flux}


@dataclass(frozen=True)
class _ConfuserRender:
    """What :func:`render_confusers` renders every block with."""

    preset: SurveyPreset
    band_t: tuple[str, ...]
    supersample: int
    with_companion: bool
    aperture_radius_arcsec: float
    kernels: torch.Tensor  # the bands' PSFs
    x: torch.Tensor  # supersampled pixel grid (arcsec)
    y: torch.Tensor
    xp_yp: tuple[torch.Tensor, torch.Tensor]  # pixel-centre grid (arcsec)


def _render_confuser_block(
    sub: Mapping[str, torch.Tensor], opts: _ConfuserRender, seeing: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noiseless images, host catalogue flux and companion flux of one block of confusers."""
    p, x, y, ss = opts.preset, opts.x, opts.y, opts.supersample
    m = int(sub["kind"].shape[0])
    cx, cy = sub["center_x_arcsec"], sub["center_y_arcsec"]
    area = p.pixel_scale_arcsec * p.pixel_scale_arcsec
    host = downsample(_unit_sersic(sub, x, y, "host", cx, cy), ss) * area
    feat = downsample(_feature_unit(sub, x, y), ss)
    feat = feat / feat.sum(dim=(-2, -1), keepdim=True).clamp_min(1e-30)
    comp = downsample(
        _unit_sersic(
            sub, x, y, "companion",
            cx + sub["companion_x_arcsec"],
            cy + sub["companion_y_arcsec"],
        ),
        ss,
    ) * area  # fmt: skip
    is_merger = (sub["kind"] == CONFUSER_KINDS.index("merger")).float().view(-1, 1)

    def counts(prefix: str) -> torch.Tensor:
        mags = torch.stack([sub[f"{prefix}_mag_{b}"] for b in opts.band_t], dim=1)
        return 10 ** (-0.4 * (mags - p.zero_point))

    hc, fc = counts("host"), counts("feature")
    cc = counts("companion") * is_merger
    img = host[:, None] * hc[:, :, None, None] + feat[:, None] * fc[:, :, None, None]
    if opts.with_companion:
        img = img + comp[:, None] * cc[:, :, None, None]
    kernels = opts.kernels
    if seeing is not None:
        kernels = psf_kernels_per_system(p, opts.band_t, seeing.to(img.device), device=img.device)
    img = convolve(img, kernels).clamp_min(0.0)
    xp, yp = opts.xp_yp
    dx2 = (xp - cx.view(-1, 1, 1)) ** 2 + (yp - cy.view(-1, 1, 1)) ** 2
    ap = (dx2 <= opts.aperture_radius_arcsec**2).float()
    feat_in = (feat * ap).sum(dim=(-2, -1)).view(m, 1)
    return img, hc + fc * feat_in, cc
