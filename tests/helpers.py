"""Helpers shared by test modules (data are always made on the fly)."""

from __future__ import annotations

import torch

from lenscan.models import ModelMeta, create_model, save_model

TINY_STAMP_PIX = 32


def make_tiny_model(
    path, *, bands=("g", "r", "i"), pixel_scale=0.263, seed=0, name="tiny", n_members=2
) -> str:
    """Save a small randomly initialised Jacobs-style ensemble and return its path stem.

    It checks machinery (shapes, scoring once, determinism), not science.
    """
    torch.manual_seed(seed)
    meta = ModelMeta(
        name=name,
        architecture="jacobs-cnn",
        arch_kwargs={"channels": [4, 8], "hidden": 8},
        bands=bands,
        stamp_size_pix=TINY_STAMP_PIX,
        pixel_scale_arcsec=pixel_scale,
        normalisation={"method": "asinh_mad", "softening_sigma": 3.0},
        n_members=n_members,
    )
    members = [
        create_model(
            "jacobs-cnn", in_chans=len(bands), stamp_size_pix=TINY_STAMP_PIX, **meta.arch_kwargs
        )
        for _ in range(n_members)
    ]
    save_model(path, members, meta)
    return str(path)
