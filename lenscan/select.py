"""Colour cuts: named boxes in colour-colour space plus magnitude limits and quality flags.

A cut is data (:class:`ColourCut`); :func:`colour_cut_mask` is a pure function from catalogue
columns to a boolean mask. Missing or non-finite magnitudes never pass. Surveys whose
preselection is not a colour box (Euclid Q1: detection, spurious-probability, size and surface
brightness conditions) add ``column_conditions``: ``(column, operator, value)`` triples on any
stored catalogue column, a NaN failing every one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

#: Comparison operators of ``ColourCut.column_conditions``.
_OPERATORS = {
    "<": np.less,
    "<=": np.less_equal,
    ">": np.greater,
    ">=": np.greater_equal,
    "==": np.equal,
    "!=": np.not_equal,
}


def _conditions(raw: Any) -> tuple[tuple[str, str, float], ...]:
    """Validated ``(column, operator, value)`` triples."""
    out = []
    for item in raw or ():
        try:
            column, op, value = item
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"column condition {item!r} must be (column, operator, number)"
            ) from None
        if op not in _OPERATORS:
            raise ValueError(
                f"column condition {item!r}: operator must be one of {list(_OPERATORS)}"
            )
        if not math.isfinite(value):
            raise ValueError(f"column condition {item!r}: the value must be finite")
        out.append((str(column), str(op), value))
    return tuple(out)


#: Magnitudes at or above this value are survey "not measured" sentinels (DES uses 99).
MAG_SENTINEL = 90.0


__all__ = [
    "ALL_SOURCES",
    "COLOUR_CUTS",
    "DEFAULT_COLOUR_CUT",
    "DES_JACOBS19",
    "DES_JACOBS19_WIDE",
    "EUCLID_Q1",
    "EUCLID_VIS_BRIGHT",
    "HSC_GRI_WIDE",
    "LSST_GRI_WIDE",
    "MAG_SENTINEL",
    "ColourCut",
    "colour_cut_mask",
    "get_colour_cut",
    "parse_colour",
]


def parse_colour(name: str) -> tuple[str, str]:
    """The two band names of a colour written ``"a-b"``.

    Examples
    --------
    >>> parse_colour("g-i")
    ('g', 'i')
    """
    parts = name.split("-")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"colour {name!r} must look like 'g-r' (two band names joined by '-')")
    return parts[0], parts[1]


@dataclass(frozen=True)
class ColourCut:
    """A box in colour space with magnitude limits, applied to a source catalogue.

    Parameters
    ----------
    name : str
        Short name recorded in the run provenance.
    colour_ranges : dict
        ``{"g-i": (1.8, 5.0), ...}``: each colour must lie strictly inside ``(low, high)``.
    mag_min : dict
        ``{"r": 19.0, ...}``: each magnitude must be strictly fainter (greater) than the limit;
        this drops saturated stars and very bright galaxies.
    mag_max : dict
        ``{"i": 24.0}``: each magnitude must be strictly brighter (less) than the limit.
    flags_mask : int
        Sources with ``flags & flags_mask != 0`` fail. ``0`` ignores flags.
    min_extended_class : int or None
        If set, sources with ``extended_class`` below it (stars) fail.
    column_conditions : sequence of (str, str, float)
        ``[("spurious_prob", "<", 0.2), ...]``: each stored catalogue column must satisfy its
        comparison (``<``, ``<=``, ``>``, ``>=``, ``==``, ``!=``); a NaN fails.
    """

    name: str
    colour_ranges: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    mag_min: Mapping[str, float] = field(default_factory=dict)
    mag_max: Mapping[str, float] = field(default_factory=dict)
    flags_mask: int = 0
    min_extended_class: int | None = None
    column_conditions: tuple[tuple[str, str, float], ...] = ()

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("ColourCut needs a non-empty name")
        ranges = {}
        for colour, bounds in dict(self.colour_ranges).items():
            parse_colour(colour)
            try:
                low, high = (float(b) for b in bounds)
            except (TypeError, ValueError) as exc:
                raise ValueError(
                    f"colour range for {colour!r} must be two numbers (low, high), got {bounds!r}"
                ) from exc
            if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
                raise ValueError(f"colour range for {colour!r} must have low < high, got {bounds}")
            ranges[colour] = (low, high)
        object.__setattr__(self, "colour_ranges", ranges)
        for attr in ("mag_min", "mag_max"):
            limits = {}
            for band, value in dict(getattr(self, attr)).items():
                value = float(value)
                if not math.isfinite(value):
                    raise ValueError(f"{attr}[{band!r}] must be finite, got {value}")
                limits[str(band)] = value
            object.__setattr__(self, attr, limits)
        if int(self.flags_mask) < 0:
            raise ValueError(f"flags_mask must be >= 0, got {self.flags_mask}")
        object.__setattr__(self, "column_conditions", _conditions(self.column_conditions))

    @property
    def bands(self) -> tuple[str, ...]:
        """Bands whose magnitudes the cut reads, in first-use order."""
        seen: dict[str, None] = {}
        for colour in self.colour_ranges:
            for band in parse_colour(colour):
                seen[band] = None
        for band in (*self.mag_min, *self.mag_max):
            seen[band] = None
        return tuple(seen)

    @property
    def columns(self) -> tuple[str, ...]:
        """Catalogue columns the cut reads besides magnitudes, flags and ``extended_class``."""
        return tuple(dict.fromkeys(c for c, _, _ in self.column_conditions))

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (for YAML, JSON provenance)."""
        d = asdict(self)
        d["colour_ranges"] = {k: list(v) for k, v in self.colour_ranges.items()}
        if self.column_conditions:
            d["column_conditions"] = [list(c) for c in self.column_conditions]
        else:  # cuts without conditions keep their earlier plain-data form
            del d["column_conditions"]
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ColourCut:
        """Build a cut from plain data; unknown keys are an error."""
        known = {"name", "colour_ranges", "mag_min", "mag_max", "flags_mask", "min_extended_class"}
        known.add("column_conditions")
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown colour-cut fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**dict(data))


