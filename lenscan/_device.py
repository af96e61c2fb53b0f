"""The one place a torch device is chosen from a user's ``device`` setting."""

from __future__ import annotations

import torch

__all__ = ["resolve_device"]


def resolve_device(device: str | torch.device) -> torch.device:
    """Turn a ``device`` setting into a :class:`torch.device`.

    ``"auto"`` is CUDA when this process sees a GPU, else CPU. Anything else must name a device
    torch knows, and a CUDA device only where CUDA is available.

    >>> resolve_device("cpu")
    device(type='cpu')
    >>> resolve_device("gpu0")
    Traceback (most recent call last):
    ...
    ValueError: bad device 'gpu0': ...
    """
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"bad device {device!r}: {err}") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but this process has no CUDA GPU")
    return dev
