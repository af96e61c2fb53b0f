"""Synthetic surveys: determinism, truth table, catalogue, noise, overlaps, FITS export."""

from __future__ import annotations

import numpy as np
import pytest

from lenscan.simulate import get_survey_preset
from lenscan.simulate.artefacts import MASK_BLEED, MASK_SATURATED
from lenscan.simulate.survey import (
    MASK_BAD_COLUMN,
    make_survey,
    passes_jacobs_box,
    read_truth,
)
from lenscan.survey import open_survey, read_stamps

N_PIX = 384
KW = {
    "n_tiles": 2,
    "tile_size_pix": N_PIX,
    "lenses_per_tile": 4,
    "overlap_pix": 48,
    "stars_per_arcmin2": 3.0,
}


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("synthetic") / "survey.zarr")
    return make_survey(url, seed=7, bad_column_probability=1.0, **KW)


def test_make_survey_is_deterministic(survey, tmp_path):
    again = make_survey(str(tmp_path / "again.zarr"), seed=7, bad_column_probability=1.0, **KW)
    a, b = open_survey(survey.url), open_survey(again.url)
    assert a.tile_ids == b.tile_ids == survey.tile_ids
    for tile_id in a.tile_ids:
        ta, tb = a.tile(tile_id), b.tile(tile_id)
        np.testing.assert_array_equal(ta.image[:], tb.image[:])
        np.testing.assert_array_equal(ta.mask[:], tb.mask[:])
        for col, values in ta.catalog().items():
            np.testing.assert_array_equal(values, tb.catalog([col])[col])
    for key, values in survey.truth.items():
        np.testing.assert_array_equal(values, again.truth[key])
    # Another seed, same layout: other pixels and lenses.
    small = {"n_tiles": 1, "tile_size_pix": 128, "lenses_per_tile": 1}
    s7, s8 = (make_survey(str(tmp_path / f"s{k}.zarr"), seed=k, **small) for k in (7, 8))
    assert s7.tile_ids == s8.tile_ids
    i7, i8 = (open_survey(s.url).tile(s.tile_ids[0]).image[:] for s in (s7, s8))
    assert not np.array_equal(i7, i8)
    assert s7.truth["theta_e_arcsec"][0] != s8.truth["theta_e_arcsec"][0]


def test_truth_table(survey):
    truth = survey.truth
    n = KW["n_tiles"] * KW["lenses_per_tile"]
    assert len(truth["id"]) == n and len(np.unique(truth["id"])) == n
    for col in (
        "tile",
        "ra",
        "dec",
        "x",
        "y",
        "theta_e_arcsec",
        "source_snr",
        "magnification",
        "lens_mag_g",
        "source_mag_i",
        "mag_r",
        "passes_colour_cut",
        "n_tiles",
    ):
        assert col in truth, col
    assert np.all((truth["theta_e_arcsec"] >= 0.8) & (truth["theta_e_arcsec"] <= 3.0))
    assert np.all((truth["x"] >= 48) & (truth["x"] <= N_PIX - 49))
    assert np.all(truth["source_snr"] > 0) and np.all(truth["n_tiles"] >= 1)
    on_disk = read_truth(survey.url)
    assert survey.truth_url.endswith("truth.parquet")
    np.testing.assert_array_equal(on_disk["id"], truth["id"])
    np.testing.assert_array_equal(on_disk["tile"].astype(str), truth["tile"])
    store = open_survey(survey.url)
    for tile_id in store.tile_ids:
        # Truth positions agree with the tile WCS.
        mine = truth["tile"] == tile_id
        x, y = store.tile(tile_id).wcs.world_to_pixel_values(truth["ra"][mine], truth["dec"][mine])
        np.testing.assert_allclose(x, truth["x"][mine], atol=1e-6)
        np.testing.assert_allclose(y, truth["y"][mine], atol=1e-6)


def test_lenses_are_in_the_catalogue_and_visible(survey):
    store = open_survey(survey.url)
    truth = survey.truth
    for tile_id in store.tile_ids:
        tile = store.tile(tile_id)
        cat = tile.catalog()
        mine = truth["tile"] == tile_id
        rows = np.searchsorted(cat["id"], truth["id"][mine])
        np.testing.assert_array_equal(cat["id"][rows], truth["id"][mine])
        np.testing.assert_allclose(cat["x"][rows], truth["x"][mine], atol=1e-6)
        assert np.all(cat["extended_class"][rows] == 3)
        np.testing.assert_array_equal(
            passes_jacobs_box({b: cat[f"mag_{b}"][rows] for b in "gri"}),
            truth["passes_colour_cut"][mine],
        )
        # The lens galaxy is far above the noise at its catalogue position.
        stamps, edge = read_stamps(tile, cat["x"][rows], cat["y"][rows], 5)
        assert not edge.any()
        sigma = get_survey_preset("des").pixel_noise_sigma("i")
        assert np.all(stamps[:, 2].sum(axis=(1, 2)) > 25 * 5 * sigma)
    assert truth["passes_colour_cut"].mean() >= 0.5


