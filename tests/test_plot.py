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
            "score": np.linspace(0.99, 0.9, n),
            "score_m0": np.linspace(0.99, 0.9, n),
        },
        meta={"survey_url": url, "stamp_size_pix": 32},
    )
    fig = plot.candidate_grid(cand, n=5, ncols=3)
    images = [ax.images[0].get_array() for ax in fig.axes if ax.images]
    assert len(images) == 5 and images[0].shape == (32, 32, 3)
    assert all(np.asarray(im).std() > 0 for im in images)  # real stamps, not blank fill
    assert fig.axes[0].get_title().startswith("#1  0.990")
    page = cand._repr_html_()
    assert page.count('<img src="data:image/png;base64,') == n
    assert "<th>score</th>" in page and "score_m0" not in page
    cand.meta["survey_url"] = str(tmp_path / "missing.zarr")
    page = cand._repr_html_()
    assert "no thumbnails" in page and "<img" not in page and page.count("<tr>") == n + 1
