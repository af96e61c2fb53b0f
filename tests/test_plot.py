"""lenscan.plot: the figures' numbers and artists, and the candidate table's HTML view."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
from astropy.table import Table

from lenscan import plot
from lenscan.select import colour_cut_mask, get_colour_cut
from lenscan.simulate import make_survey
from lenscan.survey import open_survey
from lenscan.table import CandidateTable


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_binned_completeness_wilson_intervals():
    t = plot.binned_completeness([0.5, 0.6, 1.5, 1.6, 1.7, 2.5], [1, 0, 1, 1, 0, 1], [0, 1, 2])
    assert t["n"].tolist() == [2, 3] and t["k"].tolist() == [1, 2]  # 2.5 lies outside the bins
    np.testing.assert_allclose(t["completeness"], [0.5, 2 / 3])
    # Wilson interval at z = 1 for 1 of 2: 0.5 -/+ sqrt(0.75) / 3
    np.testing.assert_allclose([t["err_lo"][0], t["err_hi"][0]], [0.2113, 0.7887], atol=1e-3)
    assert np.all(t["err_lo"] <= t["completeness"]) and np.all(t["completeness"] <= t["err_hi"])
    empty = plot.binned_completeness([0.5], [True], [0, 1, 2])
    assert empty["n"].tolist() == [1, 0] and np.isnan(empty["completeness"][1])
    with pytest.raises(ValueError, match="same shape"):
        plot.binned_completeness([1, 2], [True], 3)


def test_colour_colour_draws_sources_selection_candidates_and_cut():
    rng = np.random.default_rng(0)
    n = 300
    cat = {
        "mag_g": rng.uniform(19, 24, n),
        "mag_r": rng.uniform(18, 23, n),
        "mag_i": rng.uniform(17, 22, n),
    }
    cat["mag_g"][0] = 99.0  # a DES "not measured" sentinel: not drawn
    cut = get_colour_cut("des-jacobs19")
    sel = colour_cut_mask(
        {**cat, "flags": np.zeros(n, int), "extended_class": np.full(n, 3)}, cut
    )  # fmt: skip
    cands = Table({k: v[sel][:5] for k, v in cat.items()})
    ax = plot.colour_colour(cat, cut, selected=sel, candidates=cands)
    grey, blue, red = ax.collections
    assert np.isfinite(grey.get_offsets()).all(axis=1).sum() == n - 1
    assert len(blue.get_offsets()) == sel.sum() > 0
    assert len(red.get_offsets()) == len(cands)
    np.testing.assert_allclose(red.get_offsets()[:, 0], cands["mag_g"] - cands["mag_r"])
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("g-r (mag)", "g-i (mag)")
    (box,) = ax.patches
    assert box.get_x() == cut.colour_ranges["g-r"][0]
    assert box.get_y() == cut.colour_ranges["g-i"][0]
    with pytest.raises(KeyError, match="mag_z"):
        plot.colour_colour(cat, x="g-z")


def test_score_histogram_and_completeness_plot():
    scores = np.linspace(0, 1, 101)
    lens = scores > 0.8
    ax = plot.score_histogram(scores, threshold=0.5, is_lens=lens, bins=10)
    heights = [p.get_height() for p in ax.patches]
    assert sum(heights) == 101
    assert ax.get_yscale() == "log" and ax.lines[0].get_xdata()[0] == 0.5
    ax = plot.completeness([0.5, 0.6, 1.5, 1.6], [1, 0, 1, 1], bins=[0, 1, 2], xlabel="theta_E")
    points = ax.containers[0].lines[0]  # the errorbar's data line (caps are lines too)
    np.testing.assert_allclose(points.get_ydata(), [0.5, 1.0])
    assert ax.get_xlabel() == "theta_E"
    assert ax.get_title() == ""  # nothing claimed when the caller names no model


def test_completeness_names_its_unit_model_and_threshold():
    from astropy.table import Column

    mags = Column([20.5, 21.0, 22.5, 23.0], name="source_mag_i")
    found = [1, 1, 0, 1]
    ax = plot.completeness(mags, found, bins=[20, 22, 24], xlabel="source magnitude i",
                           model="lenscan-des-v2", threshold=0.9981)  # fmt: skip
    assert ax.get_xlabel() == "source magnitude i (mag)"
    assert ax.get_title() == "found by model lenscan-des-v2, score >= 0.9981"
    ax = plot.completeness(Column([1.0, 1.5], name="theta_e_arcsec"), [1, 0], bins=2)
    assert ax.get_xlabel() == "theta_e_arcsec (arcsec)"
    ax = plot.completeness(mags, found, xlabel="i (AB mag)", threshold=0.5)
    assert ax.get_xlabel() == "i (AB mag)" and ax.get_title() == "found by score >= 0.500"


def test_format_score_tells_near_one_scores_apart():
    scores = [0.99991, 0.99985, 0.99972, 0.9981, 0.81, 1 - 3e-7]
    text = [plot.format_score(np.float32(s)) for s in scores]
    assert len(set(text)) == len(text) and "1.000" not in text
    assert text[:4] == ["0.999910", "0.99985", "0.99972", "0.9981"] and text[4] == "0.810"
    assert text[5].startswith("1 - 3") and plot.format_score(1.0) == "1"


def test_candidate_grid_and_table_html(tmp_path):
    url = str(tmp_path / "s.zarr")
    make_survey(url, n_tiles=1, seed=7, tile_size_pix=256, lenses_per_tile=2)
    survey = open_survey(url)
    tile = survey.tile(survey.tile_ids[0])
    cat = tile.catalog()
    n = 6
    cand = CandidateTable(
        {
            "rank": np.arange(1, n + 1),
            "tile": [tile.id] * n,
            "id": cat["id"][:n],
            "ra": cat["ra"][:n],
            "dec": cat["dec"][:n],
            "x": cat["x"][:n],
            "y": cat["y"][:n],
            "score": np.array([0.99991, 0.99985, 0.99972, 0.9981, 0.95, 0.9], np.float32),
            "score_m0": np.linspace(0.99, 0.9, n),
        },
        meta={"survey_url": url, "stamp_size_pix": 32},
    )
    fig = plot.candidate_grid(cand, n=5, ncols=3)
    images = [ax.images[0].get_array() for ax in fig.axes if ax.images]
    assert len(images) == 5 and images[0].shape == (32, 32, 3)
    assert all(np.asarray(im).std() > 0 for im in images)  # real stamps, not blank fill
    titles = [ax.get_title() for ax in fig.axes if ax.images]
    assert titles == ["#1  0.999910", "#2  0.99985", "#3  0.99972", "#4  0.9981", "#5  0.950"]
    page = cand._repr_html_()
    assert page.count('<img src="data:image/png;base64,') == n
    assert "<th>score</th>" in page and "score_m0" not in page
    cand.meta["survey_url"] = str(tmp_path / "missing.zarr")
    page = cand._repr_html_()
    assert "no thumbnails" in page and "<img" not in page and page.count("<tr>") == n + 1
