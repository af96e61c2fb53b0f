"""Pinned outputs of the simulator for fixed seeds: a refactor must not change them.

The values were recorded before the simulator's long functions were split (issue 14). Integers,
ids, kinds and masks are compared exactly; floating-point sums with a tight tolerance (the
last bits of FFT convolutions may differ between CPUs).

Issue 21 made the sky more varied by default (clumpy sources, seeing varying from tile to tile
and band to band, catalogued neighbours 1-3" away); these pins run with those switched off
(``LEGACY``), which must reproduce the earlier simulator bit for bit: a saved config that states
them still makes the data it made. ``test_realism_defaults_are_pinned`` pins the new defaults.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lenscan.simulate import (
    LensPopulation,
    TrainingSetConfig,
    make_survey,
    make_training_batch,
    render_systems,
    sample_lens_systems,
)
from lenscan.simulate.confusers import render_confusers, sample_confusers
from lenscan.simulate.survey import read_artefacts, read_confusers
from lenscan.survey import open_survey

TILES = ["DES0240-3000", "DES0240-3000a"]
RTOL = 1e-5
#: The population, survey and training-set options of the simulator before issue 21.
LEGACY_POPULATION = {"clumpy_fraction": 0.0, "companion_distance_arcsec": (1.5, 5.0)}
LEGACY_SURVEY = {"seeing_factor_range": None, "neighbour_fraction": 0.0,
                 "population": LensPopulation(**LEGACY_POPULATION)}  # fmt: skip
LEGACY_TRAINING = {"seeing_factor_range": None, "population": LEGACY_POPULATION}


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("pinned") / "s.zarr")
    return make_survey(
        url, n_tiles=2, tile_size_pix=256, lenses_per_tile=2, seed=3, overlap_pix=32,
        stars_per_arcmin2=4.0, confusers_per_arcmin2=3.0, bad_column_probability=1.0,
        **LEGACY_SURVEY,
    )  # fmt: skip


def test_make_survey_truth_is_pinned(survey):
    assert survey.tile_ids == TILES
    assert survey.n_sources == {TILES[0]: 15, TILES[1]: 19}
    truth = survey.truth
    assert truth["id"].tolist() == [1000001, 1000002, 1000003, 1000004]
    assert truth["tile"].tolist() == [TILES[0], TILES[0], TILES[1], TILES[1]]
    assert truth["passes_colour_cut"].tolist() == [False, True, True, True]
    assert truth["n_tiles"].tolist() == [1, 1, 1, 1]
    np.testing.assert_allclose(truth["theta_e_arcsec"], [1.59204102, 2.74146962, 2.80372405,
                               2.5900321], rtol=RTOL)  # fmt: skip
    np.testing.assert_allclose(truth["source_snr"], [706.79144287, 268.21307373, 450.75997925,
                               67.77414703], rtol=RTOL)  # fmt: skip
    np.testing.assert_allclose(truth["mag_i"], [20.06655502, 18.09780502, 19.34476089,
                               20.31844139], rtol=RTOL)  # fmt: skip
    conf = read_confusers(survey.url)
    assert conf["kind"].tolist() == ["spiral", "edge_on_disc", "merger"]
    assert conf["id"].tolist() == [1000068, 1000069, 1000070]
    art = read_artefacts(survey.url)
    assert art["kind"].tolist() == ["bright_star", "cosmic_ray", "cosmic_ray", "bad_column",
                                    "bright_star", "bad_column"]  # fmt: skip
    assert art["tile"].tolist() == [TILES[0]] * 4 + [TILES[1]] * 2


@pytest.mark.parametrize(
    ("tile", "n_flagged", "image_sum", "pixel", "mask_sha", "zero_weight"),
    [
        (0, {4: 8, 9: 8}, 419597.8351173401, 3.4790802001953125, "4cccf8d1f47993e1", 321),
        (1, {15: 4}, 3250141.2500076294, 1.1734619140625, "978180bae3fe8977", 215),
    ],
)
def test_make_survey_tiles_are_pinned(
    survey, tile, n_flagged, image_sum, pixel, mask_sha, zero_weight
):
    t = open_survey(survey.url).tile(TILES[tile])
    cat = t.catalog()
    flags = {k: int(f) for k, f in enumerate(cat["flags"]) if f}
    assert flags == n_flagged
    image = np.asarray(t.image[...])
    np.testing.assert_allclose(image.astype(np.float64).sum(), image_sum, rtol=RTOL)
    np.testing.assert_allclose(image[1, 100, 100], pixel, rtol=RTOL)
    assert hashlib.sha256(np.asarray(t.mask[...]).tobytes()).hexdigest()[:16] == mask_sha
    assert int((np.asarray(t.weight[...]) == 0).sum()) == zero_weight


def test_make_survey_catalogue_ids_are_pinned(survey):
    s = open_survey(survey.url)
    assert s.tile(TILES[0]).catalog()["id"].tolist() == [
        1000001, 1000002, 1000009, 1000012, 1000024, 1000025, 1000034, 1000035, 1000040,
        1000046, 1000049, 1000051, 1000052, 1000067, 1000068,
    ]  # fmt: skip
    assert s.tile(TILES[1]).catalog()["id"].tolist() == [
        1000003, 1000004, 1000014, 1000018, 1000019, 1000020, 1000023, 1000024, 1000025,
        1000036, 1000037, 1000038, 1000041, 1000059, 1000060, 1000066, 1000069, 1000070,
        1000073,
    ]  # fmt: skip


def test_training_batch_of_six_kinds_is_pinned(survey, tmp_path):
    cat = open_survey(survey.url).tile(TILES[0]).catalog()
    gal = np.flatnonzero(cat["extended_class"] >= 2)[:5]
    hard = str(tmp_path / "hard.parquet")
    pq.write_table(
        pa.table({"survey_url": [survey.url] * 5, "tile": [TILES[0]] * 5, "id": cat["id"][gal]}),
        hard,
    )
    cfg = TrainingSetConfig(
        stamp_size_pix=32, survey_url=survey.url, hard_negatives=hard, seed=5,
        class_fractions=(0.2, 0.15, 0.2, 0.15, 0.15, 0.15), artefact_probability=0.6,
        max_real_cutouts=40, **LEGACY_TRAINING,
    )  # fmt: skip
    batch = make_training_batch(cfg, 20)
    assert batch.kind.tolist() == [1, 5, 1, 4, 2, 4, 5, 4, 5, 3, 3, 2, 2, 0, 3, 0, 2, 0, 0, 1]
    assert int(batch.images.isnan().sum()) == 1767
    np.testing.assert_allclose(float(torch.nansum(batch.images.double())), 4429369.5, rtol=RTOL)
    lens = batch.labels > 0
    np.testing.assert_allclose(batch.theta_e_arcsec[lens], [2.710749387741089,
        1.0520851612091064, 1.195661187171936, 1.077444076538086, 2.796433448791504,
        1.2413718700408936, 2.626554250717163, 2.603839635848999], rtol=RTOL)  # fmt: skip
    np.testing.assert_allclose(batch.source_snr[lens], [318.1754150390625, 55.999908447265625,
        148.5952911376953, 248.0272674560547, 392.2466125488281, 344.0006103515625,
        513.91552734375, 310.5211181640625], rtol=RTOL)  # fmt: skip
    assert torch.isnan(batch.theta_e_arcsec[~lens]).all()


def test_render_systems_and_confusers_are_pinned():
    gen = torch.Generator().manual_seed(11)
    params = sample_lens_systems(LensPopulation(**LEGACY_POPULATION), 140, generator=gen)
    images, info = render_systems(params, "des", 64, generator=gen, return_info=True)
    np.testing.assert_allclose(params["theta_e_arcsec"][:3], [1.1278917789459229,
                               1.8704168796539307, 2.9684553146362305], rtol=RTOL)  # fmt: skip
    np.testing.assert_allclose(float(images.double().sum()), 7507145.770744324, rtol=RTOL)
    np.testing.assert_allclose(info.source_snr_total[:3], [104.11927032470703,
                               22.451650619506836, 62.32191848754883], rtol=RTOL)  # fmt: skip
    np.testing.assert_allclose(info.system_mag[0], [22.251632690429688, 20.980953216552734,
                               20.522476196289062], rtol=RTOL)  # fmt: skip
    np.testing.assert_allclose(info.magnification[:3], [3.832127571105957, 4.621800422668457,
                               7.190579891204834], rtol=RTOL)  # fmt: skip
    cgen = torch.Generator().manual_seed(12)
    cparams = sample_confusers(None, 6, generator=cgen)
    assert cparams["kind"].tolist() == [3, 3, 1, 0, 4, 2]
    cimages, flux = render_confusers(cparams, "des", 48, generator=cgen)
    np.testing.assert_allclose(float(cimages.double().sum()), 200965.20372009277, rtol=RTOL)
    np.testing.assert_allclose(flux["host_flux"][0], [695.1571044921875, 4232.625,
                               9633.7451171875], rtol=RTOL)  # fmt: skip


def test_realism_defaults_are_pinned(tmp_path):
    """The issue-21 defaults (clumpy sources, seeing per tile / stamp, neighbours), pinned."""
    gen = torch.Generator().manual_seed(11)
    params = sample_lens_systems(LensPopulation(), 40, generator=gen)
    seeing = 0.85 + 0.5 * torch.rand((40, 3), generator=gen)
    images, info = render_systems(params, "des", 64, generator=gen, return_info=True,
                                  seeing_factor=seeing)  # fmt: skip
    assert params["source_clumpy"][:8].tolist() == [0, 0, 0, 0, 1, 1, 0, 1]
    np.testing.assert_allclose(float(images.double().sum()), 2002868.8518218994, rtol=RTOL)
    np.testing.assert_allclose(info.magnification[:3], [3.8471362590789795, 3.5874545574188232,
                               5.9321160316467285], rtol=RTOL)  # fmt: skip
    s = make_survey(
        str(tmp_path / "s.zarr"), n_tiles=2, tile_size_pix=256, lenses_per_tile=2, seed=3,
        overlap_pix=32, stars_per_arcmin2=4.0, confusers_per_arcmin2=3.0,
        bad_column_probability=1.0,
    )  # fmt: skip
    assert s.n_sources == {TILES[0]: 16, TILES[1]: 19}  # one more: a red galaxy's neighbour
    assert s.truth["seeing_factor"].tolist() == [0.9089, 0.9089, 1.0624, 1.0624]
    assert read_parquet_neighbours(s.url) == [1000050]
    store = open_survey(s.url)
    for tile_id, image_sum, per_band in (
        (TILES[0], 419646.34983444214, {"g": 0.9481, "r": 0.9977, "i": 0.9562}),
        (TILES[1], 3104907.5433807373, {"g": 1.0871, "r": 1.1296, "i": 1.0476}),
    ):
        tile = store.tile(tile_id)
        assert tile.attrs["extra"]["synthetic"]["seeing_factor_per_band"] == per_band
        image = np.asarray(tile.image[...]).astype(np.float64)
        np.testing.assert_allclose(image.sum(), image_sum, rtol=RTOL)


def read_parquet_neighbours(url: str) -> list[int]:
    """Ids of the field galaxies' neighbours of a synthetic survey."""
    return pq.read_table(f"{url}/neighbours.parquet").column("id").to_pylist()
