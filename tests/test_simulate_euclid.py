"""The simulator's `euclid` preset: VIS and NISP on 0.1"/px, PSFs, depth and the noise it sets,
and a synthetic Euclid survey whose planes carry that noise."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lenscan.simulate._draws import colours_to_mags
from lenscan.simulate.presets import get_survey_preset, list_survey_presets
from lenscan.simulate.survey import make_survey
from lenscan.survey import open_survey


def test_euclid_preset_is_vis_and_nisp_on_the_vis_grid():
    p = get_survey_preset("euclid")
    assert "euclid" in list_survey_presets() and "des" in list_survey_presets()
    assert p.pixel_scale_arcsec == 0.1 and p.bands == ("vis", "y", "j", "h")
    assert 0.16 <= p.seeing_fwhm_arcsec["vis"] <= 0.2
    assert all(0.45 <= p.seeing_fwhm_arcsec[b] <= 0.5 for b in ("y", "j", "h"))
    assert p.depth_mag_10sigma["vis"] == 24.5 and p.zero_point == 23.9
    # The noise the depth implies: a 24.5 AB source in the 1.3" aperture has S/N 10.
    area = math.pi * (p.depth_aperture_diameter_arcsec / 2) ** 2 / p.pixel_scale_arcsec**2
    flux = 10 ** (-0.4 * (24.5 - p.zero_point))
    noise = math.sqrt(area * p.pixel_noise_sigma("vis") ** 2 + flux / p.gain("vis"))
    assert flux / noise == pytest.approx(10.0, rel=1e-6)


def test_euclid_colours_follow_the_galaxy_colours():
    red = colours_to_mags(*np.array([[20.0], [1.6], [0.7], [0.4], [0.2]]))
    blue = colours_to_mags(*np.array([[20.0], [0.4], [0.2], [0.1], [0.05]]))
    for m in (red, blue):
        assert min(m["r"], m["z"]) <= m["vis"] <= max(m["r"], m["z"])
        assert m["h"] < m["j"] < m["y"]
    assert (red["y"] - red["h"]) > (blue["y"] - blue["h"])  # redder galaxies are redder in NIR


def test_a_synthetic_euclid_survey_has_the_preset_noise(tmp_path):
    url = str(tmp_path / "euclid-sim.zarr")
    make_survey(url, n_tiles=1, preset="euclid", tile_size_pix=384, lenses_per_tile=2, seed=4,
                artefacts=False)  # fmt: skip
    store = open_survey(url)
    assert store.bands == ("vis", "y", "j", "h")
    tile = store.tile(store.tile_ids[0])
    assert tile.pixel_scale_arcsec == pytest.approx(0.1)
    p = get_survey_preset("euclid")
    for b, band in enumerate(store.bands):
        img = np.asarray(tile.image[b], dtype=np.float64)
        mad = 1.4826 * np.median(np.abs(img - np.median(img)))
        assert mad == pytest.approx(p.pixel_noise_sigma(band), rel=0.15), band


def test_the_q1_cut_on_a_store_without_its_columns_stops_before_any_work(tmp_path):
    from lenscan import scan
    from tests.helpers import make_tiny_model

    url = str(tmp_path / "sim.zarr")
    make_survey(url, n_tiles=1, preset="euclid", tile_size_pix=256, lenses_per_tile=1, seed=2,
                artefacts=False)  # fmt: skip
    model = make_tiny_model(tmp_path / "m", bands=("vis", "y", "j", "h"), pixel_scale=0.1)
    with pytest.raises(ValueError, match=r"reads catalogue columns \['gaia_match'") as err:
        scan(url, out=str(tmp_path / "run"), model=model, colour_cut="euclid-q1",
             progress=False, gallery_size=0)  # fmt: skip
    assert "--cut" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").rglob("*.parquet"))
