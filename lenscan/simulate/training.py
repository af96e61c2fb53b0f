"""Training sets in the four classes of the poster's Figure 1, simulated on the fly.

=====  ==================================================  =====
kind   content                                             label
=====  ==================================================  =====
0      simulated lens: lens galaxy + lensed source         1
1      simulated lens galaxy without a source              0
2      real galaxy + simulated arc (lensed source only)    1
3      real field galaxy                                   0
4      simulated confuser (:mod:`lenscan.simulate.confusers`:  0
       spiral, ring, merger, blue companions, edge-on disc)
5      hard negative: a survey cutout a model scored high  0
       (mined by :mod:`lenscan.mining`)
6      neighbour-centred: a simulated lens (with its arcs) 0
       or lens-like red galaxy 1-3" off-centre, the stamp
       centred on its catalogued neighbour (the stamp a
       scan cuts around the neighbour's own catalogue row)
=====  ==================================================  =====

Kinds 4-6 are optional: ``class_fractions`` may list 4 to 7 fractions (missing ones are 0), so
configs written before they existed keep their meaning. With ``merger_second_fraction`` > 0 that
fraction of the kind-4 stamps are mergers seen from their second galaxy (the stamp centred on
it, the host and the tidal tail off-centre), as a scan sees the second galaxy's own catalogue
row. With ``artefact_probability``
> 0 every kind gets stamp-level artefacts (cosmic-ray residuals, satellite trails, bad columns,
saturated stars with bleed trails and spikes); masked pixels (bad columns, saturated cores,
bleed trails) are NaN, as the scan makes them from a survey's mask (and real cutouts are read
with their mask), so :func:`lenscan.stamps.normalise_stamps` treats them alike.

"Real" galaxies are cutouts from a lenscan survey store (:class:`RealCutouts`), so a model
learns the survey's actual PSF, noise, artefacts and neighbours. Simulated systems of kinds 0
and 1 share one population, including companion galaxies (red or blue neighbours) in both,
so a neighbour is never a give-away for either label. A kind-2 arc is rendered as if the real
galaxy were the lens: centred on the galaxy's catalogue position inside the cutout, convolved
with the preset PSF, with the arc's own Poisson noise (the cutout already carries the sky's).

Images are raw counts in the preset's zero point; training and scoring normalise them with
:func:`lenscan.stamps.normalise_stamps`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

from lenscan._fields import known_fields
from lenscan.simulate.confusers import ConfuserPopulation, render_confusers, sample_confusers
from lenscan.simulate.population import (
    LensPopulation,
    RenderInfo,
    render_systems,
    sample_lens_systems,
)
from lenscan.simulate.presets import SurveyPreset, check_seeing_factor_range, get_survey_preset
from lenscan.stamps import mask_stamps, stamp_origins

__all__ = [
    "KIND_LABELS",
    "KIND_NAMES",
    "RealCutouts",
    "TrainingBatch",
    "TrainingSetConfig",
    "add_stamp_artefacts",
    "class_counts",
    "make_training_batch",
    "read_hard_negatives",
    "truth_ids",
]

#: Label (1 = lens) of each kind.
KIND_LABELS: tuple[int, ...] = (1, 0, 1, 0, 0, 0, 0)
#: Name of each kind.
KIND_NAMES: tuple[str, ...] = (
    "simulated lens",
    "simulated lens galaxy without source",
    "real galaxy + simulated arc",
    "real field galaxy",
    "simulated confuser",
    "hard negative",
    "neighbour-centred lens or galaxy",
)
_KIND_NAMES = KIND_NAMES
N_KINDS = len(KIND_LABELS)
# Redraws of systems whose arc is fainter than min_source_snr before giving up.
_MAX_REDRAWS = 8


# --------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------
@dataclass
class TrainingSetConfig:
    """How to make training batches.

    Attributes
    ----------
    preset : SurveyPreset or str
        Survey whose pixels are simulated (a name is resolved in ``__post_init__``).
    stamp_size_pix : int
        Stamp side ``S`` (> 0).
    bands : tuple of str or None
        Bands rendered, in this order; default the preset's ``default_bands``.
    class_fractions : 4 to 7 floats or None
        Fractions of kinds 0-6 (sum to 1; missing trailing kinds are 0). Default ``(0.25,) *
        4`` with a ``survey_url`` and ``(0.5, 0.5, 0, 0)`` without.
    population : LensPopulation or mapping
        Lens, source and companion parameter ranges.
    survey_url : str or None
        Survey store (any fsspec URL) from which kinds 2 and 3 take real cutouts.
    storage_options : mapping or None
        fsspec options for ``survey_url``.
    real_selection : str
        Which real cutouts: ``"galaxies"`` (extended_class >= 2, clean flags, measured
        magnitudes) or the name of a :mod:`lenscan.select` colour cut, e.g.
        ``"des-jacobs19"`` (galaxies inside the cut).
    max_real_cutouts : int
        Cutouts read from the survey (drawn at random, with ``seed``).
    supersample : int
        Sub-pixels per pixel for the ray tracing.
    min_source_snr : float
        Lensed sources (kinds 0 and 2) with a total matched-filter S/N below this are redrawn
        (up to 8 times), so that lenses carry a detectable arc.
    seed : int
        Seed of the default generator and of the real-cutout selection.
    confusers : ConfuserPopulation or mapping or None
        Parameter ranges of kind 4 (default ``ConfuserPopulation()``).
    hard_negatives : str or None
        Parquet file of mined hard negatives (columns ``survey_url``, ``tile``, ``id``; written
        by ``lenscan mine-negatives``) for kind 5.
    artefact_probability : float
        Probability that a stamp (any kind) gets one stamp-level artefact.
    build_survey : mapping or None
        Arguments of :func:`lenscan.simulate.make_survey` (``n_tiles``, ``seed``,
        ``lenses_per_tile``, ...): ``lenscan.train`` builds ``survey_url`` with them first when
        it holds no survey yet, so a config reproduces its run from a fresh clone.
    seeing_factor_range : (float, float), "preset" or None
        Every simulated stamp (kinds 0, 1, 4 and the arcs of kind 2) is observed at its own
        seeing: the preset's FWHM times a factor uniform in this range, each band scattered
        about it by ``seeing_band_scatter``. ``"preset"`` (default) is the preset's range
        (0.85-1.35 for ground-based surveys, as :func:`~lenscan.simulate.make_survey`'s
        tiles; none for Euclid), resolved in ``__post_init__``. None: the preset's seeing.
    seeing_band_scatter : float
        Log-normal scatter of each band's factor about the stamp's (clipped at 2 sigma).
    neighbour_lens_fraction : float
        Fraction of the kind-6 stamps whose off-centre galaxy is a lens with its arcs (the rest
        are lens-like galaxies without a source). The neighbour is the population's companion
        (``companion_distance_arcsec`` away, lens-like or blue colours), always present here.
    merger_second_fraction : float
        Fraction of the kind-4 stamps that are mergers centred on their second galaxy (default
        0: kind 4 draws its kinds with the confusers' ``kind_weights`` alone).
    """

    preset: SurveyPreset | str = "des"
    stamp_size_pix: int = 100
    bands: tuple[str, ...] | None = None
    class_fractions: tuple[float, ...] | None = None
    population: LensPopulation = field(default_factory=LensPopulation)
    survey_url: str | None = None
    storage_options: Mapping[str, Any] | None = None
    real_selection: str = "galaxies"
    max_real_cutouts: int = 2000
    supersample: int = 3
    min_source_snr: float = 5.0
    seed: int = 0
    confusers: ConfuserPopulation | None = None
    hard_negatives: str | None = None
    artefact_probability: float = 0.0
    build_survey: Mapping[str, Any] | None = None
    seeing_factor_range: tuple[float, float] | str | None = "preset"
    seeing_band_scatter: float = 0.05
    neighbour_lens_fraction: float = 0.5
    merger_second_fraction: float = 0.0

    def __post_init__(self) -> None:
        if self.confusers is None:
            self.confusers = ConfuserPopulation()
        elif isinstance(self.confusers, Mapping):
            self.confusers = ConfuserPopulation.from_dict(self.confusers)
        if not isinstance(self.confusers, ConfuserPopulation):
            raise TypeError("TrainingSetConfig.confusers must be a ConfuserPopulation or mapping")
        ap = float(self.artefact_probability)
        if not (math.isfinite(ap) and 0 <= ap <= 1):
            raise ValueError(
                f"TrainingSetConfig.artefact_probability must be in [0, 1], got {ap!r}"
            )
        self.artefact_probability = ap
        self._check_shares()
        self.build_survey = _check_build_survey(self.build_survey, self.survey_url)
        self.preset = get_survey_preset(self.preset)
        self._check_seeing()
        if isinstance(self.population, Mapping):
            self.population = LensPopulation(**dict(self.population))
        if not isinstance(self.population, LensPopulation):
            raise TypeError(
                "TrainingSetConfig.population must be a LensPopulation or a mapping of its "
                f"fields, got {type(self.population).__name__}"
            )
        self.bands = self.preset.check_bands(
            None if self.bands is None else tuple(str(b).lower() for b in self.bands)
        )
        s = self.stamp_size_pix
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ValueError(f"TrainingSetConfig.stamp_size_pix must be an int > 0, got {s!r}")
        ss = self.supersample
        if isinstance(ss, bool) or not isinstance(ss, int) or ss < 1:
            raise ValueError(f"TrainingSetConfig.supersample must be an int >= 1, got {ss!r}")
        if self.class_fractions is None:
            self.class_fractions = (0.25,) * 4 if self.survey_url else (0.5, 0.5, 0.0, 0.0)
        fr = tuple(float(f) for f in self.class_fractions)
        if 4 <= len(fr) < N_KINDS:
            fr = fr + (0.0,) * (N_KINDS - len(fr))
        if len(fr) != N_KINDS or not all(math.isfinite(f) and f >= 0 for f in fr):
            raise ValueError(
                "TrainingSetConfig.class_fractions must be 4 to 7 finite fractions >= 0 (kinds: "
                f"{', '.join(_KIND_NAMES)}), got {self.class_fractions!r}"
            )
        if abs(sum(fr) - 1.0) > 1e-6:
            raise ValueError(
                f"TrainingSetConfig.class_fractions must sum to 1, got {fr} (sum {sum(fr):.6g})"
            )
        self.class_fractions = fr
        if fr[5] > 0 and not self.hard_negatives:
            raise ValueError(
                "TrainingSetConfig: kind 5 (hard negatives) needs hard_negatives, the parquet "
                "file written by `lenscan mine-negatives`"
            )
        if (fr[2] > 0 or fr[3] > 0) and not self.survey_url:
            raise ValueError(
                "TrainingSetConfig: kinds 2 and 3 (real galaxies) need survey_url, the survey "
                "store to take cutouts from; set survey_url or class_fractions=(0.5, 0.5, 0, 0)"
            )
        if isinstance(self.max_real_cutouts, bool) or int(self.max_real_cutouts) < 1:
            raise ValueError(
                f"TrainingSetConfig.max_real_cutouts must be >= 1, got {self.max_real_cutouts!r}"
            )
        self.max_real_cutouts = int(self.max_real_cutouts)
        if not (math.isfinite(self.min_source_snr) and self.min_source_snr >= 0):
            raise ValueError(
                "TrainingSetConfig.min_source_snr must be finite and >= 0, got "
                f"{self.min_source_snr}"
            )
        if not isinstance(self.real_selection, str) or not self.real_selection:
            raise ValueError("TrainingSetConfig.real_selection must be 'galaxies' or a cut name")
        self.seed = int(self.seed)

    def _check_shares(self) -> None:
        """Check ``neighbour_lens_fraction`` and ``merger_second_fraction`` (in [0, 1])."""
        for name in ("neighbour_lens_fraction", "merger_second_fraction"):
            f = getattr(self, name)
            if isinstance(f, bool) or not (
                isinstance(f, (int, float)) and math.isfinite(f) and 0 <= f <= 1
            ):
                raise ValueError(f"TrainingSetConfig.{name} must be in [0, 1], got {f!r}")
            setattr(self, name, float(f))

    def _check_seeing(self) -> None:
        """Normalise and check ``seeing_factor_range`` and ``seeing_band_scatter``."""
        rng = self.seeing_factor_range
        if isinstance(rng, str) and rng == "preset" and isinstance(self.preset, SurveyPreset):
            rng = self.preset.seeing_factor_range
        self.seeing_factor_range = check_seeing_factor_range(
            rng, "TrainingSetConfig.seeing_factor_range"
        )
        sc = float(self.seeing_band_scatter)
        if not (math.isfinite(sc) and 0 <= sc < 1):
            raise ValueError(f"TrainingSetConfig.seeing_band_scatter must be in [0, 1), got {sc!r}")
        self.seeing_band_scatter = sc

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainingSetConfig:
        """Build from plain data (YAML): ``population`` may be a mapping, ``preset`` a name.

        Unknown keys raise ValueError listing the known ones.
        """
        values = known_fields(cls, data, what="TrainingSetConfig fields")
        for key in ("bands", "class_fractions", "seeing_factor_range"):
            if values.get(key) is not None and not isinstance(values[key], str):
                values[key] = tuple(values[key])
        pop = values.get("population")
        if isinstance(pop, Mapping):
            ranges: dict[str, Any] = {
                k: tuple(v) if isinstance(v, list) else v for k, v in pop.items()
            }
            values["population"] = LensPopulation(**ranges)
        return cls(**values)


def class_counts(fractions: Sequence[float], n: int) -> list[int]:
    """Split ``n`` into per-kind counts by the largest-remainder method (exact, deterministic)."""
    raw = [f * n for f in fractions]
    counts = [math.floor(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda k: (raw[k] - counts[k], -k), reverse=True)
    for k in order[: n - sum(counts)]:
        counts[k] += 1
    return counts


# --------------------------------------------------------------------------------------
# real cutouts
# --------------------------------------------------------------------------------------
@dataclass
class RealCutouts:
    """Galaxy cutouts from a survey store, used for kinds 2 and 3.

    Attributes
    ----------
    images : Tensor
        ``(M, B, S, S)`` float32 counts (in ``zero_point``), no NaN (edge stamps are dropped).
    offset_x_arcsec, offset_y_arcsec : Tensor
        ``(M,)`` catalogue position of each galaxy relative to the stamp-centre pixel
        ``S // 2`` (within half a pixel), where kind-2 arcs are centred.
    bands : tuple of str
        Band order of ``images``.
    pixel_scale_arcsec, zero_point : float
        Of the survey.
    tile_ids : list of str
        Tile of each cutout.
    ids : ndarray
        Catalogue ``id`` of each cutout.
    url : str
        Survey URL (provenance).
    hard_negatives : RealCutouts or None
        Mined hard negatives (kind 5), read alongside (see
        :func:`lenscan.datasets.load_real_cutouts`).
    seeing_factor : Tensor or None
        ``(M, B)`` seeing of each cutout's tile over the survey preset's, per band, as a
        synthetic survey records it (``synthetic.seeing_factor_per_band``; 1 where a tile does
        not); None when no tile records it. Kind-2 arcs are convolved at it.

    Masked pixels (the survey's mask bits, or weight 0) are NaN, as the scan makes them.
    """

    images: torch.Tensor
    offset_x_arcsec: torch.Tensor
    offset_y_arcsec: torch.Tensor
    bands: tuple[str, ...]
    pixel_scale_arcsec: float
    zero_point: float
    tile_ids: list[str]
    ids: np.ndarray
    url: str = ""
    hard_negatives: RealCutouts | None = None
    seeing_factor: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[0] < 1:
            raise ValueError(
                f"RealCutouts.images must be (M>=1, B, S, S), got {tuple(self.images.shape)}"
            )
        m = self.images.shape[0]
        for name in ("offset_x_arcsec", "offset_y_arcsec"):
            if getattr(self, name).shape != (m,):
                raise ValueError(f"RealCutouts.{name} must have shape ({m},)")
        if self.images.shape[1] != len(self.bands):
            raise ValueError(
                f"RealCutouts has {self.images.shape[1]} image planes for bands {self.bands}"
            )
        if bool(torch.isinf(self.images).any()):
            raise ValueError("RealCutouts.images must be finite or NaN (masked pixels)")
        if self.seeing_factor is not None and tuple(self.seeing_factor.shape) != (
            m,
            len(self.bands),
        ):
            raise ValueError(f"RealCutouts.seeing_factor must have shape ({m}, {len(self.bands)})")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def stamp_size_pix(self) -> int:
        """Stamp side ``S``."""
        return int(self.images.shape[-1])

    @classmethod
    def from_survey(
        cls,
        url: str,
        *,
        bands: Sequence[str],
        stamp_size_pix: int,
        max_cutouts: int,
        seed: int,
        storage_options: Mapping[str, Any] | None = None,
        selection: str = "galaxies",
        exclude_truth: bool = True,
        only_ids: Mapping[str, Sequence[int]] | None = None,
    ) -> RealCutouts:
        """Read up to ``max_cutouts`` random galaxy stamps from the survey store at ``url``.

        Galaxies are catalogue rows with ``extended_class >= 2``, ``flags == 0`` and measured
        magnitudes in ``bands``; ``selection`` other than ``"galaxies"`` names a
        :mod:`lenscan.select` colour cut they must also pass. Stamps that would leave the tile
        are skipped. With ``exclude_truth``, objects listed in a ``truth.parquet`` beside the
        store (injected lenses of :func:`lenscan.simulate.make_survey`) are skipped too, so
        negatives are not real lenses. Tiles are visited in a random order (``seed``) and the
        catalogue is read first, so only the stamps kept are read (in bulk, per tile).
        ``only_ids`` (tile -> catalogue ids) restricts the cutouts to those objects (mined
        hard negatives). Masked pixels (mask bits or weight 0) are NaN.

        Raises
        ------
        ValueError
            When the survey lacks a band or holds no usable galaxy.
        """
        from lenscan.survey import open_survey

        for name, value in (("max_cutouts", max_cutouts), ("stamp_size_pix", stamp_size_pix)):
            if isinstance(value, bool) or int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value!r}")
        store = open_survey(url, storage_options=storage_options)
        bands = tuple(str(b).lower() for b in bands)
        missing = [b for b in bands if b not in store.bands]
        if missing:
            raise ValueError(
                f"survey {url} has bands {store.bands}; bands {missing} were requested"
            )
        pick = _CutoutPick(
            size=int(stamp_size_pix),
            bands=bands,
            plane=[store.bands.index(b) for b in bands],
            cut=None if selection == "galaxies" else _colour_cut(selection),
            excluded=truth_ids(url, storage_options) if exclude_truth else np.zeros(0, np.int64),
            only_ids=only_ids,
        )
        rng = np.random.default_rng(seed)
        tile_ids = list(store.tile_ids)
        if only_ids is not None:
            tile_ids = [t for t in tile_ids if t in only_ids]
        if not tile_ids:
            raise ValueError(f"survey {url} has no complete tiles")
        rng.shuffle(tile_ids)
        parts, scale, zero_point = _read_cutouts(store, tile_ids, pick, int(max_cutouts), rng)
        if sum(len(part.ids) for part in parts) == 0:
            raise ValueError(
                f"survey {url}: no galaxy (extended_class >= 2, clean flags, measured {bands}, "
                f"selection {selection!r}) has a complete {pick.size} px stamp"
            )
        return cls(
            images=torch.from_numpy(np.concatenate([part.images for part in parts])),
            offset_x_arcsec=torch.from_numpy(
                np.concatenate([part.offset_x for part in parts]).astype(np.float32)
            ),
            offset_y_arcsec=torch.from_numpy(
                np.concatenate([part.offset_y for part in parts]).astype(np.float32)
            ),
            bands=bands,
            pixel_scale_arcsec=float(scale),
            zero_point=float(zero_point),
            tile_ids=[part.tile_id for part in parts for _ in range(len(part.ids))],
            ids=np.concatenate([part.ids for part in parts]),
            url=str(url),
            seeing_factor=_cutout_seeing(parts),
        )


@dataclass
class _CutoutPick:
    """Which catalogue rows :meth:`RealCutouts.from_survey` may cut, and how."""

    size: int
    bands: tuple[str, ...]
    plane: list[int]  # image planes of ``bands`` in the store
    cut: Any  # a lenscan.select colour cut, or None for all galaxies
    excluded: np.ndarray  # catalogue ids never cut (injected lenses and companions)
    only_ids: Mapping[str, Sequence[int]] | None


@dataclass
class _TileCutouts:
    """The cutouts read from one tile."""

    tile_id: str
    images: np.ndarray
    offset_x: np.ndarray
    offset_y: np.ndarray
    ids: np.ndarray
    seeing: np.ndarray | None = None  # (B,) the tile's seeing factor per band, if recorded


def _tile_seeing_factors(tile: Any, bands: Sequence[str]) -> np.ndarray | None:
    """The per-band seeing factor a synthetic survey recorded for ``tile`` (None if none)."""
    attrs = getattr(tile, "attrs", None) or {}
    per_band = (attrs.get("extra") or {}).get("synthetic", {}).get("seeing_factor_per_band")
    if not isinstance(per_band, Mapping):
        return None
    return np.array([float(per_band.get(b, 1.0)) for b in bands], dtype=np.float32)


def _cutout_seeing(parts: Sequence[_TileCutouts]) -> torch.Tensor | None:
    """``(M, B)`` seeing factors of the cutouts (1 for tiles without), None if no tile has any."""
    if all(part.seeing is None for part in parts):
        return None
    rows = [
        np.broadcast_to(part.seeing if part.seeing is not None else np.float32(1.0),
                        (len(part.ids), part.images.shape[1]))
        for part in parts
    ]  # fmt: skip
    return torch.from_numpy(np.concatenate(rows).astype(np.float32))


def _read_cutouts(
    store: Any,
    tile_ids: Sequence[str],
    pick: _CutoutPick,
    max_cutouts: int,
    rng: np.random.Generator,
) -> tuple[list[_TileCutouts], float, float]:
    """Cutouts of the tiles in order, about as many per tile, until ``max_cutouts``.

    Returns the per-tile cutouts and the pixel scale and zero point (of the first tile) that
    they all share.
    """
    per_tile = max(1, math.ceil(max_cutouts / len(tile_ids)))
    parts: list[_TileCutouts] = []
    scale = zero_point = math.nan
    for tile_id in tile_ids:
        n_have = sum(len(part.ids) for part in parts)
        if n_have >= max_cutouts:
            break
        tile = store.tile(tile_id)
        if math.isnan(scale):
            scale, zero_point = tile.pixel_scale_arcsec, tile.zero_point
        want = min(per_tile, max_cutouts - n_have)
        part = _tile_cutouts(tile, tile_id, pick, want, rng, scale=scale, zero_point=zero_point)
        if part is not None:
            parts.append(part)
    return parts, scale, zero_point


def _colour_cut(selection: str) -> Any:
    """The :mod:`lenscan.select` colour cut named ``selection``."""
    from lenscan.select import get_colour_cut

    return get_colour_cut(selection)


def _usable_rows(
    tile: Any, tile_id: str, cat: Mapping[str, np.ndarray], pick: _CutoutPick
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows that may be cut (a clean galaxy whose stamp lies in the tile) and stamp origins."""
    ok = (cat["extended_class"] >= 2) & (cat["flags"] == 0)
    for b in pick.bands:
        mag = cat[f"mag_{b}"]
        ok &= np.isfinite(mag) & (mag < 90)
    if pick.cut is not None:
        from lenscan.select import colour_cut_mask

        ok &= colour_cut_mask(cat, pick.cut)
    ny, nx = tile.shape_yx
    size = pick.size
    finite = np.isfinite(cat["x"]) & np.isfinite(cat["y"])
    x0, y0 = stamp_origins(np.where(finite, cat["x"], 0.0), np.where(finite, cat["y"], 0.0), size)
    ok &= finite & (x0 >= 0) & (y0 >= 0) & (x0 + size <= nx) & (y0 + size <= ny)
    # Ids are global: a lens in a tile overlap, or its companion, is excluded everywhere.
    ok &= ~np.isin(cat["id"], pick.excluded)
    if pick.only_ids is not None:
        ok &= np.isin(cat["id"], np.asarray(pick.only_ids[tile_id], dtype=np.int64))
    return ok, x0, y0


def _tile_cutouts(
    tile: Any,
    tile_id: str,
    pick: _CutoutPick,
    want: int,
    rng: np.random.Generator,
    *,
    scale: float,
    zero_point: float,
) -> _TileCutouts | None:
    """Up to ``want`` random usable cutouts of one tile, masked and at ``zero_point``."""
    from lenscan.survey import read_stamps

    cat = tile.catalog()
    ok, x0, y0 = _usable_rows(tile, tile_id, cat, pick)
    rows = np.flatnonzero(ok)
    if rows.size == 0:
        return None
    rows = np.sort(rng.choice(rows, size=min(want, rows.size), replace=False))
    size = pick.size
    stamps, edge = read_stamps(tile, cat["x"][rows], cat["y"][rows], size)
    stamps = stamps[:, pick.plane]
    good = ~edge & np.isfinite(stamps).all(axis=(1, 2, 3))
    plane_name = "mask" if tile.mask is not None else "weight"
    if getattr(tile, plane_name) is not None:
        aux, _ = read_stamps(tile, cat["x"][rows], cat["y"][rows], size, array=plane_name)
        stamps, _ = mask_stamps(stamps, **{plane_name: aux[:, pick.plane]})
    # rescale to one zero point so tiles with different ZPs mix correctly
    stamps = stamps * np.float32(10 ** (0.4 * (zero_point - tile.zero_point)))
    rows, stamps = rows[good], stamps[good]
    return _TileCutouts(
        tile_id=tile_id,
        images=stamps.astype(np.float32),
        offset_x=(cat["x"][rows] - (x0[rows] + size // 2)) * scale,
        offset_y=(cat["y"][rows] - (y0[rows] + size // 2)) * scale,
        ids=cat["id"][rows].astype(np.int64),
        seeing=_tile_seeing_factors(tile, pick.bands),
    )


def truth_ids(url: str, storage_options: Mapping[str, Any] | None) -> np.ndarray:
    """Catalogue ids of a synthetic survey's injected lenses and companions.

    Parameters
    ----------
    url : str
        Survey store URL; the ``truth.parquet`` beside it (written by
        :func:`lenscan.simulate.make_survey`) is read.
    storage_options : mapping or None
        fsspec options for ``url``.

    Returns
    -------
    ndarray of int64
        The ids (:func:`lenscan.simulate.survey.injected_ids`); empty when there is no truth
        table (not a synthetic survey).
    """
    from lenscan.simulate.survey import injected_ids, read_truth

    try:
        truth = read_truth(url, storage_options=storage_options)
    except FileNotFoundError:
        return np.zeros(0, np.int64)
    return injected_ids(truth)


# --------------------------------------------------------------------------------------
# batches
# --------------------------------------------------------------------------------------
@dataclass
class TrainingBatch:
    """One batch of labelled training stamps.

    Attributes
    ----------
    images : Tensor
        ``(N, B, S, S)`` raw counts.
    labels : Tensor
        ``(N,)`` float, 1 for lenses (kinds 0, 2), 0 otherwise.
    kind : Tensor
        ``(N,)`` int64 kind 0-6 (see the module docstring).
    theta_e_arcsec : Tensor
        ``(N,)`` Einstein radius, NaN for non-lenses.
    source_mag : Tensor
        ``(N,)`` unlensed source magnitude in the reference band (i if rendered, else the
        first band), NaN for non-lenses.
    source_snr : Tensor
        ``(N,)`` matched-filter S/N of the lensed source over the bands, NaN for non-lenses.
    lensed_source_mag : Tensor
        ``(N,)`` magnitude of the lensed source light in the stamp (reference band), NaN for
        non-lenses.
    bands : tuple of str
        Band order of ``images``.
    seeing_factor : Tensor or None
        ``(N,)`` seeing of each simulated stamp over the preset's (mean over bands; for kind 2
        its arc's), NaN for real cutouts and where the config fixes the seeing.
    source_clumpy : Tensor or None
        ``(N,)`` 1.0 for a lens with a clumpy source, 0.0 for a smooth one, NaN for non-lenses.
    off_centre_arcsec : Tensor or None
        ``(N,)`` distance from the stamp centre of the galaxy a stamp is *not* centred on: the
        lens or red galaxy of kind 6, the host of a merger centred on its second galaxy (kind
        4); NaN elsewhere.
    """

    images: torch.Tensor
    labels: torch.Tensor
    kind: torch.Tensor
    theta_e_arcsec: torch.Tensor
    source_mag: torch.Tensor
    source_snr: torch.Tensor
    lensed_source_mag: torch.Tensor
    bands: tuple[str, ...]
    seeing_factor: torch.Tensor | None = None
    source_clumpy: torch.Tensor | None = None
    off_centre_arcsec: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str) -> TrainingBatch:
        """A copy with every tensor on ``device``."""
        values: dict[str, Any] = {
            f.name: (v.to(device) if isinstance(v, torch.Tensor) else v)
            for f in fields(self)
            for v in (getattr(self, f.name),)
        }
        return TrainingBatch(**values)


def _seeing_factors(
    config: TrainingSetConfig, m: int, generator: torch.Generator, device: torch.device
) -> torch.Tensor | None:
    """``(m, B)`` seeing factors of ``m`` stamps (None when the config fixes the seeing).

    A factor per stamp uniform in ``seeing_factor_range``, each band's scattered about it.
    """
    rng = config.seeing_factor_range
    if rng is None:
        return None
    if isinstance(rng, str):
        raise TypeError("TrainingSetConfig.seeing_factor_range is unresolved; build a new config")
    nb = len(_resolved(config).bands)
    u = torch.rand((m, 1), generator=generator, device=generator.device)
    t = torch.randn((m, nb), generator=generator, device=generator.device).clamp(-2, 2)
    factor = rng[0] + (rng[1] - rng[0]) * u
    return (factor * torch.exp(config.seeing_band_scatter * t)).to(device)


def _seeing_truth(seeing: torch.Tensor | None, m: int, device: torch.device) -> torch.Tensor:
    """The per-stamp seeing factor of the truth: the mean over bands, NaN when fixed."""
    if seeing is None:
        return torch.full((m,), float("nan"), device=device)
    return seeing.mean(dim=1)


def _centre_on_neighbour(params: dict[str, torch.Tensor]) -> None:
    """Give every system its companion and move the system so that the companion sits where
    the lens was drawn (the stamp centre, within the population's centring scatter).

    Adds ``off_centre_arcsec``: the lens's distance from the stamp centre.
    """
    params["companion_present"] = torch.ones_like(params["companion_present"])
    for key in ("x", "y"):
        shift = params[f"lens_center_{key}_arcsec"] - params[f"companion_{key}_arcsec"]
        for name in (f"lens_center_{key}_arcsec", f"source_{key}_arcsec",
                     f"companion_{key}_arcsec"):  # fmt: skip
            params[name] = params[name] + shift
    params["off_centre_arcsec"] = torch.hypot(
        params["lens_center_x_arcsec"], params["lens_center_y_arcsec"]
    )


def _subset(params: Mapping[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[idx] for k, v in params.items()}


def _render_lensed(
    config: TrainingSetConfig,
    n: int,
    *,
    generator: torch.Generator,
    device: torch.device,
    with_lens: bool,
    centre_x: torch.Tensor | None = None,
    centre_y: torch.Tensor | None = None,
    seeing: torch.Tensor | None = None,
    on_neighbour: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Render ``n`` lensed systems, redrawing those whose arc S/N < config.min_source_snr.

    ``seeing`` ``(n, B)``: the systems' seeing factors (the real cutouts' own for kind 2);
    default drawn from the config. ``on_neighbour``: every system gets its companion, and the
    stamp is centred on it (kind 6).
    """

    def draw(
        m: int, cx: torch.Tensor | None, cy: torch.Tensor | None, given: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], RenderInfo]:
        params = sample_lens_systems(config.population, m, generator=generator, device=device)
        seeing = given if given is not None else _seeing_factors(config, m, generator, device)
        if cx is not None and cy is not None:
            # move the lens onto the real galaxy's position in its cutout, keeping the source
            # offset (and the companion's, unused here) relative to the lens
            for key, centre in (("x", cx), ("y", cy)):
                shift = centre - params[f"lens_center_{key}_arcsec"]
                for name in (f"lens_center_{key}_arcsec", f"source_{key}_arcsec"):
                    params[name] = params[name] + shift
        if on_neighbour:
            _centre_on_neighbour(params)
        images, info = render_systems(
            params,
            config.preset,
            config.stamp_size_pix,
            bands=config.bands,
            with_lens=with_lens,
            supersample=config.supersample,
            generator=generator,
            sky_counts_override=None if with_lens else 0.0,
            seeing_factor=seeing,
            return_info=True,
        )
        params["seeing_factor"] = _seeing_truth(seeing, m, device)  # kept through redraws
        return images, params, info

    images, params, info = draw(n, centre_x, centre_y, seeing)
    snr = info.source_snr_total
    lensed = info.lensed_source_mag
    for _ in range(_MAX_REDRAWS):
        low = torch.nonzero(snr < config.min_source_snr).flatten()
        if low.numel() == 0:
            break
        cx = None if centre_x is None else centre_x[low]
        cy = None if centre_y is None else centre_y[low]
        given = None if seeing is None else seeing[low]
        new_img, new_params, new_info = draw(int(low.numel()), cx, cy, given)
        images[low] = new_img
        for k in params:
            params[k][low] = new_params[k]
        snr[low] = new_info.source_snr_total
        lensed[low] = new_info.lensed_source_mag
    return images, params, (snr, lensed)


def _pick_real(
    real: RealCutouts, n: int, *, generator: torch.Generator, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` random cutouts (with replacement) with random flips; offsets follow the flips."""
    images, offx, offy, _ = _pick_real_indexed(real, n, generator=generator, device=device)
    return images, offx, offy


def _pick_real_indexed(
    real: RealCutouts, n: int, *, generator: torch.Generator, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_pick_real` and the indices of the cutouts picked."""
    idx = torch.randint(len(real), (n,), generator=generator, device=generator.device).cpu()
    images = real.images[idx].to(device)
    offx = real.offset_x_arcsec[idx].to(device)
    offy = real.offset_y_arcsec[idx].to(device)
    flips = torch.rand((n, 2), generator=generator, device=generator.device).to(device) < 0.5
    s = real.stamp_size_pix
    # a flip maps pixel p -> S-1-p; the centre pixel S//2 moves by S-1-2(S//2) (1 px for even S)
    shift = (s - 1 - 2 * (s // 2)) * real.pixel_scale_arcsec
    fx, fy = flips[:, 0], flips[:, 1]
    images = torch.where(fx.view(-1, 1, 1, 1), images.flip(-1), images)
    images = torch.where(fy.view(-1, 1, 1, 1), images.flip(-2), images)
    offx = torch.where(fx, shift - offx, offx)
    offy = torch.where(fy, shift - offy, offy)
    return images, offx, offy, idx


def make_training_batch(
    config: TrainingSetConfig,
    n: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    real_cutouts: RealCutouts | None = None,
) -> TrainingBatch:
    """Make ``n`` labelled stamps in the four kinds, in random order.

    The number of stamps of each kind follows ``config.class_fractions`` exactly (largest
    remainder), so labels are balanced batch by batch.

    Parameters
    ----------
    config : TrainingSetConfig
        What to make.
    n : int
        Batch size (>= 1).
    generator : torch.Generator, optional
        Source of all randomness; default ``torch.Generator(device).manual_seed(config.seed)``
        (then every call returns the same batch: pass a generator to get fresh batches).
    device : torch.device or str, optional
        Where to simulate; default the generator's device.
    real_cutouts : RealCutouts, optional
        Cutouts for kinds 2 and 3; read from ``config.survey_url`` when needed and not given
        (pass them when making many batches: reading is the slow part).

    Returns
    -------
    TrainingBatch

    Examples
    --------
    >>> import torch
    >>> config = TrainingSetConfig(stamp_size_pix=32)
    >>> batch = make_training_batch(config, 8, generator=torch.Generator().manual_seed(0))
    >>> batch.images.shape, int(batch.labels.sum())
    (torch.Size([8, 3, 32, 32]), 4)
    """
    generator, device = _batch_generator(config, n, generator, device)
    res = _resolved(config)
    counts = class_counts(res.fractions, n)
    real, hard = _cutouts_for(config, res, counts, real_cutouts)
    size = config.stamp_size_pix
    images = torch.empty((n, len(res.bands), size, size), device=device)
    kind = torch.cat(
        [torch.full((c,), k, dtype=torch.int64, device=device) for k, c in enumerate(counts)]
    )
    lensed = {key: torch.full((n,), float("nan"), device=device) for key in _LENSED_FIELDS}
    start = 0
    for k, c in enumerate(counts):
        if c == 0:
            continue
        sl = slice(start, start + c)
        start += c
        img, truth = _make_kind(
            k, c, config, res, generator=generator, device=device, real=real, hard=hard
        )
        images[sl] = img
        for key, values in (truth or {}).items():
            lensed[key][sl] = values
    if config.artefact_probability > 0:
        images = add_stamp_artefacts(
            images, config, probability=config.artefact_probability, generator=generator
        )
    perm = torch.randperm(n, generator=generator, device=generator.device).to(device)
    labels = torch.tensor(KIND_LABELS, dtype=torch.float32, device=device)[kind]
    return TrainingBatch(
        images=images[perm],
        labels=labels[perm],
        kind=kind[perm],
        **{key: values[perm] for key, values in lensed.items()},
        bands=res.bands,
    )


def _batch_generator(
    config: TrainingSetConfig,
    n: int,
    generator: torch.Generator | None,
    device: torch.device | str | None,
) -> tuple[torch.Generator, torch.device]:
    """Check :func:`make_training_batch`'s arguments; its generator and device."""
    if not isinstance(config, TrainingSetConfig):
        raise TypeError(f"config must be a TrainingSetConfig, got {type(config).__name__}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device)
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(config.seed)
    return generator, device


#: The truth of a batch (NaN where it does not apply), in :class:`TrainingBatch` field names.
_LENSED_FIELDS = (
    "theta_e_arcsec", "source_mag", "source_snr", "lensed_source_mag", "seeing_factor",
    "source_clumpy", "off_centre_arcsec",
)  # fmt: skip


@dataclass(frozen=True)
class _Resolved:
    """The fields of a :class:`TrainingSetConfig` as its ``__post_init__`` resolved them."""

    preset: SurveyPreset
    bands: tuple[str, ...]
    fractions: tuple[float, ...]
    confusers: ConfuserPopulation


def _resolved(config: TrainingSetConfig) -> _Resolved:
    """``config``'s preset, bands, class fractions and confusers, checked to be resolved."""
    preset, bands, fractions = config.preset, config.bands, config.class_fractions
    confusers = config.confusers
    if (
        not isinstance(preset, SurveyPreset)
        or bands is None
        or fractions is None
        or not isinstance(confusers, ConfuserPopulation)
    ):
        raise TypeError(
            "TrainingSetConfig was changed after construction (preset, bands, class_fractions "
            "or confusers are unresolved); build a new one, e.g. with dataclasses.replace"
        )
    return _Resolved(preset, bands, tuple(fractions), confusers)


def _check_build_survey(spec: Any, survey_url: str | None) -> dict[str, Any] | None:
    """``build_survey`` as a dict of :func:`~lenscan.simulate.make_survey` arguments, checked."""
    if spec is None:
        return None
    import inspect

    from lenscan.simulate.survey import make_survey

    if not isinstance(spec, Mapping) or not survey_url:
        raise ValueError(
            "TrainingSetConfig.build_survey must be a mapping of make_survey arguments, and "
            "needs survey_url (where to build it)"
        )
    allowed = set(inspect.signature(make_survey).parameters) - {"url", "storage_options"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ValueError(
            f"TrainingSetConfig.build_survey: unknown make_survey arguments {unknown}; "
            f"known: {sorted(allowed)}"
        )
    return dict(spec)


def _cutouts_for(
    config: TrainingSetConfig,
    res: _Resolved,
    counts: Sequence[int],
    real_cutouts: RealCutouts | None,
) -> tuple[RealCutouts | None, RealCutouts | None]:
    """Real cutouts (kinds 2, 3) and hard negatives (kind 5) that the batch needs, matched."""
    if (counts[2] or counts[3]) and real_cutouts is None:
        if config.survey_url is None:
            raise ValueError("TrainingSetConfig: kinds 2 and 3 (real galaxies) need survey_url")
        real_cutouts = RealCutouts.from_survey(
            config.survey_url,
            bands=res.bands,
            stamp_size_pix=config.stamp_size_pix,
            max_cutouts=config.max_real_cutouts,
            seed=config.seed,
            storage_options=config.storage_options,
            selection=config.real_selection,
        )
    if real_cutouts is not None and (counts[2] or counts[3]):
        real_cutouts = _matching_cutouts(real_cutouts, config)
    hard = None
    if counts[5]:
        hard = real_cutouts.hard_negatives if real_cutouts is not None else None
        hard = _matching_cutouts(read_hard_negatives(config) if hard is None else hard, config)
    return real_cutouts, hard


def _required(cutouts: RealCutouts | None, kind: int) -> RealCutouts:
    """``cutouts``, which kind ``kind`` needs."""
    if cutouts is None:
        raise ValueError(f"kind {kind} ({KIND_NAMES[kind]}) needs real cutouts")
    return cutouts


def _make_kind(
    k: int,
    c: int,
    config: TrainingSetConfig,
    res: _Resolved,
    *,
    generator: torch.Generator,
    device: torch.device,
    real: RealCutouts | None,
    hard: RealCutouts | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """``c`` stamps of kind ``k`` and their truth (lens kinds 0, 2; seeing of simulated ones)."""
    if k in (0, 2):
        return _make_lenses(k, c, config, res, generator=generator, device=device, real=real)
    if k == 1:
        return _make_lens_galaxies(c, config, res, generator=generator, device=device)
    if k == 4:
        return _make_confusers(c, config, res, generator=generator, device=device)
    if k == 6:
        return _make_neighbour_centred(c, config, res, generator=generator, device=device)
    img, _, _ = _pick_real(
        _required(real if k == 3 else hard, k), c, generator=generator, device=device
    )
    return img, None


def _make_lens_galaxies(
    c: int,
    config: TrainingSetConfig,
    res: _Resolved,
    *,
    generator: torch.Generator,
    device: torch.device,
    on_neighbour: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Kind 1: ``c`` lens galaxies without a source (centred on their neighbour: kind 6)."""
    params = sample_lens_systems(config.population, c, generator=generator, device=device)
    if on_neighbour:
        _centre_on_neighbour(params)
    seeing = _seeing_factors(config, c, generator, device)
    img = render_systems(
        params,
        res.preset,
        config.stamp_size_pix,
        bands=res.bands,
        with_source=False,
        supersample=config.supersample,
        generator=generator,
        seeing_factor=seeing,
    )
    truth = {"seeing_factor": _seeing_truth(seeing, c, device)}
    if on_neighbour:
        truth["off_centre_arcsec"] = params["off_centre_arcsec"]
    return img, truth


def _make_confusers(
    c: int,
    config: TrainingSetConfig,
    res: _Resolved,
    *,
    generator: torch.Generator,
    device: torch.device,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Kind 4: ``c`` confusers, ``merger_second_fraction`` of them mergers centred on their
    second galaxy (drawn after the others, so a config without them draws as before)."""
    n_second = round(c * config.merger_second_fraction)
    off = torch.full((c,), float("nan"), device=device)
    parts = []
    if c - n_second:
        parts.append(sample_confusers(res.confusers, c - n_second, generator=generator,
                                      device=device))  # fmt: skip
    if n_second:
        second = sample_confusers(res.confusers, n_second, kinds=["merger"] * n_second,
                                  generator=generator, device=device)  # fmt: skip
        # the pair and its tail move so that the second galaxy sits where the host was drawn
        second["center_x_arcsec"] = second["center_x_arcsec"] - second["companion_x_arcsec"]
        second["center_y_arcsec"] = second["center_y_arcsec"] - second["companion_y_arcsec"]
        off[c - n_second :] = torch.hypot(second["center_x_arcsec"], second["center_y_arcsec"])
        parts.append(second)
    cparams = {key: torch.cat([q[key] for q in parts]) for key in parts[0]}
    seeing = _seeing_factors(config, c, generator, device)
    img, _ = render_confusers(
        cparams, res.preset, config.stamp_size_pix, bands=res.bands,
        supersample=config.supersample, generator=generator, seeing_factor=seeing,
    )  # fmt: skip
    truth = {"seeing_factor": _seeing_truth(seeing, c, device)}
    if n_second:
        truth["off_centre_arcsec"] = off
    return img, truth


def _make_neighbour_centred(
    c: int,
    config: TrainingSetConfig,
    res: _Resolved,
    *,
    generator: torch.Generator,
    device: torch.device,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Kind 6: ``neighbour_lens_fraction`` of ``c`` lenses with their arcs, the rest lens-like
    galaxies, each 1-3" off-centre, the stamp centred on its neighbour (label 0)."""
    n_lens = round(c * config.neighbour_lens_fraction)
    images, offs, seeing = [], [], []
    if n_lens:
        img, params, _ = _render_lensed(
            config, n_lens, generator=generator, device=device, with_lens=True,
            on_neighbour=True,
        )  # fmt: skip
        images.append(img)
        offs.append(params["off_centre_arcsec"])
        seeing.append(params["seeing_factor"])
    if c - n_lens:
        img, truth = _make_lens_galaxies(
            c - n_lens, config, res, generator=generator, device=device, on_neighbour=True
        )
        images.append(img)
        offs.append(truth["off_centre_arcsec"])
        seeing.append(truth["seeing_factor"])
    return torch.cat(images), {
        "seeing_factor": torch.cat(seeing),
        "off_centre_arcsec": torch.cat(offs),
    }


def _make_lenses(
    k: int,
    c: int,
    config: TrainingSetConfig,
    res: _Resolved,
    *,
    generator: torch.Generator,
    device: torch.device,
    real: RealCutouts | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Kind 0 (simulated lens) or 2 (real galaxy + simulated arc) and the lens truth."""
    if k == 0:
        img, params, (snr, lensed_mag) = _render_lensed(
            config, c, generator=generator, device=device, with_lens=True
        )
    else:
        cutouts = _required(real, k)
        galaxies, offx, offy, idx = _pick_real_indexed(
            cutouts, c, generator=generator, device=device
        )
        # the arc is seen through its galaxy's PSF when the survey recorded the tile's seeing
        seeing = None
        if cutouts.seeing_factor is not None and config.seeing_factor_range is not None:
            seeing = cutouts.seeing_factor[idx].to(device)
        arcs, params, (snr, lensed_mag) = _render_lensed(
            config, c, generator=generator, device=device, with_lens=False,
            centre_x=offx, centre_y=offy, seeing=seeing,
        )  # fmt: skip
        img = galaxies + arcs
    ref = "i" if "i" in res.bands else res.bands[0]
    truth = {
        "theta_e_arcsec": params["theta_e_arcsec"],
        "source_mag": params[f"source_mag_{ref}"],
        "source_snr": snr,
        "lensed_source_mag": lensed_mag[:, res.bands.index(ref)],
        "seeing_factor": params["seeing_factor"],
        "source_clumpy": params.get("source_clumpy", torch.zeros_like(snr)),
    }
    return img, truth


def _matching_cutouts(real: RealCutouts, config: TrainingSetConfig) -> RealCutouts:
    """Check that ``real`` fits the config (size, pixel scale, bands) and bring it to its ZP."""
    res = _resolved(config)
    preset = res.preset
    if real.stamp_size_pix != config.stamp_size_pix:
        raise ValueError(
            f"real cutouts are {real.stamp_size_pix} px, the training set wants "
            f"{config.stamp_size_pix} px; read them with stamp_size_pix={config.stamp_size_pix}"
        )
    if abs(real.pixel_scale_arcsec / preset.pixel_scale_arcsec - 1) > 0.01:
        raise ValueError(
            f'real cutouts have {real.pixel_scale_arcsec}"/px but preset {preset.name!r} '
            f'simulates {preset.pixel_scale_arcsec}"/px; use a preset matching the survey'
        )
    missing = [b for b in res.bands if b not in real.bands]
    if missing:
        raise ValueError(f"real cutouts lack bands {missing} (have {real.bands})")
    planes = [real.bands.index(b) for b in res.bands]
    images = real.images[:, planes]
    if real.zero_point != preset.zero_point:
        images = images * float(10 ** (0.4 * (preset.zero_point - real.zero_point)))
    if planes == list(range(len(real.bands))) and real.zero_point == preset.zero_point:
        return real
    return RealCutouts(
        images=images,
        offset_x_arcsec=real.offset_x_arcsec,
        offset_y_arcsec=real.offset_y_arcsec,
        bands=tuple(res.bands),
        pixel_scale_arcsec=real.pixel_scale_arcsec,
        zero_point=preset.zero_point,
        tile_ids=real.tile_ids,
        ids=real.ids,
        url=real.url,
        seeing_factor=None if real.seeing_factor is None else real.seeing_factor[:, planes],
    )


def read_hard_negatives(config: TrainingSetConfig) -> RealCutouts:
    """Read the cutouts listed in ``config.hard_negatives`` (kind 5), with their masks."""
    import pyarrow.parquet as pq

    path = config.hard_negatives
    try:
        table = pq.read_table(path).to_pydict()
    except (OSError, ValueError) as err:
        raise ValueError(f"hard_negatives {path!r}: cannot read it as Parquet ({err})") from err
    missing = [c for c in ("survey_url", "tile", "id") if c not in table]
    if missing or not table.get("id"):
        raise ValueError(f"hard_negatives {path!r}: needs rows with columns survey_url, tile, id")
    urls = sorted(set(table["survey_url"]))
    if len(urls) != 1:
        raise ValueError(f"hard_negatives {path!r}: rows come from several surveys {urls}")
    only: dict[str, list[int]] = {}
    for tile, i in zip(table["tile"], table["id"], strict=True):
        only.setdefault(str(tile), []).append(int(i))
    return RealCutouts.from_survey(
        urls[0],
        bands=_resolved(config).bands,
        stamp_size_pix=config.stamp_size_pix,
        max_cutouts=len(table["id"]),
        seed=config.seed,
        storage_options=config.storage_options,
        only_ids=only,
    )


def add_stamp_artefacts(
    images: torch.Tensor,
    config: TrainingSetConfig,
    *,
    probability: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """Give each stamp, with ``probability``, one artefact as a coadd shows it.

    Artefacts (equally likely): a cosmic-ray residual (sharp 1-5 px track in one band, 5-60
    sigma), a satellite trail (a PSF-wide line in one band, 1-6 sigma), a bad column (masked:
    NaN), a saturated star off-centre (its spikes and halo light, a masked core and bleed
    trail). Returns a new tensor; the labels do not change.
    """
    from lenscan.simulate.artefacts import (
        add_bad_column,
        add_bright_star_features,
        add_cosmic_rays,
        add_satellite_trail,
        saturate,
    )

    n = images.shape[0]
    hit = torch.rand((n,), generator=generator, device=generator.device) < probability
    idx = torch.nonzero(hit).flatten().cpu().numpy()
    if idx.size == 0:
        return images
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    rng = np.random.default_rng(seed)
    res = _resolved(config)
    preset = res.preset
    sigma = [preset.pixel_noise_sigma(b) for b in res.bands]
    sub = images[torch.as_tensor(idx, device=images.device)].detach().cpu().numpy().copy()
    _, nb, s, _ = sub.shape
    for j in range(len(idx)):
        img = sub[j]
        weight = np.ones_like(img)
        mask = np.zeros(img.shape, np.int32)
        what = rng.integers(0, 4)
        if what == 0:
            add_cosmic_rays(img, weight, rng, int(rng.integers(1, 4)), sigma)
        elif what == 1:
            add_satellite_trail(img, weight, rng, sigma)
        elif what == 2:
            y0 = int(rng.integers(0, s // 2))
            add_bad_column(img, weight, mask, int(rng.integers(0, s)), y0, s)
        else:
            # a bright star somewhere in or just outside the stamp (not on the centre)
            r, a = rng.uniform(0.3 * s, 0.7 * s), rng.uniform(0, 2 * math.pi)
            x, y = s / 2 + r * math.cos(a), s / 2 + r * math.sin(a)
            flux = 10 ** (-0.4 * (rng.uniform(13.0, 16.5) - preset.zero_point))
            star = np.zeros_like(img)
            yy, xx = np.mgrid[0:s, 0:s]
            fwhm = preset.seeing_for(res.bands[0]) / preset.pixel_scale_arcsec
            prof = (1 + ((xx - x) ** 2 + (yy - y) ** 2) / (fwhm / 1.02) ** 2) ** -3.0
            prof /= 2 * math.pi * (fwhm / 1.02) ** 2 / 4
            star += (flux * prof)[None].astype(img.dtype)
            add_bright_star_features(star, x, y, [flux] * nb)
            saturate(star, weight, mask, 1.5e4)
            img += star
        sub[j], _ = _masked_copy(img, mask, weight)
    out = images.clone()
    out[torch.as_tensor(idx, device=images.device)] = torch.from_numpy(sub).to(images.device)
    return out


def _masked_copy(
    img: np.ndarray, mask: np.ndarray, weight: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``img`` with its masked pixels NaN, and the masked fraction."""
    stamps, frac = mask_stamps(img[None], mask=mask[None], weight=weight[None])
    return stamps[0], frac[0]