#: Jacobs et al. 2019a, DES: 1.8 < g-i < 5, 0.6 < g-r < 3, r > 19, g > 20, i > 18.2.
DES_JACOBS19 = ColourCut(
    name="des-jacobs19",
    colour_ranges={"g-i": (1.8, 5.0), "g-r": (0.6, 3.0)},
    mag_min={"r": 19.0, "g": 20.0, "i": 18.2},
)

#: A lens-aware widening of ``des-jacobs19`` in the spirit of Jacobs et al. 2019b, who widened
#: their cut because a lens's catalogue photometry includes its arc's light, which makes g-i
#: bluer and the system brighter: 1.5 < g-i < 5, 0.6 < g-r < 3, r > 18, g > 19, i > 17.2,
#: galaxies only (``extended_class >= 2``, which drops the bright stars the magnitude limits
#: used to). Chosen on the calibration surveys of :data:`lenscan.cuts.CALIBRATION_SEEDS`: the
#: colour edge keeps bluer lens + arc blends, the magnitude limits keep lenses whose lens
#: galaxy is brighter than r = 19; measured trade-off in docs/training.md.
DES_JACOBS19_WIDE = ColourCut(
    name="des-jacobs19-wide",
    colour_ranges={"g-i": (1.5, 5.0), "g-r": (0.6, 3.0)},
    mag_min={"r": 18.0, "g": 19.0, "i": 17.2},
    min_extended_class=2,
)

#: The Euclid Q1 strong-lens search's targets (Walmsley et al. 2025, mwalmsley/bulk-euclid-
#: cutouts): VIS flux > 0 (a finite ``mag_vis``), no Gaia match, detected in VIS, spurious
#: probability < 0.2, segmentation area > 200 px, I_E <= 22.5, MU_MAX >= 15 and
#: MUMAX_MINUS_MAG >= -2.6 (columns as the ``euclid-q1`` ingest preset stores them).
EUCLID_Q1 = ColourCut(
    name="euclid-q1",
    column_conditions=(
        ("mag_vis", "<=", 22.5),
        ("gaia_match", "==", 0),
        ("vis_det", "==", 1),
        ("spurious_prob", "<", 0.2),
        ("segmentation_area", ">", 200),
        ("mu_max", ">=", 15.0),
        ("mumax_minus_mag", ">=", -2.6),
    ),
)

#: The part of ``euclid-q1`` that a catalogue without MER's detection and morphology columns
#: supports: galaxies (``extended_class >= 2``) with I_E < 22.5. The ``lenscan-euclid-v1``
#: training set drew its real-galaxy classes, and its threshold and check figures were
#: measured, with this cut (before ``make_survey`` measured the MER columns; both cuts'
#: completeness on the same surveys is in docs/surveys.md).
EUCLID_VIS_BRIGHT = ColourCut(name="euclid-vis-bright", mag_max={"vis": 22.5}, min_extended_class=2)

#: Rubin LSST (``lsst`` simulator preset, DP1-like depth): 1.5 < g-i < 5, 0.6 < g-r < 3,
#: r > 18, g > 19, i > 17.2, galaxies only. Chosen with :func:`lenscan.cuts.evaluate_cut` on
#: ``lsst`` surveys of the calibration seeds: the narrowest g-i edge of the grid 1.2-1.8 that
#: keeps >= 0.97 of the bright lenses (0.971 at 1.34x the galaxies of ``des-jacobs19``; the
#: fainter limits r > 19 keep 0.86). Figures on the check seeds in docs/surveys.md.
LSST_GRI_WIDE = ColourCut(
    name="lsst-gri-wide",
    colour_ranges={"g-i": (1.5, 5.0), "g-r": (0.6, 3.0)},
    mag_min={"r": 18.0, "g": 19.0, "i": 17.2},
    min_extended_class=2,
)

