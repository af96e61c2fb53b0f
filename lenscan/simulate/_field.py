"""Field objects of a synthetic survey: galaxies and stars, their stamps and catalogue photometry.

Pure kernels used by :func:`lenscan.simulate.make_survey`: populations with DES-like number
counts, sizes and colours (:func:`sample_field_galaxies`, :func:`sample_stars`), PSF-convolved
stamps at sub-pixel offsets (:func:`render_galaxies`, :func:`render_stars`) added into a tile
(:func:`add_light_to_tile`), and measured-like aperture photometry (:func:`measure_photometry`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from lenscan.simulate._draws import colours_to_mags
from lenscan.simulate.physics import (
    convolve,
    downsample,
    pixel_grid,
    sersic_profile,
    sersic_total_flux,
)
from lenscan.simulate.presets import SurveyPreset

__all__ = [
    "BAD_MAG",
    "STAMP_BUCKETS",
    "add_light_to_tile",
    "measure_photometry",
    "power_law_mags",
    "render_galaxies",
    "render_stars",
    "sample_field_galaxies",
    "sample_stars",
    "stamp_bucket",
]

#: Sentinel magnitude of an object too faint to measure (DES convention).
BAD_MAG = 99.0
#: Odd stamp sides of field objects (a stamp's side is the bucket above its need).
STAMP_BUCKETS = (15, 21, 31, 45, 65, 95, 129)
_FIELD_MAG_RANGE_I = (16.0, 23.5)  # range of field galaxy i magnitudes drawn
_STAR_MAG_RANGE_I = (15.5, 23.5)
_GALAXY_COUNT_SLOPE = 0.33  # d log10 N / dm of galaxy counts in i (DES-like)
_STAR_COUNT_SLOPE = 0.12
_RED_FRACTION = 0.25
_SUPERSAMPLE = 3
_BATCH = 256


def power_law_mags(
    rng: np.random.Generator, n: int, lo: float, hi: float, slope: float
) -> np.ndarray:
    """Magnitudes with cumulative counts N(<m) proportional to 10^(slope m) on [lo, hi]."""
    a, b = 10 ** (slope * lo), 10 ** (slope * hi)
    return np.log10(a + rng.random(n) * (b - a)) / slope


def sample_field_galaxies(
    rng: np.random.Generator, n: int, bands: Sequence[str]
) -> dict[str, np.ndarray]:
    mag_i = power_law_mags(rng, n, *_FIELD_MAG_RANGE_I, _GALAXY_COUNT_SLOPE)
    red = rng.random(n) < _RED_FRACTION
    t = rng.random(n)  # redshift-like parameter of the red sequence
    sc = 0.05 * rng.standard_normal((4, n))
    red_c = [0.8 + 1.1 * t, 0.35 + 0.55 * t, 0.2 + 0.3 * t, 0.0 + 0.2 * t]
    blue_c = [
        rng.uniform(0.2, 0.8, n),
        rng.uniform(0.0, 0.5, n),
        rng.uniform(-0.1, 0.3, n),
        rng.uniform(-0.1, 0.2, n),
    ]
    colours = [np.where(red, rc + s, bc) for rc, bc, s in zip(red_c, blue_c, sc, strict=True)]
    mags = colours_to_mags(mag_i, *colours)
    size_scatter = 10 ** (rng.normal(0.0, 0.15, n))
    r_eff = np.where(
        red,
        0.6 * 10 ** (-0.15 * (mag_i - 21.0)),
        0.75 * 10 ** (-0.12 * (mag_i - 21.0)),
    )
    out = {
        "mag_true_i": mag_i,
        "red": red,
        "r_eff_arcsec": np.clip(r_eff * size_scatter, 0.08, 5.0),
        "n_sersic": np.where(red, rng.uniform(3.0, 5.0, n), rng.uniform(0.7, 1.5, n)),
        "q": np.where(red, rng.uniform(0.5, 1.0, n), rng.uniform(0.25, 1.0, n)),
        "phi_rad": rng.uniform(0.0, math.pi, n),
    }
    for b in bands:
        out[f"mag_true_{b}"] = mags[b]
    return out


def sample_stars(rng: np.random.Generator, n: int, bands: Sequence[str]) -> dict[str, np.ndarray]:
    mag_i = power_law_mags(rng, n, *_STAR_MAG_RANGE_I, _STAR_COUNT_SLOPE)
    g_r = rng.uniform(0.25, 1.45, n)
    # A rough stellar locus: r-i rises slowly, then steeply for M dwarfs (g-r > 1.3).
    r_i = 0.05 + 0.35 * g_r + np.where(g_r > 1.3, 4.0 * (g_r - 1.3), 0.0)
    mags = colours_to_mags(mag_i, g_r, r_i, 0.45 * r_i, 0.2 * r_i)
    return {f"mag_true_{b}": mags[b] for b in bands} | {"mag_true_i": mag_i}


def stamp_bucket(size: np.ndarray) -> np.ndarray:
    idx = np.searchsorted(np.asarray(STAMP_BUCKETS), size)
    return np.asarray(STAMP_BUCKETS)[np.minimum(idx, len(STAMP_BUCKETS) - 1)]


def add_light_to_tile(tile: np.ndarray, stamps: np.ndarray, ix: np.ndarray, iy: np.ndarray) -> None:
    """Add ``stamps`` (n, B, S, S) into ``tile`` (B, H, W) with pixel S//2 at (ix, iy)."""
    _, h, w = tile.shape
    s = stamps.shape[-1]
    half = s // 2
    for k in range(len(ix)):
        x0, y0 = int(ix[k]) - half, int(iy[k]) - half
        xa, xb = max(x0, 0), min(x0 + s, w)
        ya, yb = max(y0, 0), min(y0 + s, h)
        if xa >= xb or ya >= yb:
            continue
        tile[:, ya:yb, xa:xb] += stamps[k, :, ya - y0 : yb - y0, xa - x0 : xb - x0]


