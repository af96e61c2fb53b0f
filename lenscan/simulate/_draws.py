"""Helpers shared by the population samplers: random draws of ``(n,)`` tensors from one
generator, and magnitudes from colours."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

__all__ = ["Draws", "colours_to_mags"]

_Mag = TypeVar("_Mag", np.ndarray, torch.Tensor)


def colours_to_mags(mag_i: _Mag, g_r: _Mag, r_i: _Mag, i_z: _Mag, z_y: _Mag) -> dict[str, _Mag]:
    """Per-band magnitudes (ugrizy) from the i magnitude and the colours, arrays or tensors.

    u comes from g through ``u - g = 0.25 + 1.2 (g - r)``, the slope of the galaxy (and
    stellar) sequence in SDSS/LSST u-g against g-r: blue star-forming galaxies (g-r ~ 0.4) have
    u-g ~ 0.7, luminous red galaxies at z ~ 0.3-0.6 (g-r ~ 1.5-1.8) u-g ~ 2.0-2.4. Deriving it
    draws no random numbers, so adding the band changed no seeded draw of the other five.

    >>> mags = colours_to_mags(*np.array([[20.0], [0.5], [0.25], [0.125], [0.0625]]))
    >>> mags["g"], mags["u"]
    (array([20.75]), array([21.6]))
    """
    r = mag_i + r_i
    z = mag_i - i_z
    g = r + g_r
    return _with_euclid_bands(
        {"u": g + 0.25 + 1.2 * g_r, "g": g, "r": r, "i": mag_i, "z": z, "y": z - z_y}
    )


@dataclass
class Draws:
    """Uniform and normal draws of ``(n,)`` tensors from ``generator``, in call order.

    ``dtype`` None is torch's default floating dtype.
    """

    n: int
    generator: torch.Generator | None
    device: torch.device | str | None
    dtype: torch.dtype | None = None

    def u(self) -> torch.Tensor:
        """Uniform in [0, 1)."""
        return torch.rand((self.n,), generator=self.generator, device=self.device, dtype=self.dtype)

    def uniform(self, rng: tuple[float, float]) -> torch.Tensor:
        """Uniform in [low, high)."""
        return rng[0] + (rng[1] - rng[0]) * self.u()

    def normal(self) -> torch.Tensor:
        """Standard normal."""
        return torch.randn(
            (self.n,), generator=self.generator, device=self.device, dtype=self.dtype
        )


def _with_euclid_bands(mags: dict[str, _Mag]) -> dict[str, _Mag]:
    """Add Euclid's VIS, J and H (NISP Y is taken as y) to grizy magnitudes; no random draws.

    VIS (550-900 nm) spans r, i and z: its magnitude is their mean. J and H extend the z-y
    slope redwards with a flat offset (y-J ~ 0.2-0.5, J-H ~ 0.2-0.4 for blue to red galaxies,
    as in the Euclid Q1 MER colours); an approximation for simulation, not a photometric model.
    """
    z_y = mags["z"] - mags["y"]
    mags["vis"] = (mags["r"] + mags["i"] + mags["z"]) / 3.0
    mags["j"] = mags["y"] - 0.15 - 0.8 * z_y
    mags["h"] = mags["j"] - 0.15 - 0.6 * z_y
    return mags
