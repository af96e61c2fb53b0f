"""Colour cuts: the Jacobs et al. box, missing magnitudes, flags, presets and validation."""

import numpy as np
import pytest

from lenscan.select import COLOUR_CUTS, DES_JACOBS19, ColourCut, colour_cut_mask, get_colour_cut


def _cat(g, r, i, **extra):
    cols = {"mag_g": np.array(g, float), "mag_r": np.array(r, float), "mag_i": np.array(i, float)}
    cols.update({k: np.asarray(v) for k, v in extra.items()})
    return cols


def test_des_jacobs19_box_edges_are_strict():
    # inside; g-i = 1.75 (out); g-r = 3.0 exactly (out, strict); r too bright (out)
    cat = _cat(
        g=[22.0, 22.0, 23.5, 21.5],
        r=[21.0, 21.2, 20.5, 18.9],
        i=[20.0, 20.25, 19.0, 18.5],
    )
    assert colour_cut_mask(cat, DES_JACOBS19).tolist() == [True, False, False, False]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 99.0])
def test_missing_or_sentinel_magnitudes_never_pass(bad):
    cat = _cat(g=[22.0, bad], r=[21.0, 21.0], i=[20.0, 20.0])
    assert colour_cut_mask(cat, DES_JACOBS19).tolist() == [True, False]


def test_flags_and_star_class():
    cut = ColourCut(
        name="clean-galaxies",
        colour_ranges={"g-r": (0.0, 2.0)},
        flags_mask=0b11,
        min_extended_class=2,
    )
    cat = _cat(
        g=[22, 22, 22, 22], r=[21, 21, 21, 21], i=[20, 20, 20, 20],
        flags=[0, 4, 1, 0], extended_class=[3, 3, 3, 1],
    )  # fmt: skip
    assert colour_cut_mask(cat, cut).tolist() == [True, True, False, False]


def test_missing_column_is_named():
    with pytest.raises(KeyError, match="mag_i"):
        colour_cut_mask({"mag_g": np.zeros(2), "mag_r": np.zeros(2)}, DES_JACOBS19)