#: HSC-SSP Wide (``hsc`` simulator preset): the same box as ``lsst-gri-wide``, chosen the same
#: way on ``hsc`` surveys of the calibration seeds (0.975 of the bright lenses at 1.31x the
#: galaxies of ``des-jacobs19``; g-i > 1.35 would keep 0.987 at 1.47x).
HSC_GRI_WIDE = ColourCut(
    name="hsc-gri-wide",
    colour_ranges={"g-i": (1.5, 5.0), "g-r": (0.6, 3.0)},
    mag_min={"r": 18.0, "g": 19.0, "i": 17.2},
    min_extended_class=2,
)

#: Everything with finite g, r, i magnitudes (useful for tests and completeness studies).
ALL_SOURCES = ColourCut(name="all")

COLOUR_CUTS: dict[str, ColourCut] = {
    c.name: c
    for c in (DES_JACOBS19_WIDE, DES_JACOBS19, LSST_GRI_WIDE, HSC_GRI_WIDE, ALL_SOURCES, EUCLID_Q1)
}
COLOUR_CUTS[EUCLID_VIS_BRIGHT.name] = EUCLID_VIS_BRIGHT
#: The scan's default preselection.
DEFAULT_COLOUR_CUT = DES_JACOBS19_WIDE.name


def get_colour_cut(cut: str | ColourCut | Mapping[str, Any]) -> ColourCut:
    """Resolve a preset name, a mapping or a :class:`ColourCut` to a :class:`ColourCut`."""
    if isinstance(cut, ColourCut):
        return cut
    if isinstance(cut, str):
        try:
            return COLOUR_CUTS[cut]
        except KeyError:
            raise ValueError(
                f"unknown colour cut {cut!r}; presets: {sorted(COLOUR_CUTS)}, or give a mapping"
            ) from None
    if isinstance(cut, Mapping):
        return ColourCut.from_dict(cut)
    raise TypeError(f"colour_cut must be a name, mapping or ColourCut, got {type(cut).__name__}")


def _valid_mag(values: np.ndarray) -> np.ndarray:
    return np.isfinite(values) & (values < MAG_SENTINEL)


def colour_cut_mask(catalog: Mapping[str, np.ndarray], cut: ColourCut) -> np.ndarray:
    """Boolean mask of catalogue rows that pass ``cut``.

    Parameters
    ----------
    catalog : mapping of str to ndarray
        Columns ``mag_{band}`` for every band the cut uses, plus ``flags`` and
        ``extended_class`` when the cut tests them.
    cut : ColourCut

    Returns
    -------
    ndarray of bool
        True where every magnitude the cut reads is measured and every condition holds.

    Examples
    --------
    >>> import numpy as np
    >>> cat = {"mag_g": np.array([22.0, 21.0]), "mag_r": np.array([20.8, 20.9]),
    ...        "mag_i": np.array([19.9, 20.8])}
    >>> colour_cut_mask(cat, DES_JACOBS19).tolist()
    [True, False]
    """
    missing = [f"mag_{b}" for b in cut.bands if f"mag_{b}" not in catalog]
    if cut.flags_mask and "flags" not in catalog:
        missing.append("flags")
    if cut.min_extended_class is not None and "extended_class" not in catalog:
        missing.append("extended_class")
    missing += [c for c in cut.columns if c not in catalog and c not in missing]
    if missing:
        raise KeyError(f"colour cut {cut.name!r} needs catalogue columns {missing}")
    lengths = {len(np.asarray(v)) for v in catalog.values()}
    if len(lengths) > 1:
        raise ValueError(f"catalogue columns have different lengths: {sorted(lengths)}")
    n = lengths.pop() if lengths else 0
    mags = {b: np.asarray(catalog[f"mag_{b}"], dtype=np.float64) for b in cut.bands}
    keep = np.ones(n, dtype=bool)
    for mag in mags.values():
        keep &= _valid_mag(mag)
    with np.errstate(invalid="ignore"):
        for colour, (low, high) in cut.colour_ranges.items():
            a, b = parse_colour(colour)
            c = mags[a] - mags[b]
            keep &= (c > low) & (c < high)
        for band, limit in cut.mag_min.items():
            keep &= mags[band] > limit
        for band, limit in cut.mag_max.items():
            keep &= mags[band] < limit
    if cut.flags_mask:
        keep &= (np.asarray(catalog["flags"]).astype(np.int64) & int(cut.flags_mask)) == 0
    if cut.min_extended_class is not None:
        keep &= np.asarray(catalog["extended_class"]) >= cut.min_extended_class
    with np.errstate(invalid="ignore"):
        for column, op, value in cut.column_conditions:
            keep &= _OPERATORS[op](np.asarray(catalog[column], dtype=np.float64), value)
    return keep
