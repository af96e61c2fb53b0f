"""Random draws of ``(n,)`` tensors from one generator, shared by the population samplers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Draws"]


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