def render_galaxies(
    gal: Mapping[str, np.ndarray],
    dx: np.ndarray,
    dy: np.ndarray,
    preset: SurveyPreset,
    bands: Sequence[str],
    kernels: torch.Tensor,
    size_pix: int,
) -> np.ndarray:
    """PSF-convolved Sersic stamps (n, B, S, S) in counts, centred at offsets (dx, dy) pixels."""
    n = len(dx)
    scale = preset.pixel_scale_arcsec
    x, y = pixel_grid(size_pix, scale, _SUPERSAMPLE)
    out = np.empty((n, len(bands), size_pix, size_pix), dtype=np.float32)
    for a in range(0, n, _BATCH):
        sl = slice(a, min(a + _BATCH, n))
        r_eff = torch.as_tensor(gal["r_eff_arcsec"][sl], dtype=torch.float32)
        n_s = torch.as_tensor(gal["n_sersic"][sl], dtype=torch.float32)
        unit = sersic_profile(
            x,
            y,
            1.0,
            r_eff,
            n_s,
            torch.as_tensor(gal["q"][sl], dtype=torch.float32),
            torch.as_tensor(gal["phi_rad"][sl], dtype=torch.float32),
            torch.as_tensor(dx[sl] * scale, dtype=torch.float32),
            torch.as_tensor(dy[sl] * scale, dtype=torch.float32),
        )
        # Pixel fraction of the total flux: mean surface brightness x pixel area / total.
        unit = downsample(unit, _SUPERSAMPLE) * (scale * scale)
        unit = unit / sersic_total_flux(torch.ones_like(r_eff), r_eff, n_s)[:, None, None]
        flux = torch.as_tensor(
            np.stack(
                [10 ** (-0.4 * (gal[f"mag_true_{b}"][sl] - preset.zero_point)) for b in bands], 1
            ),
            dtype=torch.float32,
        )
        imgs = unit[:, None] * flux[:, :, None, None]
        out[sl] = convolve(imgs, kernels).clamp_min(0.0).numpy()
    return out


def render_stars(
    stars: Mapping[str, np.ndarray],
    dx: np.ndarray,
    dy: np.ndarray,
    preset: SurveyPreset,
    bands: Sequence[str],
    size_pix: int,
) -> np.ndarray:
    """The preset's PSF (Moffat or Gaussian, pixel-integrated) at sub-pixel offsets, in counts.

    Same profile and normalisation (sum 1 over the stamp) as
    :func:`lenscan.simulate.physics.psf_kernel_from_fwhm`, but centred at ``(dx, dy)``.
    """
    ss = 5
    scale = preset.pixel_scale_arcsec
    x, y = pixel_grid(size_pix, scale, ss)
    n = len(dx)
    out = np.empty((n, len(bands), size_pix, size_pix), dtype=np.float32)
    cx = torch.as_tensor(dx * scale, dtype=torch.float32)[:, None, None]
    cy = torch.as_tensor(dy * scale, dtype=torch.float32)[:, None, None]
    for bi, band in enumerate(bands):
        fwhm = preset.seeing_for(band)
        for a in range(0, n, _BATCH):
            sl = slice(a, min(a + _BATCH, n))
            r2 = (x - cx[sl]) ** 2 + (y - cy[sl]) ** 2
            if preset.psf_model == "gaussian":
                sigma = fwhm / (2 * math.sqrt(2 * math.log(2)))
                prof = torch.exp(-0.5 * r2 / sigma**2)
            else:
                beta = preset.moffat_beta
                alpha = fwhm / (2 * math.sqrt(2 ** (1 / beta) - 1))
                prof = torch.pow(1 + r2 / alpha**2, -beta)
            prof = downsample(prof, ss)
            prof = prof / prof.sum(dim=(-2, -1), keepdim=True)
            flux = 10 ** (-0.4 * (stars[f"mag_true_{band}"][sl] - preset.zero_point))
            out[sl, bi] = (prof * torch.as_tensor(flux, dtype=torch.float32)[:, None, None]).numpy()
    return out


def measure_photometry(
    rng: np.random.Generator,
    flux: np.ndarray,
    radius_arcsec: np.ndarray,
    preset: SurveyPreset,
    band: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Noisy aperture photometry: (mag, magerr, snr). Unmeasurable fluxes get mag 99.

    The variance is that of the preset's background inside an aperture of ``radius_arcsec``
    plus the object's own Poisson noise, so a point source at the 10-sigma depth in the depth
    aperture gets S/N ~ 10.
    """
    area_pix = math.pi * radius_arcsec**2 / preset.pixel_scale_arcsec**2
    var = area_pix * preset.pixel_noise_sigma(band) ** 2 + np.maximum(flux, 0) / preset.gain(band)
    sigma = np.sqrt(var)
    measured = flux + sigma * rng.standard_normal(len(flux))
    ok = measured > 0
    mag = np.full(len(flux), BAD_MAG, dtype=np.float32)
    err = np.full(len(flux), BAD_MAG, dtype=np.float32)
    mag[ok] = preset.zero_point - 2.5 * np.log10(measured[ok])
    err[ok] = 2.5 / math.log(10) * sigma[ok] / measured[ok]
    return mag, err, flux / sigma