def test_round_trip_and_presets():
    d = DES_JACOBS19.to_dict()
    assert ColourCut.from_dict(d) == DES_JACOBS19
    assert get_colour_cut("des-jacobs19") is DES_JACOBS19
    assert get_colour_cut(d) == DES_JACOBS19
    assert DES_JACOBS19.bands == ("g", "i", "r")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"colour_ranges": {"g-i": (5.0, 1.8)}}, "low < high"),
        ({"colour_ranges": {"gi": (1.0, 2.0)}}, "look like 'g-r'"),
        ({"mag_min": {"r": float("nan")}}, "finite"),
        ({"flags_mask": -1}, "flags_mask"),
    ],
)
def test_invalid_cuts(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ColourCut(name="bad", **kwargs)


def test_unknown_preset_lists_known():
    with pytest.raises(ValueError, match="des-jacobs19"):
        get_colour_cut("nope")


def _row(g, r, i, extended_class=3):
    return {"g": g, "r": r, "i": i, "extended_class": extended_class}


#: For each preset: a row that passes, and rows that each break exactly one condition while
#: passing all the others (g-r, g-i, r-i ... are named so that a cut reading the wrong colour,
#: band or limit lets one of them through or stops the passing row).
PRESET_PINS = {
    "des-jacobs19": {
        "passes": _row(22.0, 20.8, 20.0),
        "g-i too blue": _row(22.0, 21.2, 20.3),
        "g-i too red": _row(25.5, 23.0, 20.4),
        "g-r too blue": _row(22.0, 21.5, 20.0),
        "g-r too red": _row(24.0, 20.9, 20.0),
        "r too bright": _row(20.5, 18.9, 18.4),
        "i too bright": _row(20.5, 19.3, 18.1),
        # g > 20 follows from i > 18.2 and g - i > 1.8: no row breaks it alone.
    },
    "des-jacobs19-wide": {
        "passes": _row(22.0, 20.8, 20.0),
        "g-i too blue": _row(22.0, 21.2, 20.6),
        "g-i too red": _row(25.5, 23.0, 20.4),
        "g-r too blue": _row(22.0, 21.5, 20.0),
        "g-r too red": _row(24.0, 20.9, 20.0),
        "r too bright": _row(19.9, 17.9, 17.9),
        "g too bright": _row(18.9, 18.1, 17.3),
        "i too bright": _row(19.5, 18.5, 17.1),
        "a star": _row(22.0, 20.8, 20.0, extended_class=1),
    },
}


# The Rubin and HSC cuts were chosen as the same box as the wide DES cut (docs/surveys.md).
PRESET_PINS["lsst-gri-wide"] = PRESET_PINS["hsc-gri-wide"] = PRESET_PINS["des-jacobs19-wide"]


@pytest.mark.parametrize(
    "preset, case",
    [(p, c) for p, rows in PRESET_PINS.items() for c in rows],
)
def test_each_preset_condition_is_pinned_by_a_row_that_breaks_only_it(preset, case):
    row = PRESET_PINS[preset][case]
    catalog = {
        "mag_g": np.array([row["g"]]),
        "mag_r": np.array([row["r"]]),
        "mag_i": np.array([row["i"]]),
        "extended_class": np.array([row["extended_class"]]),
    }
    assert colour_cut_mask(catalog, get_colour_cut(preset)).tolist() == [case == "passes"]


def test_every_colour_preset_is_pinned():
    # A new preset comes with its pins above (the "all" preset has no conditions to pin).
    assert set(COLOUR_CUTS) - {"all"} <= set(PRESET_PINS) | set(COLUMN_PINS)


def _q1_row(**change):
    row = {
        "mag_vis": 21.0, "gaia_match": 0, "vis_det": 1, "spurious_prob": 0.05,
        "segmentation_area": 400, "mu_max": 17.0, "mumax_minus_mag": -2.0,
    }  # fmt: skip
    row.update(change)
    return row


#: Presets that read other catalogue columns than g, r, i: a passing row and rows that each
#: break one condition, at or just past its edge (the inclusive edges pass in "passes at edges").
COLUMN_PINS = {
    "euclid-q1": {
        "passes": _q1_row(),
        "passes at edges": _q1_row(mag_vis=22.5, mu_max=15.0, mumax_minus_mag=-2.6),
        "VIS flux <= 0 (no magnitude)": _q1_row(mag_vis=np.nan),
        "too faint in VIS": _q1_row(mag_vis=22.51),
        "a Gaia match": _q1_row(gaia_match=1),
        "not detected in VIS": _q1_row(vis_det=0),
        "spurious": _q1_row(spurious_prob=0.2),
        "too small": _q1_row(segmentation_area=200),
        "surface brightness too bright": _q1_row(mu_max=14.99),
        "point-like (mumax - mag)": _q1_row(mumax_minus_mag=-2.61),
    },
    # The synthetic-Euclid stand-in: the Q1 magnitude limit on galaxies (strict: < 22.5).
    "euclid-vis-bright": {
        "passes": {"mag_vis": 22.49, "extended_class": 2},
        "VIS flux <= 0 (no magnitude)": {"mag_vis": np.nan, "extended_class": 3},
        "too faint in VIS": {"mag_vis": 22.5, "extended_class": 3},
        "a star": {"mag_vis": 20.0, "extended_class": 1},
    },
}


@pytest.mark.parametrize("preset, case", [(p, c) for p, rows in COLUMN_PINS.items() for c in rows])
def test_each_column_condition_is_pinned_by_a_row_that_breaks_only_it(preset, case):
    row = COLUMN_PINS[preset][case]
    catalog = {k: np.array([v], dtype=float) for k, v in row.items()}
    assert colour_cut_mask(catalog, get_colour_cut(preset)).tolist() == [case.startswith("passes")]


def test_every_column_preset_is_pinned_and_round_trips():
    # Cuts with column conditions are pinned in COLUMN_PINS (test_every_colour_preset_is_pinned
    # covers the colour presets of PRESET_PINS).
    with_columns = {n for n, c in COLOUR_CUTS.items() if c.column_conditions}
    assert with_columns <= set(COLUMN_PINS)
    for name in with_columns:
        cut = get_colour_cut(name)
        assert ColourCut.from_dict(cut.to_dict()) == cut
    assert "column_conditions" not in DES_JACOBS19.to_dict()  # DES presets' data unchanged
    with pytest.raises(ValueError, match="operator"):
        ColourCut(name="bad", column_conditions=[("mu_max", "=>", 15.0)])
    with pytest.raises(KeyError, match="spurious_prob"):
        colour_cut_mask({"mag_vis": np.zeros(1)}, get_colour_cut("euclid-q1"))
