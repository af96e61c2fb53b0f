"""A sky as varied as the real one (issue 21): seeing per tile and band, catalogued neighbours
1-3" from lens hosts and red field galaxies (scored in a real scan), and the truth columns the
recall benchmark splits by."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from astropy.coordinates import SkyCoord

from lenscan.select import DEFAULT_COLOUR_CUT, colour_cut_mask, get_colour_cut
from lenscan.simulate import (
    RealCutouts,
    TrainingSetConfig,
    get_survey_preset,
    make_survey,
    make_training_batch,
)
from lenscan.simulate.survey import read_confusers
from lenscan.survey import open_survey
from lenscan.sweep import read_scored, scan
from lenscan.table import read_parquet_table
from tests.helpers import make_tiny_model

pytestmark = pytest.mark.timeout(300)
N_PIX = 640


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("realism") / "survey.zarr")
    return make_survey(
        url, n_tiles=2, seed=4, tile_size_pix=N_PIX, lenses_per_tile=10, stars_per_arcmin2=12.0,
        confusers_per_arcmin2=0.5, bad_column_probability=0.0, artefacts=False,
    )  # fmt: skip


def _fwhm_arcsec(image: np.ndarray, cat: dict, scale: float) -> float:
    """Median FWHM of isolated unsaturated stars: half-maximum area, 8x bicubic upsampled."""
    x, y, n_pix = cat["x"], cat["y"], image.shape[-1]
    stars = np.flatnonzero((cat["extended_class"] == 0) & (cat["mag_i"] > 17) & (cat["mag_i"] < 20))
    fwhm = []
    for k in stars:
        ix, iy = round(float(x[k])), round(float(y[k]))
        if np.sort(np.hypot(x - x[k], y - y[k]))[1] < 20 or not (
            20 <= ix < n_pix - 20 and 20 <= iy < n_pix - 20
        ):
            continue
        cut = torch.from_numpy(np.ascontiguousarray(image[iy - 12 : iy + 13, ix - 12 : ix + 13]))
        fine = torch.nn.functional.interpolate(cut[None, None].double(), scale_factor=8,
                                               mode="bicubic")[0, 0]  # fmt: skip
        area = float((fine > fine.max() / 2).sum()) / 64
        fwhm.append(2 * math.sqrt(area / math.pi) * scale)
    assert len(fwhm) >= 3, "too few isolated stars to measure the PSF"
    return float(np.median(fwhm))


def test_seeing_varies_by_tile_and_band_and_is_in_the_image_and_truth(survey):
    store = open_survey(survey.url)
    preset = get_survey_preset("des")
    measured = {}
    for k, tile_id in enumerate(store.tile_ids):
        tile = store.tile(tile_id)
        syn = tile.attrs["extra"]["synthetic"]
        factor, per_band = syn["seeing_factor"], syn["seeing_factor_per_band"]
        assert 0.85 <= factor <= 1.35
        assert all(abs(math.log(f / factor)) <= 0.1 + 1e-9 for f in per_band.values())
        assert len(set(per_band.values())) == 3  # band to band scatter
        own = survey.truth["tile"] == tile_id
        np.testing.assert_allclose(survey.truth["seeing_factor"][own], factor)
        image, cat = np.asarray(tile.image[...]), tile.catalog()
        for bi, band in enumerate("gri"):
            fwhm = per_band[band] * preset.seeing_for(band)
            np.testing.assert_allclose(survey.truth[f"seeing_fwhm_{band}"][own], fwhm)
            # the stars of the tile show that seeing (the pixel broadens them a few per cent)
            measured[k, band] = _fwhm_arcsec(image[bi], cat, preset.pixel_scale_arcsec)
            assert measured[k, band] == pytest.approx(fwhm, rel=0.1), (tile_id, band)
    conf = read_confusers(survey.url)
    assert np.isfinite(conf["seeing_factor"]).all() and len(conf["seeing_factor"]) > 0
    syn = [store.tile(t).attrs["extra"]["synthetic"] for t in store.tile_ids]
    assert abs(syn[0]["seeing_factor"] - syn[1]["seeing_factor"]) > 0.1, "pick another seed"
    ratio = measured[0, "i"] / measured[1, "i"]
    expect = syn[0]["seeing_factor_per_band"]["i"] / syn[1]["seeing_factor_per_band"]["i"]
    assert ratio == pytest.approx(expect, rel=0.05)


def test_fixed_seeing_and_bad_arguments(tmp_path):
    url = str(tmp_path / "fixed.zarr")
    make_survey(url, n_tiles=1, tile_size_pix=128, lenses_per_tile=1, seed=1,
                seeing_factor_range=None, neighbour_fraction=0.0)  # fmt: skip
    syn = open_survey(url).tile(open_survey(url).tile_ids[0]).attrs["extra"]["synthetic"]
    assert syn["seeing_factor"] == 1.0 and set(syn["seeing_factor_per_band"].values()) == {1.0}
    space = str(tmp_path / "euclid.zarr")
    make_survey(space, n_tiles=1, tile_size_pix=256, lenses_per_tile=1, seed=1, preset="euclid")
    syn = open_survey(space).tile(open_survey(space).tile_ids[0]).attrs["extra"]["synthetic"]
    assert syn["seeing_factor"] == 1.0, "Euclid's PSF does not vary with the weather"
    for kwargs, match in (
        ({"seeing_factor_range": (1.2, 0.9)}, "seeing_factor_range"),
        ({"seeing_band_scatter": -0.1}, "seeing_band_scatter"),
        ({"neighbour_fraction": 1.5}, "neighbour_fraction"),
    ):
        with pytest.raises(ValueError, match=match):
            make_survey(str(tmp_path / "bad.zarr"), n_tiles=1, tile_size_pix=128, **kwargs)


def _sep_arcsec(ra1, dec1, ra2, dec2) -> np.ndarray:
    return SkyCoord(ra1, dec1, unit="deg").separation(SkyCoord(ra2, dec2, unit="deg")).arcsec


def test_neighbours_are_catalogue_rows_1_to_3_arcsec_away(survey):
    store = open_survey(survey.url)
    cats = {t: store.tile(t).catalog() for t in store.tile_ids}
    truth = survey.truth
    with_nb = np.flatnonzero(truth["has_neighbour"])
    assert 0 < len(with_nb) < len(truth["id"])
    assert truth["source_clumpy"].any() and not truth["source_clumpy"].all()
    for i in with_nb:
        cat = cats[str(truth["tile"][i])]
        row = np.flatnonzero(cat["id"] == truth["companion_id"][i])
        assert row.size == 1, "a lens host's neighbour is its own catalogue row"
        sep = _sep_arcsec(cat["ra"][row], cat["dec"][row], truth["ra"][i], truth["dec"][i])
        assert 1.0 <= float(sep[0]) <= 3.0
        assert float(sep[0]) == pytest.approx(truth["neighbour_distance_arcsec"][i], abs=0.01)
    assert np.isnan(truth["neighbour_distance_arcsec"][~truth["has_neighbour"]]).all()
    nb = read_parquet_table(f"{survey.url}/neighbours.parquet")
    assert len(nb["id"]) > 0
    ok = nb["host_id"] >= 0
    assert ((nb["distance_arcsec"][ok] >= 1.0) & (nb["distance_arcsec"][ok] <= 3.0)).all()
    all_ids = np.concatenate([c["id"] for c in cats.values()])
    detected = nb["detected"].astype(bool) & ok
    assert np.isin(nb["id"][detected], all_ids).mean() > 0.8  # the rest fell outside the tiles
    assert (nb["mag_i"][ok] > nb["host_mag_i"][ok]).all()  # fainter than their hosts


def test_neighbours_passing_the_cut_are_scored_and_recall_splits(survey, cluster_client, tmp_path):
    model = make_tiny_model(tmp_path / "tiny")
    out = str(tmp_path / "run")
    scan(survey.url, out=out, model=model, threshold=0.0, client=cluster_client, progress=False)
    scored = read_scored(out)
    store = open_survey(survey.url)
    nb_ids = np.concatenate([
        survey.truth["companion_id"][survey.truth["has_neighbour"]],
        read_parquet_table(f"{survey.url}/neighbours.parquet")["id"],
    ])  # fmt: skip
    expected = set()
    for tile_id in store.tile_ids:
        cat = store.tile(tile_id).catalog()
        passing = colour_cut_mask(cat, get_colour_cut(DEFAULT_COLOUR_CUT))
        expected |= {int(i) for i in cat["id"][passing & np.isin(cat["id"], nb_ids)]}
    assert expected, "no neighbour passed the colour cut: pick another seed"
    assert expected <= {int(i) for i in scored["id"]}, "a neighbour in the cut was not scored"
    # the recall benchmark splits the same scan by lens variant
    path = Path(__file__).parents[1] / "benchmarks" / "recall_bundled.py"
    spec = importlib.util.spec_from_file_location("recall_bundled", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    truth = read_parquet_table(f"{survey.url}/truth.parquet")
    split = bench.variant_recall([(scored, truth)], 0.0)
    assert set(bench.VARIANTS) | {"neighbour stamps"} == set(split)
    pairs = (("smooth source", "clumpy source"), ("no neighbour", "with neighbour"),
             ("good seeing", "poor seeing"))  # fmt: skip
    bright = (truth["theta_e_arcsec"] >= 1.2) & (truth["source_snr"] >= 20)
    scored_bright = np.isin(truth["id"], scored["id"]) & bright
    for a, b in pairs:
        # at threshold 0 every scored bright lens is found: each pair splits them all
        assert split[a]["n_bright"] + split[b]["n_bright"] == int(scored_bright.sum())
        for name in (a, b):
            if split[name]["n_bright"]:
                assert split[name]["recall_bright"] == 1.0
    assert split["neighbour stamps"]["n_scored"] >= 1


def test_training_stamps_get_their_own_seeing_and_share_neighbours():
    cfg = TrainingSetConfig(stamp_size_pix=48, class_fractions=(0.4, 0.3, 0.0, 0.0, 0.3))
    batch = make_training_batch(cfg, 60, generator=torch.Generator().manual_seed(3))
    f = batch.seeing_factor
    assert f is not None and torch.isfinite(f).all()
    assert (f > 0.85 * math.exp(-0.1)).all() and (f < 1.35 * math.exp(0.1)).all()
    assert float(f.std()) > 0.05
    lens = batch.labels > 0
    assert batch.source_clumpy is not None
    assert set(batch.source_clumpy[lens].tolist()) == {0.0, 1.0}
    assert torch.isnan(batch.source_clumpy[~lens]).all()
    fixed = TrainingSetConfig(stamp_size_pix=48, seeing_factor_range=None)
    batch = make_training_batch(fixed, 8, generator=torch.Generator().manual_seed(3))
    assert batch.seeing_factor is not None and torch.isnan(batch.seeing_factor).all()
    with pytest.raises(ValueError, match="seeing_factor_range"):
        TrainingSetConfig(seeing_factor_range=(1.3, 0.9))
    # ground-based presets vary their seeing by default, a space telescope does not
    assert cfg.seeing_factor_range == (0.85, 1.35)
    assert TrainingSetConfig(preset="euclid").seeing_factor_range is None
    yaml_like = {"seeing_factor_range": [0.9, 1.2], "seeing_band_scatter": 0.02}
    assert TrainingSetConfig.from_dict(yaml_like).seeing_factor_range == (0.9, 1.2)
    assert TrainingSetConfig.from_dict({"seeing_factor_range": "preset"}).seeing_factor_range
    assert get_survey_preset("lsst").seeing_factor_range == (0.85, 1.35)
    # kinds 0 and 1 draw their neighbours from one population: never a give-away
    pop = cfg.population
    assert pop.companion_probability == 0.3 and pop.companion_distance_arcsec == (1.0, 3.0)


def test_kind_2_arcs_are_seen_through_their_cutouts_tile_seeing(survey):
    store = open_survey(survey.url)
    per_tile = {
        t: store.tile(t).attrs["extra"]["synthetic"]["seeing_factor_per_band"]
        for t in store.tile_ids
    }
    real = RealCutouts.from_survey(survey.url, bands="gri", stamp_size_pix=32, max_cutouts=30,
                                   seed=1)  # fmt: skip
    assert real.seeing_factor is not None
    for row, tile_id in zip(real.seeing_factor.tolist(), real.tile_ids, strict=True):
        np.testing.assert_allclose(row, [per_tile[tile_id][b] for b in "gri"], rtol=1e-6)
    cfg = TrainingSetConfig(stamp_size_pix=32, survey_url=survey.url,
                            class_fractions=(0.0, 0.0, 1.0, 0.0))  # fmt: skip
    batch = make_training_batch(cfg, 12, generator=torch.Generator().manual_seed(0),
                                real_cutouts=real)  # fmt: skip
    tile_means = [np.mean([f[b] for b in "gri"]) for f in per_tile.values()]
    assert batch.seeing_factor is not None
    for f in batch.seeing_factor.tolist():
        assert min(abs(f - m) for m in tile_means) < 1e-5, "an arc at another seeing"
