"""Batched strong-lens physics in torch: SIE + shear deflection, Sersic light, PSF, noise.

Pure kernels (tensors in, tensors out, no I/O). Every function works on CPU or GPU, in float32
(production) or float64 (validation), and is vectorised over a batch of ``N`` systems: per-system
parameters are tensors of shape ``(N,)`` (or Python floats), coordinate grids are ``(H, W)``
(shared by the batch) or ``(N, H, W)``; results are ``(N, H, W)``.

Conventions (identical to lenstronomy, against which the tests validate):

* Coordinates are angles in arcsec; ``x`` grows with the column index and ``y`` with the row
  index of an image ``(y, x)``.
* Ellipticity: axis ratio ``q = b/a`` in ``(0, 1]`` and position angle ``phi`` (radian, major
  axis measured from +x towards +y). lenstronomy's ``e1, e2`` map as ``q = (1-|e|)/(1+|e|)``,
  ``phi = arctan2(e2, e1)/2`` (:func:`ellipticity_to_q_phi`, :func:`q_phi_to_ellipticity`).
* SIE (lenstronomy ``SIE``): ``theta_e`` is the product-averaged Einstein radius, convergence
  ``kappa = theta_e / (2 sqrt(q x'^2 + y'^2/q))`` in the frame of the major axis; analytic
  deflection of Kormann et al. (1994) / Keeton & Kochanek (1998).
* External shear (lenstronomy ``SHEAR``): ``alpha = (g1 x + g2 y, g2 x - g1 y)``.
* Sersic (lenstronomy ``SERSIC_ELLIPSE`` with its default product-average convention):
  ``I(R) = amplitude * exp(-b_n [(R/r_eff)^(1/n) - 1])`` with ``R = sqrt(q x'^2 + y'^2/q)``
  and lenstronomy's ``b_n = 1.9992 n - 0.3271``. The total flux is then exactly
  ``2 pi n r_eff^2 e^{b_n} b_n^{-2n} Gamma(2n) amplitude`` (the product-average radius keeps
  the area element, so no factor ``q``), see :func:`sersic_total_flux`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from lenscan.simulate.presets import SurveyPreset

__all__ = [
    "add_noise",
    "convolve",
    "downsample",
    "ellipticity_to_q_phi",
    "fft_size",
    "gaussian_kernel",
    "gaussian_light",
    "magnitude_to_counts",
    "moffat_kernel",
    "pixel_grid",
    "psf_kernel",
    "psf_kernel_from_fwhm",
    "psf_kernels_per_system",
    "q_phi_to_ellipticity",
    "ray_shoot",
    "ray_shoot_lens_frame",
    "sersic_amplitude_from_flux",
    "sersic_b_n",
    "sersic_profile",
    "sersic_total_flux",
    "shear_deflection",
    "sie_deflection",
    "to_lens_frame_params",
]

# Innermost radius (arcsec) at which the Sersic cusp is evaluated; the same floor as
# lenstronomy's ``SersicUtil(smoothing=1e-4)`` so the validation compares like with like.
_SERSIC_R_FLOOR = 1e-4
# Smallest sqrt(1 - q^2) used in the SIE formulae: below it the q -> 1 limit is reached to
# better than 1e-8 relative, and the division stays finite for a round lens (q == 1).
_SIE_MIN_ECC = 1e-4
# Smallest elliptical radius in the SIE formulae (keeps 0/0 at the lens centre finite).
_SIE_R_FLOOR = 1e-12


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def _param(value: torch.Tensor | float, like: torch.Tensor, name: str) -> torch.Tensor:
    """Return ``value`` as a tensor on ``like``'s device/dtype, shaped to broadcast on (N, H, W)."""
    t = torch.as_tensor(value, device=like.device, dtype=like.dtype)
    if t.ndim > 1:
        raise ValueError(
            f"{name} must be a scalar or a 1-D tensor of shape (N,), got {tuple(t.shape)}"
        )
    if t.ndim == 1:
        t = t.view(-1, 1, 1)
    return t


