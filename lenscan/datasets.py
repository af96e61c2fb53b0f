"""Training and evaluation data: the adapters between lenscan.simulate and the models.

Both :mod:`lenscan.training` and :mod:`lenscan.evaluate` draw labelled, normalised stamps through
these functions (and neither imports the other): :func:`build_training_set` turns a mapping
(a model's recorded ``training_set``) into a
:class:`~lenscan.simulate.training.TrainingSetConfig`, :func:`load_real_cutouts` reads the
survey cutouts of the real-galaxy classes once, and :func:`make_batch` simulates a batch and
normalises it exactly as the scan normalises survey stamps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lenscan.stamps import normalise_stamps

__all__ = [
    "band_indices",
    "build_training_set",
    "load_real_cutouts",
    "make_batch",
]


def build_training_set(
    spec: Any,
    *,
    seed: int | None = None,
    stamp_size_pix: int | None = None,
    bands: Sequence[str] | None = None,
    survey_url: str | None = None,
) -> Any:
    """Build a :class:`lenscan.simulate.training.TrainingSetConfig` from a mapping (or copy one).

    ``seed``, ``stamp_size_pix`` and ``survey_url`` override the spec's values when given;
    ``bands`` fills in the rendered bands when the spec does not choose them.
    """
    from lenscan.simulate.training import TrainingSetConfig

    if isinstance(spec, TrainingSetConfig):
        data = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
    elif isinstance(spec, Mapping):
        data = dict(spec)
    else:
        raise TypeError(f"training_set must be a mapping or TrainingSetConfig, got {type(spec)}")
    if seed is not None:
        data["seed"] = int(seed)
    if stamp_size_pix is not None:
        data["stamp_size_pix"] = int(stamp_size_pix)
    if survey_url is not None:
        data["survey_url"] = survey_url
    if bands is not None and data.get("bands") is None:
        data["bands"] = list(bands)
    if isinstance(spec, TrainingSetConfig):
        return TrainingSetConfig(**data)
    return TrainingSetConfig.from_dict(data)


def load_real_cutouts(training_set: Any, *, seed: int) -> Any:
    """Read the survey cutouts of kinds 2/3 (and the mined hard negatives of kind 5).

    Returns None when the set uses neither; hard negatives ride along as
    ``RealCutouts.hard_negatives``.
    """
    from lenscan.simulate.training import RealCutouts, read_hard_negatives

    fractions = training_set.class_fractions
    hard = read_hard_negatives(training_set) if fractions[5] > 0 else None
    if not training_set.survey_url or (fractions[2] == 0 and fractions[3] == 0):
        return hard
    real = RealCutouts.from_survey(
        training_set.survey_url,
        bands=training_set.bands,
        stamp_size_pix=training_set.stamp_size_pix,
        max_cutouts=training_set.max_real_cutouts,
        seed=seed,
        storage_options=training_set.storage_options,
        selection=training_set.real_selection,
    )
    real.hard_negatives = hard
    return real


def band_indices(training_set: Any, bands: Sequence[str]) -> list[int]:
    """Channel of each model band in the training set's rendered images."""
    rendered = list(training_set.bands)
    missing = [b for b in bands if b not in rendered]
    if missing:
        raise ValueError(
            f"the training set renders bands {rendered}; the model needs {list(bands)} "
            f"(missing {missing})"
        )
    return [rendered.index(b) for b in bands]


def make_batch(
    training_set: Any,
    n: int,
    *,
    generator: torch.Generator,
    device: torch.device,
    real_cutouts: Any,
    band_idx: Sequence[int],
    normalisation: Mapping[str, Any],
) -> tuple[Any, torch.Tensor]:
    """Simulate ``n`` stamps and normalise the model's bands; returns ``(batch, x)``."""
    from lenscan.simulate.training import make_training_batch

    batch = make_training_batch(
        training_set, n, generator=generator, device=device, real_cutouts=real_cutouts
    )
    images = batch.images[:, list(band_idx)]
    return batch, normalise_stamps(images, normalisation)