def test_noise_weight_mask_and_catalogue(survey):
    preset = get_survey_preset("des")
    store = open_survey(survey.url)
    red_non_lenses = n_stars = 0
    for tile_id in store.tile_ids:
        tile = store.tile(tile_id)
        image = np.asarray(tile.image[:])
        weight = np.asarray(tile.weight[:])
        mask = np.asarray(tile.mask[:])
        bad = mask != 0
        column = (mask & MASK_BAD_COLUMN) != 0
        assert column.any()  # one masked column segment, blank
        assert np.all((mask[bad] & ~(MASK_BAD_COLUMN | MASK_SATURATED | MASK_BLEED)) == 0)
        assert np.all(weight[bad] == 0) and np.all(image[column] == 0)
        for b, band in enumerate(tile.bands):
            sigma = preset.pixel_noise_sigma(band)
            # weight is the background inverse variance, lower where an exposure was dropped
            # (cosmic rays, satellite trails): never higher
            good = weight[b][~bad[b]] * sigma**2
            assert np.all(good <= 1 + 1e-6) and np.mean(np.isclose(good, 1.0)) > 0.9
            pix = image[b][~bad[b]]
            robust = 1.4826 * np.median(np.abs(pix - np.median(pix)))
            assert robust == pytest.approx(sigma, rel=0.1)
        cat = tile.catalog()
        assert np.all((cat["x"] >= -0.5) & (cat["x"] < N_PIX - 0.5))
        assert set(np.unique(cat["extended_class"])) <= {0, 1, 2, 3}
        stars = cat["extended_class"] == 0
        assert (cat["extended_class"] == 3).sum() > stars.sum()
        n_stars += int(stars.sum())
        # A realistic number of sources (~12 galaxies / arcmin^2 to i ~ 23.5).
        area = (N_PIX * preset.pixel_scale_arcsec / 60) ** 2
        assert 5 * area < len(cat["id"]) < 25 * area
        # Measured magnitudes scatter about the truth with their errors: i-band errors small
        # for bright objects.
        bright = cat["mag_i"] < 21
        assert np.all(cat["magerr_i"][bright] < 0.05)
        box = passes_jacobs_box({b: cat[f"mag_{b}"] for b in "gri"})
        red_non_lenses += int((box & ~np.isin(cat["id"], survey.truth["id"])).sum())
    # Red ellipticals that pass the colour box but are not lenses (the false positives).
    assert red_non_lenses >= 3
    assert n_stars >= 3


def test_overlap_duplicates(survey):
    store = open_survey(survey.url)
    a, b = (store.tile(t).catalog() for t in store.tile_ids)
    shared = np.intersect1d(a["id"], b["id"])
    assert shared.size > 0
    ia, ib = np.searchsorted(a["id"], shared), np.searchsorted(b["id"], shared)
    np.testing.assert_allclose(a["ra"][ia], b["ra"][ib])
    # The same sky position sits near opposite edges of the two tiles.
    assert np.all(np.minimum(a["x"][ia], N_PIX - a["x"][ia]) < 60) or np.all(
        np.minimum(a["y"][ia], N_PIX - a["y"][ia]) < 60
    )


def test_fits_export_round_trip_through_ingest(tmp_path):
    from lenscan.survey.ingest import ingest

    info = make_survey(
        f"memory://make-survey-{tmp_path.name}.zarr",
        seed=3,
        n_tiles=2,
        tile_size_pix=256,
        lenses_per_tile=2,
        galaxies_per_arcmin2=6.0,
        fits_dir=str(tmp_path / "fits"),
    )
    assert info.fits is not None and sorted(info.fits.files) == sorted(info.tile_ids)
    assert len(read_truth(info.url)["id"]) == 4
    summary = ingest(
        tmp_path / "fits",
        tmp_path / "ingested.zarr",
        catalog=info.fits.catalog_path,
        client="sync",
        expected_shape_yx=(256, 256),
    )
    assert summary.ok and sorted(summary.ingested) == sorted(info.tile_ids)
    src, dst = open_survey(info.url), open_survey(tmp_path / "ingested.zarr")
    for tile_id in info.tile_ids:
        ts, td = src.tile(tile_id), dst.tile(tile_id)
        cs, cd = ts.catalog(), td.catalog()
        np.testing.assert_array_equal(cs["id"], cd["id"])
        np.testing.assert_allclose(cs["x"], cd["x"], atol=1e-6)
        for col in ("mag_g", "magerr_i", "flags", "extended_class"):
            np.testing.assert_array_equal(cs[col], cd[col])
        a, _ = read_stamps(ts, cs["x"], cs["y"], 32)
        b, _ = read_stamps(td, cd["x"], cd["y"], 32)
        np.testing.assert_array_equal(a, b)


def test_bad_parameters(tmp_path):
    with pytest.raises(ValueError, match="n_tiles"):
        make_survey(str(tmp_path / "a"), n_tiles=0)
    with pytest.raises(ValueError, match="unknown band 'u'"):
        make_survey(str(tmp_path / "b"), bands=["g", "u"])
    with pytest.raises(ValueError, match="galaxies_per_arcmin2"):
        make_survey(str(tmp_path / "c"), galaxies_per_arcmin2=float("nan"))
    with pytest.raises(ValueError, match="tile_size_pix"):
        make_survey(str(tmp_path / "d"), tile_size_pix=64)


def test_injected_ids_cover_lenses_and_companions(survey):
    from lenscan.simulate.survey import injected_ids

    ids = injected_ids(survey.truth)
    comps = survey.truth["companion_id"][survey.truth["companion_id"] >= 0]
    assert set(survey.truth["id"]) <= set(ids) and set(comps) <= set(ids)
    assert len(ids) == len(survey.truth["id"]) + len(comps)
    store = open_survey(survey.url)
    all_ids = np.concatenate([store.tile(t).catalog(["id"])["id"] for t in store.tile_ids])
    assert set(comps) <= set(all_ids)  # companions are catalogued objects
