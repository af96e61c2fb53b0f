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

_PRESETS: dict[str, SurveyPreset] = {DES.name: DES}


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
    # Space PSFs have no atmospheric wings: a steep Moffat.
    psf_model="moffat",
    moffat_beta=4.5,
    depth_aperture_diameter_arcsec=1.3,
    read_noise_counts=0.0,
    default_bands=("vis", "y", "j", "h"),
    description='Euclid Wide MER mosaics (VIS + NISP Y/J/H on 0.1"/px, uJy, ZP 23.9)',
)
_PRESETS[EUCLID.name] = EUCLID
