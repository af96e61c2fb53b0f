"""The simulator's `euclid` preset: VIS and NISP on 0.1"/px, PSFs, depth and the noise it sets,
and a synthetic Euclid survey whose planes carry that noise."""

from __future__ import annotations

import json
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


def _gaussian_image(n, x0, y0, amp, s):
    yy, xx = np.mgrid[:n, :n]
    return amp * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * s**2))


def _pixel_integrated_psf(n, x0, y0, flux, s):
    from scipy.special import erf

    edges = np.arange(n + 1) - 0.5

    def cdf(c):
        return 0.5 * (1 + erf((edges - c) / (s * math.sqrt(2))))

    return flux * np.outer(np.diff(cdf(y0)), np.diff(cdf(x0)))


def test_the_mer_kernel_measures_a_gaussian_blobs_segment_area_and_peak():
    """A noiseless circular Gaussian: after the detection filter (a Gaussian of the PSF's FWHM)
    it is a Gaussian of variance s^2 + f^2 and amplitude A s^2 / (s^2 + f^2); its segment is
    the disc where that exceeds 1.5 sigma, area pi r^2 with r^2 = 2 (s^2 + f^2) ln(A' / t)."""
    from lenscan.simulate.mer_detect import mer_detection_columns

    n, s, amp, sigma, fwhm = 201, 6.0, 0.5, 0.001, 1.7
    f = fwhm / 2.3548
    image = _gaussian_image(n, 100.0, 100.0, amp, s)
    out = mer_detection_columns(image, sigma, np.array([100.0]), np.array([100.0]),
                                np.array([20.0]), psf_fwhm_pix=fwhm)  # fmt: skip
    v = s**2 + f**2
    r2 = 2 * v * math.log(amp * s**2 / v / (1.5 * sigma))
    assert out["vis_det"][0] == 1
    assert out["segmentation_area"][0] == pytest.approx(math.pi * r2, rel=0.02)
    # MU_MAX: the peak pixel amp in uJy on a 0.01 arcsec^2 pixel
    assert out["mu_max"][0] == pytest.approx(23.9 - 2.5 * math.log10(amp / 0.01), abs=1e-4)
    assert out["mumax_minus_mag"][0] == pytest.approx(out["mu_max"][0] - 20.0, abs=1e-4)
    assert out["spurious_prob"][0] == 0 and out["extended_prob"][0] > 0.99


def test_the_mer_kernel_splits_a_shared_segment_and_leaves_the_empty_sky_undetected():
    from lenscan.simulate.mer_detect import mer_detection_columns, point_source_mumax_minus_mag

    n, sigma = 200, 0.001
    image = _gaussian_image(n, 60.0, 100.0, 0.3, 5.0) + _gaussian_image(n, 76.0, 100.0, 0.3, 5.0)
    point = _pixel_integrated_psf(n, 150, 40, 0.5, 1.7 / 2.3548)
    image = image + point
    rng = np.random.default_rng(0)
    noisy = image + rng.normal(0, sigma, image.shape)
    x, y = np.array([60.0, 76.0, 150.0, 20.0]), np.array([100.0, 100.0, 40.0, 180.0])
    mag = np.array([18.0, 18.0, 23.9 - 2.5 * math.log10(point.sum()), 20.0])
    out = mer_detection_columns(noisy, sigma, x, y, mag, psf_fwhm_pix=1.7)
    alone = mer_detection_columns(noisy, sigma, x[:1], y[:1], mag[:1], psf_fwhm_pix=1.7)
    assert out["vis_det"].tolist() == [1, 1, 1, 0]
    # the two touching blobs share one segment, split half and half
    a, b = out["segmentation_area"][:2]
    assert abs(int(a) - int(b)) <= 0.05 * a
    assert a + b == pytest.approx(alone["segmentation_area"][0], abs=1)
    # a point source is as concentrated as the PSF: MU_MAX - MAG at the point-source value
    assert out["mumax_minus_mag"][2] == pytest.approx(point_source_mumax_minus_mag(1.7, 0.1),
                                                      abs=0.05)  # fmt: skip
    assert out["point_like_prob"][2] > 0.9 and out["extended_prob"][0] > 0.9
    assert out["segmentation_area"][3] == 0 and np.isnan(out["mu_max"][3])


def test_a_synthetic_euclid_survey_carries_mer_columns_and_q1_keeps_its_bright_lenses(
    tmp_path, cluster_client
):
    """make_survey(preset="euclid") measures MER's detection columns on its noisy VIS image:
    cut euclid-q1 then runs on the store and keeps its bright lenses."""
    from lenscan import scan
    from lenscan.select import colour_cut_mask, get_colour_cut
    from lenscan.simulate.survey import read_truth
    from tests.helpers import make_tiny_model

    url = str(tmp_path / "sim.zarr")
    make_survey(url, n_tiles=1, preset="euclid", tile_size_pix=512, lenses_per_tile=3, seed=2,
                artefacts=False)  # fmt: skip
    store = open_survey(url)
    cat = store.tile(store.tile_ids[0]).catalog()
    cut = get_colour_cut("euclid-q1")
    truth = read_truth(url)
    assert (truth["vis_det"] == 1).all() and (truth["segmentation_area"] > 200).all()
    kept = colour_cut_mask(truth, cut)
    assert kept.all()
    row = np.isin(cat["id"], truth["id"])
    assert colour_cut_mask(cat, cut)[row].all()
    assert not colour_cut_mask(cat, cut).all()  # faint and small objects fail
    model = make_tiny_model(tmp_path / "m", bands=("vis", "y", "j", "h"), pixel_scale=0.1)
    result = scan(url, out=str(tmp_path / "run"), model=model, colour_cut="euclid-q1",
                  threshold=0.0, client=cluster_client, progress=False,
                  gallery_size=0)  # fmt: skip
    assert set(truth["id"].tolist()) <= set(np.asarray(result["id"]).tolist())


def test_lenscan_evaluate_measures_the_q1_cut_on_a_synthetic_euclid_survey(tmp_path, capsys):
    """`lenscan evaluate --cut euclid-q1 --preset euclid` compares with euclid-vis-bright (the
    DES reference reads g, r, i, which Euclid surveys lack) and reads the MER columns."""
    from lenscan.cli import main

    url = str(tmp_path / "sim.zarr")
    make_survey(url, n_tiles=1, preset="euclid", tile_size_pix=512, lenses_per_tile=3, seed=2,
                artefacts=False)  # fmt: skip
    out = tmp_path / "cut"
    argv = ["evaluate", "--cut", "euclid-q1", "--preset", "euclid", "--survey-url", url]
    assert main([*argv, "--out", str(out)]) == 0
    report = json.loads((out / "cut-evaluation.json").read_text())
    assert report["cut"] == "euclid-q1" and report["reference"] == "euclid-vis-bright"
    assert report["n_lenses"] == 3 and report["completeness"] == 1.0
    assert report["n_galaxies"] > 0
    assert report["selected_fraction"] <= report["reference_selected_fraction"] < 1
    assert "euclid-q1" in capsys.readouterr().out
