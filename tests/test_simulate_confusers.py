"""Lens confusers and coadd artefacts: populations, rendering, truth tables, masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lenscan.simulate import get_survey_preset
from lenscan.simulate.artefacts import (
    ARTEFACT_KINDS,
    MASK_BAD_COLUMN,
    MASK_BLEED,
    MASK_SATURATED,
    add_bad_column,
    add_cosmic_rays,
    add_satellite_trail,
    saturate,
)
from lenscan.simulate.confusers import (
    CONFUSER_KINDS,
    ConfuserPopulation,
    render_confusers,
    sample_confusers,
)
from lenscan.simulate.survey import make_survey, read_artefacts, read_confusers
from lenscan.stamps import mask_stamps, normalise_stamps
from lenscan.survey import open_survey


def test_population_validation():
    with pytest.raises(ValueError, match="unknown kinds"):
        ConfuserPopulation(kind_weights={"galaxy": 1.0})
    with pytest.raises(ValueError, match="not all 0"):
        ConfuserPopulation(kind_weights={"ring": 0.0})
    with pytest.raises(ValueError, match="ring_radius_arcsec must be finite with low <= high"):
        ConfuserPopulation(ring_radius_arcsec=(3.0, 1.0))
    with pytest.raises(ValueError, match="disc_q must be <= 1"):
        ConfuserPopulation(disc_q=(0.1, 1.5))
    with pytest.raises(ValueError, match="unknown ConfuserPopulation fields"):
        ConfuserPopulation.from_dict({"rings": 1})
    only = sample_confusers(
        ConfuserPopulation(kind_weights={"ring": 1.0}), 20, generator=torch.Generator()
    )
    assert set(only["kind"].tolist()) == {CONFUSER_KINDS.index("ring")}


def test_each_kind_renders_its_feature():
    gen = torch.Generator().manual_seed(3)
    kinds = list(CONFUSER_KINDS) * 4
    params = sample_confusers(None, len(kinds), kinds=kinds, generator=gen)
    params["center_x_arcsec"][:] = 0
    params["center_y_arcsec"][:] = 0
    images, cat = render_confusers(params, "des", 48, noise=False, generator=gen)
    assert images.shape == (len(kinds), 3, 48, 48) and torch.isfinite(images).all()
    preset = get_survey_preset("des")
    g = [preset.zero_point - 2.5 * torch.log10(images[k, 0].sum()) for k in range(len(kinds))]
    i = [preset.zero_point - 2.5 * torch.log10(images[k, 2].sum()) for k in range(len(kinds))]
    colour = torch.tensor(g) - torch.tensor(i)
    for k, kind in enumerate(kinds):
        host_g = params["host_mag_g"][k] - params["host_mag_i"][k]
        if kind in ("spiral", "ring", "blue_companions"):
            # the blue feature makes the whole system bluer in g-i than its red host
            assert colour[k] < host_g - 0.02, (kind, float(colour[k]), float(host_g))
    # catalogue flux: host plus the feature light within 1", never less than the host
    host_i = 10 ** (-0.4 * (params["host_mag_i"] - preset.zero_point))
    assert torch.all(cat["host_flux"][:, 2] >= host_i * 0.999)
    merger = params["kind"] == CONFUSER_KINDS.index("merger")
    assert torch.all(cat["companion_flux"][merger] > 0) and torch.all(
        cat["companion_flux"][~merger] == 0
    )
    # a ring puts light at its radius, far above the host's own profile there
    ring = kinds.index("ring")
    r = params["ring_radius_arcsec"][ring] / preset.pixel_scale_arcsec
    yy, xx = np.mgrid[0:48, 0:48] - 24
    dist = np.hypot(xx, yy)
    img = images[ring, 0].numpy()
    on = img[np.abs(dist - float(r)) < 1].mean()
    off = img[np.abs(dist - float(r) - 4) < 1].mean()
    assert on > 2 * off


def test_artefact_kernels_and_masking():
    rng = np.random.default_rng(0)
    image = np.zeros((3, 64, 64), np.float32)
    weight = np.ones_like(image)
    mask = np.zeros(image.shape, np.int32)
    rows = add_cosmic_rays(image, weight, rng, 5, [1.0, 1.0, 1.0])
    assert len(rows["x"]) == 5 and image.max() >= 5
    assert np.all((weight == 1) | np.isclose(weight, 0.9)) and (weight < 1).any()
    add_satellite_trail(image, weight, rng, [1.0, 1.0, 1.0])
    assert mask.max() == 0  # neither is masked: valid (if noisier) data
    image[:, 30:33, 30:33] = 5e4  # a saturated star core
    n_sat = saturate(image, weight, mask, 1e4)
    assert n_sat == 27 and np.all(mask[:, 31, 31] & MASK_SATURATED)
    assert (mask[:, :, 31] & MASK_BLEED).any() and np.all(weight[mask != 0] == 0)
    add_bad_column(image, weight, mask, 5, 0, 40)
    assert np.all(mask[:, :40, 5] & MASK_BAD_COLUMN) and np.all(image[:, :40, 5] == 0)
    stamps, frac = mask_stamps(image[None], mask=mask[None])
    assert np.isnan(stamps[0][mask != 0]).all() and not np.isnan(stamps[0][mask == 0]).any()
    assert frac[0] == pytest.approx((mask != 0).mean())
    # weight 0 alone also masks; NaN weight (off the tile) does not
    w = np.ones((1, 1, 2, 2))
    w[0, 0, 0, 0] = 0
    w[0, 0, 1, 1] = np.nan
    _, frac = mask_stamps(np.ones((1, 1, 2, 2)), weight=w)
    assert frac[0] == pytest.approx(0.25)
    # masked pixels normalise to 0, like off-tile pixels
    norm = normalise_stamps(stamps, {"method": "asinh_mad", "softening_sigma": 3.0})
    assert torch.all(norm[0][torch.from_numpy(mask != 0)] == 0)
    with pytest.raises(ValueError, match="mask stamps have shape"):
        mask_stamps(np.ones((1, 1, 2, 2)), mask=np.zeros((1, 1, 3, 3)))


@pytest.fixture(scope="module")
def confuser_survey(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("confusers") / "survey.zarr")
    make_survey(url, n_tiles=2, tile_size_pix=512, lenses_per_tile=2, seed=11,
                confusers_per_arcmin2=2.0, stars_per_arcmin2=3.0)  # fmt: skip
    return url


def test_survey_confusers_and_artefacts_have_truth(confuser_survey):
    conf = read_confusers(confuser_survey)
    art = read_artefacts(confuser_survey)
    assert len(conf["id"]) >= 4 and set(conf["kind"]) <= set(CONFUSER_KINDS)
    assert np.all(conf["n_tiles"] >= 1)
    assert "bright_star" in set(art["kind"]) and set(art["kind"]) <= set(ARTEFACT_KINDS)
    store = open_survey(confuser_survey)
    ids = np.concatenate([store.tile(t).catalog()["id"] for t in store.tile_ids])
    assert np.isin(conf["id"], ids).all()  # every confuser host is a catalogue object
    mergers = conf["companion_id"][conf["companion_id"] >= 0]
    assert np.isin(mergers, ids).all()  # a merger's second galaxy is its own detection
    # catalogue photometry includes the blue feature: most spirals/rings/knots are bluer
    # in g-i than their red hosts
    blue = np.isin(conf["kind"], ["spiral", "ring", "blue_companions"])
    host = conf["host_mag_g"] - conf["host_mag_i"]
    cat = conf["mag_g"] - conf["mag_i"]
    if blue.sum() >= 3:
        assert np.mean(cat[blue] < host[blue]) > 0.5


def test_make_survey_without_confusers_or_artefacts(tmp_path):
    url = str(tmp_path / "plain.zarr")
    make_survey(url, n_tiles=1, tile_size_pix=256, lenses_per_tile=1, seed=2,
                confusers_per_arcmin2=0.0, artefacts=False, bad_column_probability=0.0)  # fmt: skip
    assert len(read_confusers(url)["id"]) == 0 and len(read_artefacts(url)["kind"]) == 0
    tile = open_survey(url).tile(open_survey(url).tile_ids[0])
    assert np.asarray(tile.mask[:]).max() == 0
    with pytest.raises(ValueError, match="confusers_per_arcmin2"):
        make_survey(str(tmp_path / "x.zarr"), confusers_per_arcmin2=-1.0)
