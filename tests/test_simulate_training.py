"""Training batches in the four kinds, real cutouts from a survey store, population colours."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from astropy.wcs import WCS

from lenscan.simulate import (
    LensPopulation,
    RealCutouts,
    TrainingSetConfig,
    get_survey_preset,
    make_training_batch,
    render_systems,
    sample_lens_systems,
)
from lenscan.simulate.training import class_counts
from lenscan.survey import create_survey

SIZE = 48
N_GAL = 40


def _wcs(size: int, scale: float) -> WCS:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [30.0, -20.0]
    w.wcs.crpix = [size / 2 + 0.5, size / 2 + 0.5]
    w.wcs.cdelt = [-scale / 3600, scale / 3600]
    return w


@pytest.fixture(scope="module")
def survey_url(tmp_path_factory) -> str:
    """A one-tile g, r, i store: noise, 40 galaxies (one flagged), 6 stars, one near the edge."""
    url = str(tmp_path_factory.mktemp("store") / "survey.zarr")
    preset = get_survey_preset("des")
    n_pix = 400
    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    params = sample_lens_systems(None, N_GAL, generator=gen)
    params["companion_present"] = torch.zeros(N_GAL)
    stamps = render_systems(params, preset, 33, with_source=False, noise=False).numpy()
    image = np.zeros((3, n_pix, n_pix), dtype=np.float32)
    xs = rng.integers(30, n_pix - 30, N_GAL).astype(float)
    ys = rng.integers(30, n_pix - 30, N_GAL).astype(float)
    xs[0], ys[0] = 5.0, 200.0  # stamp would leave the tile
    for k in range(N_GAL):
        x0, y0 = int(xs[k]) - 16, int(ys[k]) - 16
        ya, xa = max(y0, 0), max(x0, 0)
        image[:, ya : y0 + 33, xa : x0 + 33] += stamps[k][:, ya - y0 :, xa - x0 :]
    for b, band in enumerate("gri"):
        image[b] += rng.normal(0, preset.pixel_noise_sigma(band), (n_pix, n_pix))
    n_star = 6
    sx = rng.uniform(30, n_pix - 30, n_star)
    sy = rng.uniform(30, n_pix - 30, n_star)
    x = np.concatenate([xs, sx])
    y = np.concatenate([ys, sy])
    wcs = _wcs(n_pix, preset.pixel_scale_arcsec)
    ra, dec = wcs.pixel_to_world_values(x, y)
    n = N_GAL + n_star
    cat = {"id": np.arange(100, 100 + n, dtype=np.int64), "ra": ra, "dec": dec, "x": x, "y": y}
    for band in "gri":
        mags = np.concatenate([params[f"lens_mag_{band}"].numpy(), np.full(n_star, 20.0)])
        cat[f"mag_{band}"] = mags.astype(np.float32)
        cat[f"magerr_{band}"] = np.full(n, 0.01, dtype=np.float32)
    flags = np.zeros(n, dtype=np.int32)
    flags[1] = 4
    cat["flags"] = flags
    cat["extended_class"] = np.concatenate([np.full(N_GAL, 3), np.zeros(n_star)]).astype(np.int16)
    store = create_survey(url, name="test", bands=("g", "r", "i"))
    store.write_tile(
        "T0001", image=image, wcs_header=wcs, catalog=cat,
        pixel_scale_arcsec=preset.pixel_scale_arcsec, zero_point=preset.zero_point,
        chunk_pix=64, shard_pix=None,
    )  # fmt: skip
    return url


@pytest.fixture(scope="module")
def real(survey_url) -> RealCutouts:
    return RealCutouts.from_survey(
        survey_url, bands=("g", "r", "i"), stamp_size_pix=SIZE, max_cutouts=100, seed=1
    )


def test_class_counts_largest_remainder():
    assert class_counts((0.25, 0.25, 0.25, 0.25), 10) == [3, 3, 2, 2]
    assert class_counts((0.5, 0.5, 0, 0), 7) == [4, 3, 0, 0]
    assert sum(class_counts((0.1, 0.2, 0.3, 0.4), 33)) == 33


def test_simulated_batch_shapes_labels_fractions():
    cfg = TrainingSetConfig(stamp_size_pix=SIZE, class_fractions=(0.5, 0.5, 0, 0))
    batch = make_training_batch(cfg, 24, generator=torch.Generator().manual_seed(0))
    assert batch.images.shape == (24, 3, SIZE, SIZE) and batch.images.dtype == torch.float32
    assert batch.bands == ("g", "r", "i")
    assert torch.isfinite(batch.images).all()
    assert torch.bincount(batch.kind, minlength=4).tolist() == [12, 12, 0, 0]
    assert torch.equal(batch.labels, (batch.kind == 0).float())
    lens = batch.labels == 1
    assert torch.isfinite(batch.theta_e_arcsec[lens]).all()
    assert torch.isnan(batch.theta_e_arcsec[~lens]).all()
    assert (batch.source_snr[lens] >= cfg.min_source_snr).all()
    assert torch.isnan(batch.source_snr[~lens]).all()
    # kinds are shuffled, not in blocks
    assert batch.kind[:12].tolist() != [0] * 12
    # lens galaxies are centred: the central pixel is brighter than the corners
    centre = batch.images[:, 2, SIZE // 2, SIZE // 2]
    corner = batch.images[:, 2, :4, :4].mean(dim=(1, 2))
    assert (centre > corner).float().mean() > 0.9


def test_batches_reproducible_with_seed():
    cfg = TrainingSetConfig(stamp_size_pix=32, seed=5)
    a = make_training_batch(cfg, 8)
    b = make_training_batch(cfg, 8)
    assert torch.equal(a.images, b.images) and torch.equal(a.kind, b.kind)
    c = make_training_batch(cfg, 8, generator=torch.Generator().manual_seed(6))
    assert not torch.equal(a.images, c.images)


def test_lens_and_non_lens_differ_by_the_arc():
    """Same parameters with and without the source: the difference is the (blue) arc."""
    preset = get_survey_preset("des")
    params = sample_lens_systems(None, 16, generator=torch.Generator().manual_seed(2))
    with_src = render_systems(params, preset, SIZE, noise=False)
    without = render_systems(params, preset, SIZE, noise=False, with_source=False)
    arc = (with_src - without).sum(dim=(2, 3))
    assert (arc > 0).all()
    # arcs are blue, lens galaxies red: g/i flux ratio higher for the arc
    assert (
        (arc[:, 0] / arc[:, 2]) > without.sum(dim=(2, 3))[:, 0] / without.sum(dim=(2, 3))[:, 2]
    ).all()


def test_lensed_system_colours_in_and_around_jacobs_box():
    preset = get_survey_preset("des")
    params = sample_lens_systems(LensPopulation(), 300, generator=torch.Generator().manual_seed(3))
    _, info = render_systems(params, preset, 40, noise=False, return_info=True, supersample=1)
    g, r, i = info.system_mag.unbind(dim=1)
    gi, gr = g - i, g - r
    inside = (gi > 1.8) & (gi < 5) & (gr > 0.6) & (gr < 3)
    near = (gi > 1.3) & (gi < 5.5) & (gr > 0.3) & (gr < 3.5)
    assert inside.float().mean() > 0.6
    assert near.float().mean() > 0.85
    # the lens alone, measured in the same aperture, is redder than lens + (blue) arc
    _, lens_only = render_systems(
        params, preset, 40, noise=False, return_info=True, supersample=1, with_source=False
    )
    lens_gi = lens_only.system_mag[:, 0] - lens_only.system_mag[:, 2]
    assert (lens_gi > gi - 1e-4).all()


def test_real_cutouts_from_survey(real):
    assert real.images.shape[1:] == (3, SIZE, SIZE)
    # 40 galaxies minus the flagged one and the one at the edge; no stars
    assert len(real) == N_GAL - 2
    assert set(real.ids.tolist()) == set(range(102, 100 + N_GAL))
    assert torch.isfinite(real.images).all()
    assert (real.offset_x_arcsec.abs() <= 0.5 * 0.263 + 1e-6).all()
    assert real.zero_point == 30.0 and real.pixel_scale_arcsec == pytest.approx(0.263)
    # galaxies sit at the stamp centre
    c = SIZE // 2
    assert (
        real.images[:, 2, c - 1 : c + 2, c - 1 : c + 2].mean(dim=(1, 2)) > 0
    ).float().mean() > 0.9
    few = RealCutouts.from_survey(
        str(real.url), bands=("i",), stamp_size_pix=SIZE, max_cutouts=5, seed=3
    )
    assert len(few) == 5 and few.bands == ("i",)


def test_batch_with_real_classes(survey_url, real):
    cfg = TrainingSetConfig(stamp_size_pix=SIZE, survey_url=survey_url)
    assert cfg.class_fractions == (0.25, 0.25, 0.25, 0.25, 0.0, 0.0, 0.0)  # kinds 4-6 unused
    gen = torch.Generator().manual_seed(4)
    batch = make_training_batch(cfg, 20, generator=gen, real_cutouts=real)
    assert torch.bincount(batch.kind, minlength=4).tolist() == [5, 5, 5, 5]
    assert torch.equal(batch.labels, ((batch.kind == 0) | (batch.kind == 2)).float())
    # masked survey pixels (bad columns) are NaN in real cutouts, never +-inf
    assert not torch.isinf(batch.images).any()
    assert torch.isfinite(batch.images[batch.kind < 2]).all()
    k2 = batch.kind == 2
    assert torch.isfinite(batch.theta_e_arcsec[k2]).all() and (batch.source_snr[k2] >= 5).all()
    # kind 3 stamps are real cutouts (possibly flipped), unchanged in value
    k3 = batch.images[batch.kind == 3]
    sums = real.images.nansum(dim=(1, 2, 3))
    for img in k3:
        assert torch.isclose(sums, img.nansum(), rtol=1e-5).any()
    # kind 2 = a real cutout + a positive arc: more flux in g than any real cutout it could be
    # (the arc is blue and bright enough to have S/N >= 5)
    for img in batch.images[k2]:
        diffs = (img.unsqueeze(0) - real.images).nansum(dim=(1, 2, 3))
        diffs_flip = [
            (img.unsqueeze(0) - real.images.flip(d)).nansum(dim=(1, 2, 3)) for d in (-1, -2)
        ]
        best = torch.stack([diffs, *diffs_flip]).abs().min()
        assert best > 0
    # reading the cutouts from the config's URL gives a batch too
    again = make_training_batch(cfg, 8, generator=torch.Generator().manual_seed(4))
    assert again.images.shape == (8, 3, SIZE, SIZE)


def test_arc_centred_on_real_galaxy_position(real):
    """Kind-2 arcs are centred on the galaxy: the arc's light centroid is near the offset."""
    from lenscan.simulate.training import _pick_real, _render_lensed

    cfg = TrainingSetConfig(
        stamp_size_pix=SIZE,
        class_fractions=(0.5, 0.5, 0, 0),
        # a smooth source on the lens centre makes a ring centred on it (clumps off the
        # source's centre would make lopsided images)
        population=LensPopulation(
            source_offset_frac=(0.0, 0.01),
            theta_e_arcsec=(1.5, 2.0),
            shear_max=0.0,
            clumpy_fraction=0.0,
        ),
    )
    gen = torch.Generator().manual_seed(8)
    _, offx, offy = _pick_real(real, 16, generator=gen, device=torch.device("cpu"))
    arcs, _, _ = _render_lensed(
        cfg, 16, generator=gen, device=torch.device("cpu"), with_lens=False,
        centre_x=offx, centre_y=offy,
    )  # fmt: skip
    light = arcs[:, 2]  # noise is zero-mean: no clipping, which would bias the centroid
    grid = (torch.arange(SIZE) - SIZE // 2) * 0.263
    cx = (light.sum(dim=1) * grid).sum(dim=1) / light.sum(dim=(1, 2))
    cy = (light.sum(dim=2) * grid).sum(dim=1) / light.sum(dim=(1, 2))
    assert (cx - offx).abs().max() < 0.1 and (cy - offy).abs().max() < 0.1
    assert (offx != 0).any()  # some flipped cutouts move the centre by a pixel


def test_config_validation():
    with pytest.raises(ValueError, match="sum to 1"):
        TrainingSetConfig(class_fractions=(0.5, 0.2, 0.0, 0.0))
    with pytest.raises(ValueError, match="need survey_url"):
        TrainingSetConfig(class_fractions=(0.25, 0.25, 0.25, 0.25))
    with pytest.raises(ValueError, match="stamp_size_pix"):
        TrainingSetConfig(stamp_size_pix=0)
    with pytest.raises(ValueError, match="unknown band 'u'"):
        TrainingSetConfig(bands=("g", "u"))
    with pytest.raises(ValueError, match="unknown survey preset"):
        TrainingSetConfig(preset="nope")
    with pytest.raises(ValueError, match="unknown TrainingSetConfig fields"):
        TrainingSetConfig.from_dict({"stamp_size": 64})
    cfg = TrainingSetConfig.from_dict(
        {"stamp_size_pix": 64, "population": {"theta_e_arcsec": [1.0, 2.0]}, "bands": ["g", "r"]}
    )
    assert cfg.population.theta_e_arcsec == (1.0, 2.0) and cfg.bands == ("g", "r")
    with pytest.raises(ValueError, match="n must be a positive int"):
        make_training_batch(TrainingSetConfig(), 0)
    with pytest.raises(ValueError, match="needs hard_negatives"):
        TrainingSetConfig(class_fractions=(0.5, 0.3, 0, 0, 0, 0.2))
    with pytest.raises(ValueError, match="4 to 7 finite fractions"):
        TrainingSetConfig(class_fractions=(0.5, 0.5, 0))
    with pytest.raises(ValueError, match="artefact_probability"):
        TrainingSetConfig(artefact_probability=1.5)


def test_confuser_kind_and_stamp_artefacts():
    cfg = TrainingSetConfig(
        stamp_size_pix=SIZE,
        class_fractions=(0.4, 0.2, 0, 0, 0.4),
        artefact_probability=1.0,
        confusers={"kind_weights": {"ring": 1.0}},
    )
    batch = make_training_batch(cfg, 40, generator=torch.Generator().manual_seed(1))
    assert torch.bincount(batch.kind, minlength=6).tolist() == [16, 8, 0, 0, 16, 0]
    assert torch.all(batch.labels[batch.kind == 4] == 0)
    # every stamp got an artefact; bad columns and saturated stars leave NaN (masked) pixels
    nan_stamps = torch.isnan(batch.images).flatten(1).any(dim=1)
    assert 0 < int(nan_stamps.sum()) < 40
    plain = TrainingSetConfig(stamp_size_pix=SIZE, class_fractions=(0.4, 0.2, 0, 0, 0.4))
    clean = make_training_batch(plain, 40, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(clean.images).all()


def test_real_cutout_errors(survey_url, real):
    with pytest.raises(ValueError, match="bands \\['z'\\] were requested"):
        RealCutouts.from_survey(
            survey_url, bands=("z",), stamp_size_pix=SIZE, max_cutouts=4, seed=0
        )
    cfg = TrainingSetConfig(stamp_size_pix=SIZE + 2, survey_url=survey_url)
    with pytest.raises(ValueError, match="stamp_size_pix"):
        make_training_batch(cfg, 8, real_cutouts=real)
    with pytest.raises(ValueError, match="no galaxy"):
        RealCutouts.from_survey(survey_url, bands=("g",), stamp_size_pix=500, max_cutouts=4, seed=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_batch_on_gpu(real, survey_url):
    cfg = TrainingSetConfig(stamp_size_pix=SIZE, survey_url=survey_url)
    gen = torch.Generator(device="cuda").manual_seed(0)
    batch = make_training_batch(cfg, 16, generator=gen, real_cutouts=real)
    assert batch.images.device.type == "cuda" and batch.labels.device.type == "cuda"
    assert torch.isfinite(batch.images).all()
    assert torch.bincount(batch.kind, minlength=4).tolist() == [4, 4, 4, 4]


def _brightest_offset_arcsec(images: torch.Tensor, scale: float) -> torch.Tensor:
    """Distance from the stamp centre (pixel S // 2) of each stamp's brightest pixel (band sum,
    3x3 box-smoothed against noise)."""
    light = torch.nn.functional.avg_pool2d(
        images.nan_to_num(0.0).sum(dim=1, keepdim=True), 3, stride=1, padding=1
    )[:, 0]
    s = light.shape[-1]
    flat = light.flatten(1).argmax(dim=1)
    row, col = flat // s, flat % s
    return torch.hypot((row - s // 2).float(), (col - s // 2).float()) * scale


def test_neighbour_centred_kind_puts_its_galaxy_off_centre_with_label_0():
    # bright lens galaxies, much fainter neighbours: the brightest pixel is the lens's centre
    cfg = TrainingSetConfig(
        stamp_size_pix=SIZE,
        class_fractions=(0.25, 0, 0, 0, 0.25, 0, 0.5),
        population={"lens_mag_i": (17.0, 17.5), "companion_dmag": (2.5, 3.0)},
        confusers={"host_mag_i": (17.0, 17.5), "merger_dmag": (2.0, 2.5)},
        merger_second_fraction=1.0,
        neighbour_lens_fraction=0.5,
    )
    batch = make_training_batch(cfg, 48, generator=torch.Generator().manual_seed(5))
    assert torch.bincount(batch.kind, minlength=7).tolist() == [12, 0, 0, 0, 12, 0, 24]
    assert torch.all(batch.labels[batch.kind == 6] == 0)
    assert torch.all(batch.labels[batch.kind == 4] == 0)
    off = _brightest_offset_arcsec(batch.images, 0.263)
    for k in (6, 4):  # kind 6: the lens or red galaxy; kind 4: the merger's host
        drawn = batch.off_centre_arcsec[batch.kind == k]
        # the drawn separation (1-3") plus the centring scatter (<= 0.13" per axis)
        assert torch.all((drawn > 0.8) & (drawn < 3.2)), drawn
        assert torch.allclose(off[batch.kind == k], drawn, atol=0.3), (off, drawn)
    # lenses of kind 0 stay centred
    assert torch.all(off[batch.kind == 0] < 0.4)
    assert torch.isnan(batch.off_centre_arcsec[batch.kind == 0]).all()
    with pytest.raises(ValueError, match="merger_second_fraction must be in"):
        TrainingSetConfig(merger_second_fraction=1.5)
    with pytest.raises(ValueError, match="neighbour_lens_fraction must be in"):
        TrainingSetConfig(neighbour_lens_fraction=-0.1)


def test_without_the_new_kinds_a_batch_is_unchanged():
    base = TrainingSetConfig(stamp_size_pix=SIZE, class_fractions=(0.4, 0.2, 0, 0, 0.4))
    same = TrainingSetConfig(
        stamp_size_pix=SIZE,
        class_fractions=(0.4, 0.2, 0, 0, 0.4, 0, 0),
        merger_second_fraction=0.0,
        neighbour_lens_fraction=0.9,
    )
    a = make_training_batch(base, 20, generator=torch.Generator().manual_seed(2))
    b = make_training_batch(same, 20, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a.images, b.images) and torch.equal(a.kind, b.kind)
    assert torch.isnan(a.off_centre_arcsec).all()
    # with mergers seen from their second galaxy the confuser stamps change
    other = TrainingSetConfig(
        stamp_size_pix=SIZE, class_fractions=(0.4, 0.2, 0, 0, 0.4), merger_second_fraction=0.5
    )
    c = make_training_batch(other, 20, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(a.images, c.images)
    assert int(torch.isfinite(c.off_centre_arcsec).sum()) == 4  # half of the 8 confusers
