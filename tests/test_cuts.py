"""Colour-cut completeness on simulated lenses (lenscan.cuts, ``lenscan evaluate --cut``)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lenscan.cli import main
from lenscan.cuts import build_cut_surveys, cut_samples, evaluate_cut
from lenscan.select import DEFAULT_COLOUR_CUT, colour_cut_mask, get_colour_cut


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    work = tmp_path_factory.mktemp("cuts")
    urls = build_cut_surveys(str(work), [5], n_tiles=1, tile_size_pix=768, lenses_per_tile=30)
    return urls, cut_samples(urls)


def test_wide_cut_keeps_more_lenses_for_few_more_galaxies(samples):
    _, s = samples
    narrow = evaluate_cut("des-jacobs19", samples=s, seeds=[5])
    wide = evaluate_cut(DEFAULT_COLOUR_CUT, samples=s, seeds=[5])
    assert DEFAULT_COLOUR_CUT == "des-jacobs19-wide"
    assert narrow.n_lenses == wide.n_lenses == 30 and wide.n_galaxies > 50
    assert wide.completeness > narrow.completeness
    assert wide.completeness_bright >= 0.8
    assert 1.0 < wide.selected_ratio < 2.0 and narrow.selected_ratio == 1.0
    # the binned completeness adds up to the lenses inside the bins
    assert sum(r["n"] for r in wide.completeness_vs_theta_e) == wide.n_lenses
    # arc light makes lenses bluer than their lens galaxies: the catalogue g-i of the
    # lens + arc blend is below the lens galaxy's own colour
    lenses = s["lenses"]
    blend = lenses["mag_g"] - lenses["mag_i"]
    galaxy = lenses["lens_mag_g"] - lenses["lens_mag_i"]
    assert np.median(blend - galaxy) < -0.02 and np.mean(blend < galaxy) > 0.7
    text = wide.format()
    assert "des-jacobs19-wide" in text and "ratio" in text


def test_cut_needs_lenses_and_galaxies():
    with pytest.raises(ValueError, match="injected lenses and galaxies"):
        evaluate_cut("des-jacobs19", samples={"lenses": {}, "galaxies": {}})


def test_wide_preset_is_a_superset_in_colour():
    wide, narrow = get_colour_cut("des-jacobs19-wide"), get_colour_cut("des-jacobs19")
    cat = {
        "mag_g": np.array([22.0, 21.5, 19.5]),
        "mag_r": np.array([20.8, 20.8, 18.6]),
        "mag_i": np.array([20.0, 20.1, 17.9]),
        "extended_class": np.array([3, 3, 3]),
    }
    # g-i 2.0 passes both; g-i 1.4 neither; a bright lens (r = 18.6) only the wide cut
    assert colour_cut_mask(cat, narrow).tolist() == [True, False, False]
    assert colour_cut_mask(cat, wide).tolist() == [True, False, True]
    cat["extended_class"] = np.array([0, 3, 3])  # a star
    assert colour_cut_mask(cat, wide).tolist() == [False, False, True]


def test_cli_evaluate_cut(samples, tmp_path, capsys):
    urls, _ = samples
    rc = main(["evaluate", "--cut", "des-jacobs19", "--survey-url", urls[0],
               "--out", str(tmp_path)])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "colour cut 'des-jacobs19'" in out and "completeness vs Einstein radius" in out
    doc = json.loads((tmp_path / "cut-evaluation.json").read_text())
    assert doc["cut"] == "des-jacobs19" and doc["n_lenses"] == 30