def _require_finite(t: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ValueError(
            f"{name} contains non-finite values (NaN or inf); all values must be finite"
        )


def _require_range(
    t: torch.Tensor,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
) -> None:
    """Raise ValueError naming ``name`` when ``t`` is non-finite or outside [low, high]."""
    _require_finite(t, name)
    if low is not None:
        bad = (t <= low) if low_open else (t < low)
        if bool(bad.any()):
            rel = ">" if low_open else ">="
            raise ValueError(f"{name} must be {rel} {low}; got min {float(t.min()):.6g}")
    if high is not None and bool((t > high).any()):
        raise ValueError(f"{name} must be <= {high}; got max {float(t.max()):.6g}")


def _common_tensors(*values: torch.Tensor | float) -> list[torch.Tensor]:
    """Tensors of a common floating dtype/device; Python numbers take the tensors' dtype."""
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    device = tensors[0].device if tensors else None
    wide = any(t.dtype == torch.float64 for t in tensors)
    dtype = torch.float64 if wide else torch.get_default_dtype()
    return [torch.as_tensor(v, dtype=dtype, device=device) for v in values]


def _coords(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError("x and y must be torch tensors (use pixel_grid to make them)")
    if x.shape != y.shape:
        raise ValueError(
            f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.ndim not in (2, 3):
        raise ValueError(f"x and y must be (H, W) or (N, H, W), got {x.ndim} dimensions")
    return x, y


def ellipticity_to_q_phi(
    e1: torch.Tensor | float, e2: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert lenstronomy ellipticity ``(e1, e2)`` to axis ratio and position angle.

    Parameters
    ----------
    e1, e2 : Tensor or float
        Ellipticity components, ``|e| < 1``.

    Returns
    -------
    q, phi : Tensor
        ``q = (1 - |e|) / (1 + |e|)`` and ``phi = arctan2(e2, e1) / 2`` (radian).
    """
    e1 = torch.as_tensor(e1)
    e2 = torch.as_tensor(e2, dtype=e1.dtype, device=e1.device)
    c = torch.sqrt(e1 * e1 + e2 * e2)
    return (1 - c) / (1 + c), torch.atan2(e2, e1) / 2


def q_phi_to_ellipticity(
    q: torch.Tensor | float, phi: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert axis ratio and position angle to lenstronomy ellipticity ``(e1, e2)``.

    Parameters
    ----------
    q : Tensor or float
        Axis ratio in ``(0, 1]``.
    phi : Tensor or float
        Position angle of the major axis (radian, from +x towards +y).

    Returns
    -------
    e1, e2 : Tensor
        ``|e| = (1 - q)/(1 + q)``, ``e1 = |e| cos 2 phi``, ``e2 = |e| sin 2 phi``.
    """
    q = torch.as_tensor(q)
    phi = torch.as_tensor(phi, dtype=q.dtype, device=q.device)
    e = (1 - q) / (1 + q)
    return e * torch.cos(2 * phi), e * torch.sin(2 * phi)


def magnitude_to_counts(mag: torch.Tensor | float, zero_point: float) -> torch.Tensor:
    """Counts of a source of AB magnitude ``mag`` for zero point ``zero_point``.

    ``counts = 10 ** (-0.4 (mag - zero_point))`` (the project convention
    ``mag = zero_point - 2.5 log10(counts)``).
    """
    mag = torch.as_tensor(mag)
    return torch.pow(
        torch.as_tensor(10.0, dtype=mag.dtype, device=mag.device), -0.4 * (mag - zero_point)
    )


# --------------------------------------------------------------------------------------
# grids
# --------------------------------------------------------------------------------------
def pixel_grid(
    size_pix: int,
    pixel_scale_arcsec: float,
    supersample: int = 1,
    device: torch.device | str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Angular coordinates (arcsec) of the (sub-)pixel centres of a square stamp.

    The origin is the centre of pixel ``size_pix // 2``, which is where
    ``lenscan.stamps`` puts the catalogue position of a stamp cut with
    ``origin = ceil(pos - S/2)``. With ``supersample = s`` each pixel is split into ``s x s``
    sub-pixels whose centres are at offsets ``((k + 0.5)/s - 0.5)`` pixel; sub-pixel ``j`` of
    the returned axis belongs to pixel ``j // s``, so :func:`downsample` (mean over ``s x s``
    blocks) gives pixel averages.

    Parameters
    ----------
    size_pix : int
        Stamp side ``S`` in pixels.
    pixel_scale_arcsec : float
        Pixel scale.
    supersample : int
        Sub-pixels per pixel along each axis (>= 1).
    device : torch.device or str, optional
        Device of the result.
    dtype : torch.dtype
        Floating dtype of the result.

    Returns
    -------
    x, y : Tensor
        Each of shape ``(S * s, S * s)``; ``x`` varies along the last axis.
    """
    if isinstance(size_pix, bool) or not isinstance(size_pix, int) or size_pix < 1:
        raise ValueError(f"size_pix must be a positive int, got {size_pix!r}")
    if isinstance(supersample, bool) or not isinstance(supersample, int) or supersample < 1:
        raise ValueError(f"supersample must be a positive int, got {supersample!r}")
    if not (math.isfinite(pixel_scale_arcsec) and pixel_scale_arcsec > 0):
        raise ValueError(f"pixel_scale_arcsec must be finite and > 0, got {pixel_scale_arcsec!r}")
    j = torch.arange(size_pix * supersample, device=device, dtype=dtype)
    centre = size_pix // 2
    offsets = (j // supersample - centre) + ((j % supersample) + 0.5) / supersample - 0.5
    axis = offsets * pixel_scale_arcsec
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    return x, y


def downsample(images: torch.Tensor, factor: int) -> torch.Tensor:
    """Average ``factor x factor`` blocks of the last two axes (sub-pixels -> pixels).

    Parameters
    ----------
    images : Tensor
        ``(..., H * factor, W * factor)``.
    factor : int
        Supersampling factor.

    Returns
    -------
    Tensor
        ``(..., H, W)`` block means.
    """
    if factor == 1:
        return images
    *lead, h, w = images.shape
    if h % factor or w % factor:
        raise ValueError(f"image shape {(h, w)} is not a multiple of the factor {factor}")
    out = images.reshape(-1, 1, h, w)
    out = F.avg_pool2d(out, kernel_size=factor, stride=factor)
    return out.reshape(*lead, h // factor, w // factor)


# --------------------------------------------------------------------------------------
# lensing
# --------------------------------------------------------------------------------------
def sie_deflection(
    x: torch.Tensor,
    y: torch.Tensor,
    theta_e: torch.Tensor | float,
    q: torch.Tensor | float,
    phi: torch.Tensor | float,
    center_x: torch.Tensor | float = 0.0,
    center_y: torch.Tensor | float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deflection of a singular isothermal ellipsoid (lenstronomy ``SIE`` convention).

    Parameters
    ----------
    x, y : Tensor
        Image-plane angles (arcsec), ``(H, W)`` or ``(N, H, W)``.
    theta_e : Tensor or float
        Einstein radius (arcsec, product average of the major and minor axes), ``>= 0``.
    q : Tensor or float
        Mass axis ratio in ``(0, 1]``.
    phi : Tensor or float
        Position angle of the major axis (radian).
    center_x, center_y : Tensor or float
        Lens centre (arcsec).

    Returns
    -------
    alpha_x, alpha_y : Tensor
        Deflection angles (arcsec), broadcast shape ``(N, H, W)``.

    Notes
    -----
    With ``b = theta_e sqrt(q)``, ``e = sqrt(1 - q^2)`` and ``psi = sqrt(q^2 x'^2 + y'^2)`` in
    the frame of the major axis (Kormann et al. 1994; Keeton & Kochanek 1998, s = 0):
    ``alpha_x' = b/e arctan(e x'/psi)``, ``alpha_y' = b/e artanh(e y'/psi)``.
    """
    x, y = _coords(x, y)
    te, qq, ph, cx, cy = _sie_params(x, theta_e, q, phi, center_x, center_y)
    cos, sin = torch.cos(ph), torch.sin(ph)
    xr, yr = _to_lens_frame(x, y, cx, cy, cos, sin)
    ax_r, ay_r = _sie_lens_frame(xr, yr, te, qq)
    return cos * ax_r - sin * ay_r, sin * ax_r + cos * ay_r


def _sie_params(
    x: torch.Tensor,
    theta_e: torch.Tensor | float,
    q: torch.Tensor | float,
    phi: torch.Tensor | float,
    center_x: torch.Tensor | float,
    center_y: torch.Tensor | float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The SIE parameters as checked tensors broadcasting on ``x``."""
    te = _param(theta_e, x, "theta_e")
    qq = _param(q, x, "q")
    ph = _param(phi, x, "phi")
    _require_range(te, "theta_e", low=0.0)
    _require_range(qq, "q", low=0.0, high=1.0, low_open=True)
    _require_finite(ph, "phi")
    cx = _param(center_x, x, "center_x")
    cy = _param(center_y, x, "center_y")
    _require_finite(cx, "center_x")
    _require_finite(cy, "center_y")
    return te, qq, ph, cx, cy


def _to_lens_frame(
    x: torch.Tensor,
    y: torch.Tensor,
    cx: torch.Tensor,
    cy: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinates relative to the centre, rotated so that x' runs along the major axis."""
    dx, dy = x - cx, y - cy
    return torch.addcmul(cos * dx, sin, dy), torch.addcmul(cos * dy, -sin, dx)


def _sie_lens_frame(
    xr: torch.Tensor, yr: torch.Tensor, te: torch.Tensor, qq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """SIE deflection in the frame of the major axis (Keeton & Kochanek 1998, s = 0)."""
    # (1-q)(1+q) keeps precision when q is close to 1 in float32.
    ecc = torch.sqrt(((1 - qq) * (1 + qq)).clamp_min(_SIE_MIN_ECC**2))
    inv_psi = torch.rsqrt(torch.addcmul(yr * yr, qq * qq, xr * xr).clamp_min(_SIE_R_FLOOR**2))
    inv_psi = inv_psi * ecc  # e / psi, one multiply per system instead of two per pixel
    b_over_e = te * torch.sqrt(qq) / ecc
    return b_over_e * torch.atan(xr * inv_psi), b_over_e * torch.atanh(yr * inv_psi)


def shear_deflection(
    x: torch.Tensor,
    y: torch.Tensor,
    gamma1: torch.Tensor | float,
    gamma2: torch.Tensor | float,
    *,
    center_x: torch.Tensor | float = 0.0,
    center_y: torch.Tensor | float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deflection of an external shear (lenstronomy ``SHEAR`` with ``ra_0, dec_0 = center``).

    Parameters
    ----------
    x, y : Tensor
        Image-plane angles (arcsec), ``(H, W)`` or ``(N, H, W)``.
    gamma1, gamma2 : Tensor or float
        Shear components.
    center_x, center_y : Tensor or float
        Point of zero deflection (arcsec); the renderer uses the lens centre.

    Returns
    -------
    alpha_x, alpha_y : Tensor
        ``(g1 dx + g2 dy, g2 dx - g1 dy)``.
    """
    x, y = _coords(x, y)
    g1 = _param(gamma1, x, "gamma1")
    g2 = _param(gamma2, x, "gamma2")
    _require_finite(g1, "gamma1")
    _require_finite(g2, "gamma2")
    dx = x - _param(center_x, x, "center_x")
    dy = y - _param(center_y, x, "center_y")
    return g1 * dx + g2 * dy, g2 * dx - g1 * dy


def ray_shoot(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    theta_e: torch.Tensor | float,
    q: torch.Tensor | float,
    phi: torch.Tensor | float,
    center_x: torch.Tensor | float = 0.0,
    center_y: torch.Tensor | float = 0.0,
    gamma1: torch.Tensor | float = 0.0,
    gamma2: torch.Tensor | float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Map image-plane angles to the source plane through SIE + shear (shear about the centre).

    Returns
    -------
    beta_x, beta_y : Tensor
        ``theta - alpha_SIE(theta) - alpha_shear(theta)``.
    """
    bx, by, cos, sin = ray_shoot_lens_frame(
        x, y, theta_e=theta_e, q=q, phi=phi, center_x=center_x, center_y=center_y,
        gamma1=gamma1, gamma2=gamma2,
    )  # fmt: skip
    cx = _param(center_x, bx, "center_x")
    cy = _param(center_y, bx, "center_y")
    return cos * bx - sin * by + cx, sin * bx + cos * by + cy


def ray_shoot_lens_frame(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    theta_e: torch.Tensor | float,
    q: torch.Tensor | float,
    phi: torch.Tensor | float,
    center_x: torch.Tensor | float = 0.0,
    center_y: torch.Tensor | float = 0.0,
    gamma1: torch.Tensor | float = 0.0,
    gamma2: torch.Tensor | float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source-plane angles in the lens frame (centred on the lens, x' along its major axis).

    The renderer evaluates the source there, folding the inverse rotation into the source's
    own centre and position angle (:func:`to_lens_frame_params`): a third fewer per-pixel
    operations than :func:`ray_shoot`.

    Returns
    -------
    beta_x', beta_y', cos(phi), sin(phi) : Tensor
        ``beta' = R(phi) (beta - center)``; the shear is rotated into the same frame
        (``gamma1' = gamma1 cos 2phi + gamma2 sin 2phi``, ``gamma2' = -gamma1 sin 2phi +
        gamma2 cos 2phi``).
    """
    x, y = _coords(x, y)
    te, qq, ph, cx, cy = _sie_params(x, theta_e, q, phi, center_x, center_y)
    g1 = _param(gamma1, x, "gamma1")
    g2 = _param(gamma2, x, "gamma2")
    _require_finite(g1, "gamma1")
    _require_finite(g2, "gamma2")
    cos, sin = torch.cos(ph), torch.sin(ph)
    xr, yr = _to_lens_frame(x, y, cx, cy, cos, sin)
    ax, ay = _sie_lens_frame(xr, yr, te, qq)
    c2, s2 = cos * cos - sin * sin, 2 * sin * cos
    g1r = g1 * c2 + g2 * s2
    g2r = g2 * c2 - g1 * s2
    bx = torch.addcmul(xr * (1 - g1r), -g2r, yr) - ax
    by = torch.addcmul(yr * (1 + g1r), -g2r, xr) - ay
    return bx, by, cos, sin


def to_lens_frame_params(
    x: torch.Tensor,
    y: torch.Tensor,
    phi_source: torch.Tensor,
    *,
    center_x: torch.Tensor,
    center_y: torch.Tensor,
    phi: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source centre and position angle in the lens frame of :func:`ray_shoot_lens_frame`."""
    cos, sin = torch.cos(phi), torch.sin(phi)
    dx, dy = x - center_x, y - center_y
    return cos * dx + sin * dy, cos * dy - sin * dx, phi_source - phi


# --------------------------------------------------------------------------------------
# light
# --------------------------------------------------------------------------------------
def sersic_b_n(n_sersic: torch.Tensor | float) -> torch.Tensor:
    """lenstronomy's ``b_n = 1.9992 n - 0.3271`` (floored at 1e-5), so images match it."""
    n = torch.as_tensor(n_sersic)
    return (1.9992 * n - 0.3271).clamp_min(1e-5)


def sersic_total_flux(
    amplitude: torch.Tensor | float, r_eff: torch.Tensor | float, n_sersic: torch.Tensor | float
) -> torch.Tensor:
    """Analytic total flux of an elliptical Sersic profile (product-average radius).

    ``2 pi n r_eff^2 e^{b_n} b_n^{-2n} Gamma(2n) amplitude`` with :func:`sersic_b_n`;
    exact for the profile of :func:`sersic_profile` (independent of ``q``).

    Parameters
    ----------
    amplitude : Tensor or float
        Surface brightness at ``r_eff`` (flux per arcsec^2).
    r_eff : Tensor or float
        Product-averaged half-light radius (arcsec).
    n_sersic : Tensor or float
        Sersic index.

    Returns
    -------
    Tensor
        Total flux (same units as ``amplitude * arcsec^2``).
    """
    amp, r, n = _common_tensors(amplitude, r_eff, n_sersic)
    b = sersic_b_n(n)
    log_norm = torch.log(2 * math.pi * n) + b - 2 * n * torch.log(b) + torch.lgamma(2 * n)
    return amp * r * r * torch.exp(log_norm)


def sersic_amplitude_from_flux(
    flux: torch.Tensor | float, r_eff: torch.Tensor | float, n_sersic: torch.Tensor | float
) -> torch.Tensor:
    """Surface brightness at ``r_eff`` that gives a Sersic profile the total ``flux``.

    Inverse of :func:`sersic_total_flux`.
    """
    flux, r, n = _common_tensors(flux, r_eff, n_sersic)
    unit = sersic_total_flux(torch.ones_like(flux), r, n)
    return flux / unit


def sersic_profile(
    x: torch.Tensor,
    y: torch.Tensor,
    amplitude: torch.Tensor | float,
    r_eff: torch.Tensor | float,
    n_sersic: torch.Tensor | float,
    q: torch.Tensor | float,
    phi: torch.Tensor | float,
    center_x: torch.Tensor | float = 0.0,
    center_y: torch.Tensor | float = 0.0,
) -> torch.Tensor:
    """Elliptical Sersic surface brightness (lenstronomy ``SERSIC_ELLIPSE`` convention).

    Parameters
    ----------
    x, y : Tensor
        Angles (arcsec), ``(H, W)`` or ``(N, H, W)`` (source-plane angles for a lensed source).
    amplitude : Tensor or float
        Surface brightness at ``r_eff`` (e.g. counts / arcsec^2).
    r_eff : Tensor or float
        Product-averaged half-light radius (arcsec), ``> 0``.
    n_sersic : Tensor or float
        Sersic index, ``> 0``.
    q, phi : Tensor or float
        Axis ratio in ``(0, 1]`` and major-axis position angle (radian).
    center_x, center_y : Tensor or float
        Centre (arcsec).

    Returns
    -------
    Tensor
        Surface brightness, broadcast shape ``(N, H, W)``.
    """
    x, y = _coords(x, y)
    amp = _param(amplitude, x, "amplitude")
    re = _param(r_eff, x, "r_eff")
    n = _param(n_sersic, x, "n_sersic")
    qq = _param(q, x, "q")
    ph = _param(phi, x, "phi")
    _require_finite(amp, "amplitude")
    _require_range(re, "r_eff", low=0.0, low_open=True)
    _require_range(n, "n_sersic", low=0.0, low_open=True)
    _require_range(qq, "q", low=0.0, high=1.0, low_open=True)
    _require_finite(ph, "phi")
    cx = _param(center_x, x, "center_x")
    cy = _param(center_y, x, "center_y")
    # (R / r_eff)^2 = u = a11 dx^2 + 2 a12 dx dy + a22 dy^2 with per-system coefficients:
    # R^2 = q x'^2 + y'^2 / q in the frame rotated by phi. Folding the rotation, the axis
    # ratio and r_eff into three numbers per system saves most per-pixel operations.
    cos, sin = torch.cos(ph), torch.sin(ph)
    a = qq / (re * re)
    c = 1.0 / (qq * re * re)
    a11 = a * cos * cos + c * sin * sin
    a22 = a * sin * sin + c * cos * cos
    a12x2 = 2 * (a - c) * sin * cos
    dx, dy = x - cx, y - cy
    u = torch.addcmul(torch.addcmul(a11 * dx * dx, a12x2, dx * dy), a22, dy * dy)
    u = torch.maximum(u, (_SERSIC_R_FLOOR / re) ** 2)  # R >= 1e-4 arcsec like lenstronomy
    b = sersic_b_n(n)
    return (amp * torch.exp(b)) * torch.exp(-b * torch.pow(u, 0.5 / n))


def gaussian_light(
    x: torch.Tensor,
    y: torch.Tensor,
    flux: torch.Tensor | float,
    sigma: torch.Tensor | float,
    center_x: torch.Tensor | float = 0.0,
    center_y: torch.Tensor | float = 0.0,
) -> torch.Tensor:
    """Circular Gaussian surface brightness of total ``flux`` (a compact star-forming clump).

    Parameters
    ----------
    x, y : Tensor
        Angles (arcsec), ``(H, W)`` or ``(N, H, W)`` (source-plane angles for a lensed clump).
    flux : Tensor or float
        Total flux (integral over the plane); 0 gives an empty image.
    sigma : Tensor or float
        Gaussian sigma (arcsec), ``> 0``.
    center_x, center_y : Tensor or float
        Centre (arcsec).

    Returns
    -------
    Tensor
        Surface brightness (flux per arcsec^2), broadcast shape ``(N, H, W)``.
    """
    x, y = _coords(x, y)
    f = _param(flux, x, "flux")
    s = _param(sigma, x, "sigma")
    _require_finite(f, "flux")
    _require_range(s, "sigma", low=0.0, low_open=True)
    dx = x - _param(center_x, x, "center_x")
    dy = y - _param(center_y, x, "center_y")
    inv2 = 0.5 / (s * s)
    return (f * inv2 / math.pi) * torch.exp(-(dx * dx + dy * dy) * inv2)


# --------------------------------------------------------------------------------------
# PSF
# --------------------------------------------------------------------------------------
def _kernel_radial_grid(
    size_pix: int,
    pixel_scale_arcsec: float,
    oversample: int,
    device: torch.device | str | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    x, y = pixel_grid(size_pix, pixel_scale_arcsec, oversample, device, dtype=dtype)
    return x * x + y * y


def _kernel_size(fwhm_max_arcsec: float, pixel_scale_arcsec: float, radius_fwhm: float) -> int:
    half = math.ceil(radius_fwhm * fwhm_max_arcsec / pixel_scale_arcsec)
    return 2 * max(half, 1) + 1


def psf_kernel_from_fwhm(
    fwhm_arcsec: torch.Tensor | Sequence[float] | float,
    pixel_scale_arcsec: float,
    *,
    model: str = "moffat",
    moffat_beta: float = 3.0,
    size_pix: int | None = None,
    radius_fwhm: float = 4.0,
    oversample: int = 5,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Pixel-integrated, normalised PSF kernels for one or more FWHMs.

    Parameters
    ----------
    fwhm_arcsec : Tensor, sequence or float
        Full width at half maximum (arcsec), one per kernel, ``> 0``.
    pixel_scale_arcsec : float
        Pixel scale.
    model : {"moffat", "gaussian"}
        Profile. Moffat ``(1 + r^2/alpha^2)^-beta`` with
        ``alpha = FWHM / (2 sqrt(2^{1/beta} - 1))``; Gaussian with
        ``sigma = FWHM / (2 sqrt(2 ln 2))``.
    moffat_beta : float
        Moffat index (> 1).
    size_pix : int, optional
        Odd kernel side; default covers ``radius_fwhm`` times the largest FWHM.
    radius_fwhm : float
        Kernel half-size in FWHMs when ``size_pix`` is not given.
    oversample : int
        Sub-pixels per axis used to integrate the profile over each pixel.
    device, dtype
        Where and how to build the kernels.

    Returns
    -------
    Tensor
        ``(K, size, size)`` kernels (``K`` FWHMs), each summing to 1 over its footprint
        (the truncated Moffat wing beyond the footprint, < 0.5 % at 4 FWHM, is dropped).
    """
    fwhm = torch.as_tensor(fwhm_arcsec, dtype=dtype, device=device).reshape(-1)
    _require_range(fwhm, "fwhm_arcsec", low=0.0, low_open=True)
    if model not in ("moffat", "gaussian"):
        raise ValueError(f"psf model must be 'moffat' or 'gaussian', got {model!r}")
    if model == "moffat" and not (math.isfinite(moffat_beta) and moffat_beta > 1):
        raise ValueError(f"moffat_beta must be finite and > 1, got {moffat_beta!r}")
    if size_pix is None:
        size_pix = _kernel_size(float(fwhm.max()), pixel_scale_arcsec, radius_fwhm)
    if (
        isinstance(size_pix, bool)
        or not isinstance(size_pix, int)
        or size_pix < 1
        or size_pix % 2 == 0
    ):
        raise ValueError(f"size_pix must be a positive odd int, got {size_pix!r}")
    r2 = _kernel_radial_grid(size_pix, pixel_scale_arcsec, oversample, fwhm.device, dtype)
    w = fwhm.view(-1, 1, 1)
    if model == "gaussian":
        sigma = w / (2 * math.sqrt(2 * math.log(2)))
        prof = torch.exp(-0.5 * r2 / (sigma * sigma))
    else:
        alpha = w / (2 * math.sqrt(2 ** (1 / moffat_beta) - 1))
        prof = torch.pow(1 + r2 / (alpha * alpha), -moffat_beta)
    kern = downsample(prof, oversample)
    return kern / kern.sum(dim=(-2, -1), keepdim=True)


def gaussian_kernel(
    fwhm_arcsec: torch.Tensor | Sequence[float] | float, pixel_scale_arcsec: float, **kwargs: Any
) -> torch.Tensor:
    """Gaussian PSF kernels, see :func:`psf_kernel_from_fwhm` for the options."""
    return psf_kernel_from_fwhm(fwhm_arcsec, pixel_scale_arcsec, model="gaussian", **kwargs)


def moffat_kernel(
    fwhm_arcsec: torch.Tensor | Sequence[float] | float,
    pixel_scale_arcsec: float,
    *,
    beta: float = 3.0,
    **kwargs: Any,
) -> torch.Tensor:
    """Moffat PSF kernels, see :func:`psf_kernel_from_fwhm` for the options."""
    return psf_kernel_from_fwhm(
        fwhm_arcsec, pixel_scale_arcsec, model="moffat", moffat_beta=beta, **kwargs
    )


def psf_kernel(
    preset: SurveyPreset,
    bands: str | Sequence[str],
    *,
    size_pix: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """PSF kernels of a survey preset, one per band.

    Parameters
    ----------
    preset : SurveyPreset
        Supplies seeing FWHM per band, pixel scale, PSF model and Moffat beta.
    bands : str or sequence of str
        Band(s), each known to the preset.
    size_pix : int, optional
        Odd kernel side; default covers 4 times the widest FWHM.
    device, dtype
        Where and how to build the kernels.

    Returns
    -------
    Tensor
        ``(B, size, size)`` kernels summing to 1.
    """
    band_list = [bands] if isinstance(bands, str) else list(bands)
    fwhm = [preset.seeing_for(b) for b in band_list]
    return psf_kernel_from_fwhm(
        fwhm,
        preset.pixel_scale_arcsec,
        model=preset.psf_model,
        moffat_beta=preset.moffat_beta,
        size_pix=size_pix,
        device=device,
        dtype=dtype,
    )


def psf_kernels_per_system(
    preset: SurveyPreset,
    bands: str | Sequence[str],
    seeing_factor: torch.Tensor,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """PSF kernels of systems observed at their own seeing (tile-to-tile, band-to-band).

    Parameters
    ----------
    preset : SurveyPreset
        Nominal seeing per band, pixel scale, PSF model.
    bands : str or sequence of str
        Band(s) known to the preset.
    seeing_factor : Tensor
        ``(N,)`` (one factor per system, every band) or ``(N, B)`` multipliers of the preset's
        FWHM, ``> 0``.

    Returns
    -------
    Tensor
        ``(N, B, k, k)`` kernels summing to 1, ``k`` covering 4 FWHM of the widest one (for
        :func:`convolve`'s per-system form).
    """
    band_list = [bands] if isinstance(bands, str) else list(bands)
    nominal = torch.tensor([preset.seeing_for(b) for b in band_list], dtype=dtype, device=device)
    factor = torch.as_tensor(seeing_factor, dtype=dtype, device=device)
    if factor.ndim == 1:
        factor = factor[:, None].expand(-1, len(band_list))
    if factor.ndim != 2 or factor.shape[1] != len(band_list):
        raise ValueError(
            f"seeing_factor must be (N,) or (N, {len(band_list)}), got {tuple(factor.shape)}"
        )
    _require_range(factor, "seeing_factor", low=0.0, low_open=True)
    fwhm = factor * nominal
    kernels = psf_kernel_from_fwhm(
        fwhm.reshape(-1), preset.pixel_scale_arcsec, model=preset.psf_model,
        moffat_beta=preset.moffat_beta, device=device, dtype=dtype,
    )  # fmt: skip
    return kernels.view(factor.shape[0], len(band_list), *kernels.shape[-2:])


def fft_size(n: int) -> int:
    """Smallest integer ``>= n`` whose only prime factors are 2, 3 and 5 (fast FFT length)."""
    m = max(int(n), 1)
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 1


def convolve(images: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Linear ('same' size, zero padded) convolution of image batches with PSF kernels, by FFT.

    Parameters
    ----------
    images : Tensor
        ``(N, B, H, W)``.
    kernels : Tensor
        ``(B, k, k)`` (one kernel per band, shared by the batch) or ``(N, B, k, k)``
        (per-system kernels); ``k`` odd.

    Returns
    -------
    Tensor
        ``(N, B, H, W)``, same dtype as ``images``; flux is conserved up to what the kernel
        spreads beyond the stamp edge.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (N, B, H, W), got shape {tuple(images.shape)}")
    if kernels.ndim not in (3, 4):
        raise ValueError(f"kernels must be (B, k, k) or (N, B, k, k), got {tuple(kernels.shape)}")
    kh, kw = kernels.shape[-2:]
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"kernel sides must be odd, got {(kh, kw)}")
    n, b, h, w = images.shape
    if kernels.shape[-3] != b or (kernels.ndim == 4 and kernels.shape[0] != n):
        raise ValueError(
            f"kernels shape {tuple(kernels.shape)} does not match images shape "
            f"{tuple(images.shape)}"
        )
    ph, pw = fft_size(h + kh - 1), fft_size(w + kw - 1)
    fi = torch.fft.rfft2(images, s=(ph, pw))
    fk = torch.fft.rfft2(kernels.to(images.dtype), s=(ph, pw))
    out = torch.fft.irfft2(fi * fk, s=(ph, pw))
    oy, ox = kh // 2, kw // 2
    return out[..., oy : oy + h, ox : ox + w].contiguous()


# --------------------------------------------------------------------------------------
# noise
# --------------------------------------------------------------------------------------
def _per_band(
    value: float | Sequence[float] | torch.Tensor, like: torch.Tensor, name: str
) -> torch.Tensor:
    """Scalar or (B,) -> broadcastable (1, B, 1, 1); (N, B) -> (N, B, 1, 1)."""
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if t.ndim == 0:
        return t
    if t.ndim == 1:
        if t.shape[0] != like.shape[1]:
            raise ValueError(f"{name} has {t.shape[0]} values for {like.shape[1]} bands")
        return t.view(1, -1, 1, 1)
    if t.ndim == 2 and t.shape == like.shape[:2]:
        return t.view(*t.shape, 1, 1)
    raise ValueError(f"{name} must be a scalar, (B,) or (N, B), got shape {tuple(t.shape)}")


def add_noise(
    images: torch.Tensor,
    *,
    sky_counts: torch.Tensor | Sequence[float] | float,
    gain_e_per_count: torch.Tensor | Sequence[float] | float,
    read_noise_counts: torch.Tensor | Sequence[float] | float = 0.0,
    sky_subtracted: bool = True,
    gaussian_above_electrons: float = 1000.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Add Poisson (source + sky) and Gaussian read noise to noiseless counts.

    ``electrons ~ Poisson(gain (signal + sky))``; the result is
    ``electrons / gain + N(0, read_noise^2)``, minus ``sky`` when ``sky_subtracted`` (as in
    DES coadds: zero-mean background that keeps the sky's Poisson noise). The variance per
    pixel is ``(signal + sky) / gain + read_noise^2``.

    Parameters
    ----------
    images : Tensor
        ``(N, B, H, W)`` noiseless counts, ``>= 0``.
    sky_counts : Tensor, sequence or float
        Sky counts per pixel: scalar, ``(B,)`` or ``(N, B)``.
    gain_e_per_count : Tensor, sequence or float
        Effective gain (electrons per count), ``> 0``: scalar, ``(B,)`` or ``(N, B)``.
    read_noise_counts : Tensor, sequence or float
        Gaussian read-noise sigma in counts: scalar, ``(B,)`` or ``(N, B)``.
    sky_subtracted : bool
        Subtract the mean sky after drawing the noise.
    gaussian_above_electrons : float
        Pixels expecting at least this many electrons draw ``N(lambda, lambda)`` instead of
        ``Poisson(lambda)``: identical to well under 1 % in every moment that matters (the
        skewness is ``lambda^-1/2``) and ~8x faster; DES sky alone gives > 3000 e- per pixel.
        Use ``inf`` for exact Poisson everywhere.
    generator : torch.Generator, optional
        Random generator on ``images.device`` (for reproducibility).

    Returns
    -------
    Tensor
        Noisy counts, same shape and dtype.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (N, B, H, W), got shape {tuple(images.shape)}")
    sky = _per_band(sky_counts, images, "sky_counts")
    gain = _per_band(gain_e_per_count, images, "gain_e_per_count")
    rn = _per_band(read_noise_counts, images, "read_noise_counts")
    _require_range(sky, "sky_counts", low=0.0)
    _require_range(gain, "gain_e_per_count", low=0.0, low_open=True)
    _require_range(rn, "read_noise_counts", low=0.0)
    rate = ((images + sky).clamp_min(0.0) * gain).expand_as(images)
    noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    electrons = torch.addcmul(rate, torch.sqrt(rate), noise)
    low = rate < gaussian_above_electrons
    if bool(low.any()):
        # exact Poisson where the Gaussian approximation is poor (faint arcs on zero sky)
        electrons[low] = torch.poisson(rate[low].double(), generator=generator).to(images.dtype)
    out = electrons / gain
    if sky_subtracted:
        out = out - sky
    if bool((rn > 0).any()):
        read = torch.randn(
            images.shape, generator=generator, device=images.device, dtype=images.dtype
        )
        out = out + read * rn
    return out
