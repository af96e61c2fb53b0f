"""Survey presets for the simulator: pixel scale, bands, seeing, sky, depth, noise as data.

The noise of a preset is fixed by its published depth, not guessed: for each band the effective
gain ``g`` (electrons per count, which for a coadd absorbs the number of exposures) is chosen so
that a point source whose *aperture* magnitude equals the 10-sigma depth has S/N = 10 in the
depth aperture (diameter ``depth_aperture_diameter_arcsec``). With

* ``F = 10^(-0.4 (m_10 - ZP))`` the source counts inside the aperture,
* ``s = 10^(-0.4 (mu_sky - ZP)) p^2`` the sky counts per pixel (``p`` the pixel scale),
* ``A = pi (d/2)^2 / p^2`` the aperture area in pixels, ``r`` the read noise (counts),

the aperture variance is ``A (s/g + r^2) + F/g`` and S/N = 10 gives

    ``g = (A s + F) / ((F/10)^2 - A r^2)``.

:func:`gain_for_depth` implements this; ``SurveyPreset`` derives the gains when they are not
given. For DES DR2 this gives g ~ 28, r ~ 36, i ~ 25, z ~ 16, Y ~ 3.6 e-/count (sky noise per
pixel of ~2.0, 2.6, 4.6, 8.7, 32 counts). DES coadds are sky subtracted; the simulator therefore
draws the sky's Poisson noise and subtracts its mean (see
:func:`lenscan.simulate.physics.add_noise`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = [
    "SurveyPreset",
    "check_seeing_factor_range",
    "gain_for_depth",
    "get_survey_preset",
    "list_survey_presets",
    "sky_counts_per_pixel",
]


def sky_counts_per_pixel(
    sky_mag_per_arcsec2: float, zero_point: float, pixel_scale_arcsec: float
) -> float:
    """Sky counts per pixel from the sky surface brightness (mag/arcsec^2)."""
    return 10 ** (-0.4 * (sky_mag_per_arcsec2 - zero_point)) * pixel_scale_arcsec**2


def gain_for_depth(
    *,
    depth_mag_10sigma: float,
    sky_mag_per_arcsec2: float,
    zero_point: float,
    pixel_scale_arcsec: float,
    aperture_diameter_arcsec: float,
    read_noise_counts: float = 0.0,
) -> float:
    """Effective gain (e-/count) giving S/N = 10 for an aperture magnitude at the 10-sigma depth.

    See the module docstring for the derivation. Raises ValueError when the read noise alone
    already exceeds the depth's noise budget.
    """
    flux = 10 ** (-0.4 * (depth_mag_10sigma - zero_point))
    sky = sky_counts_per_pixel(sky_mag_per_arcsec2, zero_point, pixel_scale_arcsec)
    area_pix = math.pi * (aperture_diameter_arcsec / 2) ** 2 / pixel_scale_arcsec**2
    budget = (flux / 10) ** 2 - area_pix * read_noise_counts**2
    if budget <= 0:
        raise ValueError(
            f"read_noise_counts={read_noise_counts} alone exceeds the noise allowed by "
            f"depth_mag_10sigma={depth_mag_10sigma}; lower the read noise"
        )
    return (area_pix * sky + flux) / budget


def check_seeing_factor_range(value: Any, what: str) -> tuple[float, float] | None:
    """``value`` as a (low, high) seeing-factor range with 0 < low <= high, or None.

    Raises ValueError starting with ``what`` otherwise.
    """
    if value is None:
        return None
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be (low, high) or None, got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi):
        raise ValueError(f"{what} must be (low, high) with 0 < low <= high, got {value!r}")
    return (lo, hi)


def _frozen(mapping: Mapping[str, float]) -> Mapping[str, float]:
    return MappingProxyType({str(k).lower(): float(v) for k, v in mapping.items()})


@dataclass(frozen=True)
class SurveyPreset:
    """Imaging properties of a survey, used to render simulated stamps in its counts.

    Attributes
    ----------
    name : str
        Preset name (lower case).
    pixel_scale_arcsec : float
        Pixel scale.
    bands : tuple of str
        All bands of the survey (lower case).
    zero_point : float
        Photometric zero point: ``mag = zero_point - 2.5 log10(counts)`` (AB).
    seeing_fwhm_arcsec : Mapping[str, float]
        PSF FWHM per band.
    sky_mag_per_arcsec2 : Mapping[str, float]
        Sky surface brightness per band.
    depth_mag_10sigma : Mapping[str, float]
        10-sigma limiting aperture magnitude per band.
    psf_model : {"moffat", "gaussian"}
        PSF profile.
    moffat_beta : float
        Moffat index.
    depth_aperture_diameter_arcsec : float
        Aperture in which ``depth_mag_10sigma`` is quoted.
    read_noise_counts : float
        Gaussian read noise per pixel (counts). For coadds this is 0: the read noise of the
        single exposures is part of the effective sky noise fixed by the depth.
    gain_e_per_count : Mapping[str, float] or None
        Effective gain per band; derived from the depth with :func:`gain_for_depth` when None.
    default_bands : tuple of str
        Bands rendered when a caller does not choose (the scoring bands).
    seeing_spread : float
        Tile-to-tile scatter of the seeing: a synthetic survey
        (:func:`lenscan.simulate.make_survey`) multiplies every band's FWHM of a tile by
        ``exp(seeing_spread * t)``, ``t`` a standard normal clipped to +-2, keeping the pixel
        noise of the preset. 0 (the default) renders every tile at the median seeing.
    seeing_factor_range : (float, float) or None
        The range synthetic surveys and training sets draw each tile's (stamp's) seeing factor
        from by default (``make_survey(seeing_factor_range="preset")``): 0.85-1.35 for
        ground-based surveys, whose seeing varies from night to night; None (fixed PSF, or
        ``seeing_spread``) for a space telescope.
    """

    name: str
    pixel_scale_arcsec: float
    bands: tuple[str, ...]
    zero_point: float
    seeing_fwhm_arcsec: Mapping[str, float]
    sky_mag_per_arcsec2: Mapping[str, float]
    depth_mag_10sigma: Mapping[str, float]
    psf_model: str = "moffat"
    moffat_beta: float = 3.0
    depth_aperture_diameter_arcsec: float = 1.95
    read_noise_counts: float = 0.0
    gain_e_per_count: Mapping[str, float] | None = None
    default_bands: tuple[str, ...] = ()
    seeing_spread: float = 0.0
    seeing_factor_range: tuple[float, float] | None = (0.85, 1.35)
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen dataclass: normalise fields once, here
        set_(self, "name", str(self.name).lower())
        bands = tuple(str(b).lower() for b in self.bands)
        if not bands or len(set(bands)) != len(bands):
            raise ValueError(
                f"preset {self.name!r}: bands must be non-empty and unique, got {bands}"
            )
        set_(self, "bands", bands)
        for attr in ("pixel_scale_arcsec", "zero_point", "moffat_beta"):
            value = float(getattr(self, attr))
            if not math.isfinite(value) or (attr != "zero_point" and value <= 0):
                raise ValueError(
                    f"preset {self.name!r}: {attr} must be finite and > 0, got {value}"
                )
            set_(self, attr, value)
        if self.psf_model not in ("moffat", "gaussian"):
            raise ValueError(f"preset {self.name!r}: psf_model must be 'moffat' or 'gaussian'")
        if self.read_noise_counts < 0:
            raise ValueError(f"preset {self.name!r}: read_noise_counts must be >= 0")
        if not (math.isfinite(self.seeing_spread) and 0 <= self.seeing_spread < 1):
            raise ValueError(f"preset {self.name!r}: seeing_spread must be in [0, 1)")
        set_(self, "seeing_factor_range", check_seeing_factor_range(
            self.seeing_factor_range, f"preset {self.name!r}: seeing_factor_range"
        ))  # fmt: skip
        for attr in ("seeing_fwhm_arcsec", "sky_mag_per_arcsec2", "depth_mag_10sigma"):
            mapping = _frozen(getattr(self, attr))
            missing = [b for b in bands if b not in mapping]
            if missing:
                raise ValueError(f"preset {self.name!r}: {attr} lacks bands {missing}")
            if not all(math.isfinite(v) for v in mapping.values()):
                raise ValueError(f"preset {self.name!r}: {attr} has non-finite values")
            set_(self, attr, mapping)
        if self.gain_e_per_count is None:
            gains = {
                b: gain_for_depth(
                    depth_mag_10sigma=self.depth_mag_10sigma[b],
                    sky_mag_per_arcsec2=self.sky_mag_per_arcsec2[b],
                    zero_point=self.zero_point,
                    pixel_scale_arcsec=self.pixel_scale_arcsec,
                    aperture_diameter_arcsec=self.depth_aperture_diameter_arcsec,
                    read_noise_counts=self.read_noise_counts,
                )
                for b in bands
            }
        else:
            gains = dict(self.gain_e_per_count)
        set_(self, "gain_e_per_count", _frozen(gains))
        default = tuple(str(b).lower() for b in (self.default_bands or bands))
        set_(self, "default_bands", self.check_bands(default))

    # ----------------------------------------------------------------------------------
    def check_bands(self, bands: Iterable[str] | str | None) -> tuple[str, ...]:
        """Return ``bands`` as a tuple (``default_bands`` for None).

        Raises ValueError naming an unknown band and listing the known ones.
        """
        if bands is None:
            return self.default_bands
        if isinstance(bands, str):
            bands = (bands,)
        out = tuple(bands)
        if not out:
            raise ValueError("bands must not be empty")
        for b in out:
            if not isinstance(b, str) or b not in self.bands:
                raise ValueError(
                    f"unknown band {b!r} for survey preset {self.name!r}; known bands: "
                    f"{', '.join(self.bands)}"
                )
        return out

    def seeing_for(self, band: str) -> float:
        """PSF FWHM (arcsec) in ``band``."""
        return self.seeing_fwhm_arcsec[self.check_bands(band)[0]]

    def sky_counts(self, band: str) -> float:
        """Sky counts per pixel in ``band`` (before sky subtraction)."""
        b = self.check_bands(band)[0]
        return sky_counts_per_pixel(
            self.sky_mag_per_arcsec2[b], self.zero_point, self.pixel_scale_arcsec
        )

    def gain(self, band: str) -> float:
        """Effective gain (e-/count) in ``band``."""
        gains = self.gain_e_per_count
        if gains is None:  # __post_init__ fills it in; a frozen preset keeps it
            raise ValueError(f"preset {self.name!r} has no gain_e_per_count")
        return gains[self.check_bands(band)[0]]

    def pixel_noise_sigma(self, band: str) -> float:
        """Background noise sigma per pixel (counts) in ``band``: ``sqrt(sky/gain + read^2)``."""
        return math.sqrt(self.sky_counts(band) / self.gain(band) + self.read_noise_counts**2)

    def with_seeing_factor(self, factor: float | Mapping[str, float]) -> SurveyPreset:
        """A copy whose seeing is ``factor`` times this one's, same pixel noise.

        ``factor`` is one number for every band, or a mapping band -> factor (bands left out
        keep their seeing).
        """
        factors = (
            {b: float(factor.get(b, 1.0)) for b in self.seeing_fwhm_arcsec}
            if isinstance(factor, Mapping)
            else dict.fromkeys(self.seeing_fwhm_arcsec, factor)
        )
        for f in factors.values():
            if not (isinstance(f, int | float) and math.isfinite(f) and f > 0):
                raise ValueError(f"seeing factor must be finite and > 0, got {factor!r}")
        return dataclasses.replace(
            self,
            seeing_fwhm_arcsec={b: v * factors[b] for b, v in self.seeing_fwhm_arcsec.items()},
            gain_e_per_count=dict(self.gain_e_per_count or {}),
        )

    def replace(self, **changes: Any) -> SurveyPreset:
        """A copy with some fields changed (gains re-derived unless given)."""
        if "gain_e_per_count" not in changes:
            changes["gain_e_per_count"] = None
        return dataclasses.replace(self, **changes)


DES = SurveyPreset(
    name="des",
    pixel_scale_arcsec=0.263,
    bands=("g", "r", "i", "z", "y"),
    zero_point=30.0,
    # DES DR2 (Abbott et al. 2021) median PSF FWHM per band.
    seeing_fwhm_arcsec={"g": 1.11, "r": 0.95, "i": 0.88, "z": 0.83, "y": 0.90},
    # Typical dark-time sky at CTIO (mag/arcsec^2).
    sky_mag_per_arcsec2={"g": 22.0, "r": 21.1, "i": 20.3, "z": 19.4, "y": 18.2},
    # DES DR2 median 10-sigma depth in a 1.95" diameter aperture.
    depth_mag_10sigma={"g": 24.7, "r": 24.4, "i": 23.8, "z": 23.1, "y": 21.7},
    psf_model="moffat",
    moffat_beta=3.0,
    depth_aperture_diameter_arcsec=1.95,
    read_noise_counts=0.0,
    default_bands=("g", "r", "i"),
    description='Dark Energy Survey DR2 coadds (0.263"/px, ZP 30, sky subtracted)',
)


def _seeing_by_wavelength(fwhm_r: float, bands: tuple[str, ...]) -> dict[str, float]:
    """Per-band FWHM from the r-band one, scaled as lambda^-0.2 (Kolmogorov seeing)."""
    return {b: round(fwhm_r * (_LAMBDA_NM["r"] / _LAMBDA_NM[b]) ** 0.2, 3) for b in bands}


def _depth_10sigma(
    m5_psf: Mapping[str, float], fwhm: Mapping[str, float], aperture_arcsec: float
) -> dict[str, float]:
    """10-sigma depths in one aperture equivalent to 5-sigma point-source (PSF) depths.

    A PSF-photometry depth ``m5`` in a band of seeing FWHM ``w`` fixes the pixel noise: the
    PSF's noise-equivalent area is ``2.266 w^2`` (Gaussian), so ``sigma_pix = F5 / (5
    sqrt(NEA))``. The 10-sigma depth in an aperture of area ``A`` with that pixel noise is
    ``m5 - 2.5 log10(2 sqrt(A / NEA))``.
    """
    area = math.pi * (aperture_arcsec / 2) ** 2
    return {
        b: round(m5 - 2.5 * math.log10(2.0 * math.sqrt(area / (2.266 * fwhm[b] ** 2))), 4)
        for b, m5 in m5_psf.items()
    }


# Effective wavelengths (nm) of the LSST / HSC ugrizy filters.
_LAMBDA_NM = {"u": 367.0, "g": 482.0, "r": 622.0, "i": 755.0, "z": 869.0, "y": 971.0}
# Depth apertures: 2" (LSST), 1.5" (HSC); any aperture gives the same pixel noise.
_LSST_APERTURE = 2.0
_HSC_APERTURE = 1.5
_HSC_SEEING = {"g": 0.77, "r": 0.76, "i": 0.58, "z": 0.68, "y": 0.68}

LSST = SurveyPreset(
    name="lsst",
    pixel_scale_arcsec=0.2,
    bands=("u", "g", "r", "i", "z", "y"),
    # deep_coadd pixels are nJy: AB = 31.4 - 2.5 log10(f).
    zero_point=31.4,
    # DP1 paper (Rubin Observatory, RTN-095, arXiv:2603.23786): median PSF FWHM ~1.14" over
    # all bands; per band as lambda^-0.2 about r = 1.1". Tiles scatter by ~15% (DP1 coadds
    # take visits up to 1.7").
    seeing_fwhm_arcsec=_seeing_by_wavelength(1.1, ("u", "g", "r", "i", "z", "y")),
    seeing_spread=0.15,
    # Dark sky at Cerro Pachon, Ivezic et al. 2019 (ApJ 873, 111) Table 2.
    sky_mag_per_arcsec2={"u": 23.0, "g": 22.3, "r": 21.2, "i": 20.5, "z": 19.6, "y": 18.6},
    # 5-sigma point-source coadd depths of DP1's deepest field (ECDFS), other DP1 fields up to
    # ~2 mag shallower; this is also LSST's depth after ~1-2 years (Ivezic et al. 2019 Table 1:
    # 10-year u 26.1, g 27.4, r 27.5, i 26.8, z 26.1, y 24.9); stored as 10-sigma depths in a
    # 2" aperture at each band's seeing (_depth_10sigma).
    depth_mag_10sigma=_depth_10sigma(
        {"u": 24.6, "g": 26.2, "r": 26.0, "i": 25.7, "z": 25.1, "y": 23.1},
        _seeing_by_wavelength(1.1, ("u", "g", "r", "i", "z", "y")),
        _LSST_APERTURE,
    ),
    psf_model="moffat",
    moffat_beta=3.0,
    depth_aperture_diameter_arcsec=_LSST_APERTURE,
    read_noise_counts=0.0,
    default_bands=("g", "r", "i"),
    description='Rubin LSST / DP1 deep_coadd (0.2"/px, nJy pixels: ZP 31.4, sky subtracted)',
)

HSC = SurveyPreset(
    name="hsc",
    pixel_scale_arcsec=0.168,
    bands=("g", "r", "i", "z", "y"),
    # HSC-SSP coadds: AB = 27.0 - 2.5 log10(counts) (Aihara et al. 2018, PASJ 70, S8).
    zero_point=27.0,
    # HSC-SSP Wide median seeing (Aihara et al. 2018 Table 6; 2022 PDR3, PASJ 74, 247):
    # i is observed in the best conditions for weak lensing.
    seeing_fwhm_arcsec=_HSC_SEEING,
    seeing_spread=0.12,
    # Dark sky at Maunakea in the HSC filters.
    sky_mag_per_arcsec2={"g": 22.0, "r": 21.1, "i": 20.2, "z": 19.2, "y": 18.1},
    # HSC-SSP Wide 5-sigma point-source depths (Aihara et al. 2018, 2022), stored as 10-sigma
    # depths in a 1.5" aperture at each band's seeing (_depth_10sigma).
    depth_mag_10sigma=_depth_10sigma(
        {"g": 26.5, "r": 26.5, "i": 26.2, "z": 25.2, "y": 24.4}, _HSC_SEEING, _HSC_APERTURE
    ),
    psf_model="moffat",
    moffat_beta=3.0,
    depth_aperture_diameter_arcsec=_HSC_APERTURE,
    read_noise_counts=0.0,
    default_bands=("g", "r", "i"),
    description='HSC-SSP Wide coadds (0.168"/px, ZP 27, sky subtracted)',
)

_PRESETS: dict[str, SurveyPreset] = {p.name: p for p in (DES, LSST, HSC)}


def list_survey_presets() -> list[str]:
    """Names of the known survey presets, sorted."""
    return sorted(_PRESETS)


def get_survey_preset(name: str | SurveyPreset = "des") -> SurveyPreset:
    """Return the survey preset called ``name`` (case-insensitive); a preset passes through.

    Raises
    ------
    ValueError
        For an unknown name, listing the known presets.

    Examples
    --------
    >>> des = get_survey_preset("des")
    >>> des.pixel_scale_arcsec, des.default_bands
    (0.263, ('g', 'r', 'i'))
    >>> round(des.pixel_noise_sigma("i"), 2)
    4.57
    """
    if isinstance(name, SurveyPreset):
        return name
    if not isinstance(name, str):
        raise TypeError(f"preset must be a name (str) or a SurveyPreset, got {type(name).__name__}")
    try:
        return _PRESETS[name.lower()]
    except KeyError:
        raise ValueError(
            f"unknown survey preset {name!r}; known presets: {', '.join(list_survey_presets())}"
        ) from None


# Euclid (a separate block, registered below, so that other surveys' presets merge cleanly).
EUCLID = SurveyPreset(
    name="euclid",
    pixel_scale_arcsec=0.1,
    bands=("vis", "y", "j", "h"),
    # MER mosaics are in uJy-scaled units: AB = 23.9 - 2.5 log10(f).
    zero_point=23.9,
    # VIS PSF FWHM ~0.17" (Euclid Collaboration: Cropper et al. 2025); NISP Y/J/H as MER
    # resamples them onto the VIS 0.1" grid, ~0.45-0.5" (Jahnke et al. 2025).
    seeing_fwhm_arcsec={"vis": 0.17, "y": 0.46, "j": 0.48, "h": 0.50},
    # Zodiacal light at L2 away from the ecliptic (Scaramella et al. 2022): ~22.3 (VIS),
    # ~22.4 AB/arcsec^2 in the NISP bands.
    sky_mag_per_arcsec2={"vis": 22.3, "y": 22.4, "j": 22.4, "h": 22.4},
    # Wide-survey depths (Scaramella et al. 2022): VIS 24.5 AB at 10 sigma for an extended
    # source (1.3" aperture); NISP 24.0 AB at 5 sigma for point sources, i.e. ~23.25 at 10 sigma.
    depth_mag_10sigma={"vis": 24.5, "y": 23.25, "j": 23.25, "h": 23.25},
    # Space PSFs have no atmospheric wings: a steep Moffat; and no night-to-night seeing.
    psf_model="moffat",
    moffat_beta=4.5,
    seeing_factor_range=None,
    depth_aperture_diameter_arcsec=1.3,
    read_noise_counts=0.0,
    default_bands=("vis", "y", "j", "h"),
    description='Euclid Wide MER mosaics (VIS + NISP Y/J/H on 0.1"/px, uJy, ZP 23.9)',
)
_PRESETS[EUCLID.name] = EUCLID
