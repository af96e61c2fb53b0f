"""Injection-recovery support: arcs added around real galaxies, into a new store."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from lenscan.select import colour_cut_mask, get_colour_cut
from lenscan.simulate import get_survey_preset, make_survey
from lenscan.simulate.inject import ARC_STAMP_PIX, inject_arcs
from lenscan.survey import open_survey


def test_inject_arcs_around_selected_galaxies(tmp_path):
    src = str(tmp_path / "src.zarr")
    make_survey(src, n_tiles=1, seed=4, tile_size_pix=384, lenses_per_tile=0)
    before = np.asarray(open_survey(src).tile(open_survey(src).tile_ids[0]).image[...]).copy()
    dst = str(tmp_path / "dst.zarr")
    table = inject_arcs(src, dst, n_per_tile=6, seed=1)
    a, b = open_survey(src), open_survey(dst)
    tile_id = a.tile_ids[0]
    np.testing.assert_array_equal(np.asarray(a.tile(tile_id).image[...]), before)  # untouched
    diff = np.asarray(b.tile(tile_id).image[...]) - before
    cat = a.tile(tile_id).catalog()
    assert b.tile(tile_id).catalog()["id"].tolist() == cat["id"].tolist()
    assert 1 <= len(table) <= 6 and len(set(table["id"].tolist())) == len(table)
    hosts = np.isin(cat["id"], table["id"])
    assert colour_cut_mask(cat, get_colour_cut("des-jacobs19"))[hosts].all()
    # All added light lies in the arc stamps around the hosts, and there is some.
    near = np.zeros(diff.shape[1:], bool)
    h = ARC_STAMP_PIX // 2
    xs, ys = np.round(cat["x"][hosts]).astype(int), np.round(cat["y"][hosts]).astype(int)
    for x, y in zip(xs, ys, strict=True):
        near[y - h : y + h, x - h : x + h] = True
    assert np.abs(diff[:, ~near]).max() == 0 and diff[:, near].sum() > 0
    assert (table["theta_e_arcsec"] > 0).all() and (table["source_snr"] > 0).all()
    assert {"source_mag_i", "lensed_source_mag_g"} <= set(table.colnames)
    with pytest.raises(ValueError, match="must differ"):
        inject_arcs(src, src)
    coarse = dataclasses.replace(get_survey_preset("des"), pixel_scale_arcsec=0.4)
    with pytest.raises(ValueError, match="pixel"):
        inject_arcs(src, str(tmp_path / "x.zarr"), preset=coarse)
