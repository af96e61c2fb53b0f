"""Stamp placement (Cutout2D convention), cutting with edge padding, normalisation."""

import numpy as np
import pytest
import torch
from astropy.nddata import Cutout2D

from lenscan.stamps import cut_stamps, normalise_stamps, stamp_edge_flags, stamp_origins


@pytest.mark.parametrize("size", [8, 9, 64])
def test_cut_matches_cutout2d_including_edges(size):
    rng = np.random.default_rng(1)
    image = rng.normal(size=(2, 50, 70)).astype(np.float32)
    x = np.concatenate([rng.uniform(-3, 72, 40), [0.0, 69.0, 0.5, 34.5]])
    y = np.concatenate([rng.uniform(-3, 52, 40), [0.0, 49.0, 0.5, 24.5]])
    x0, y0 = stamp_origins(x, y, size)
    stamps = cut_stamps(image, x0, y0, size)
    edge = stamp_edge_flags(x0, y0, size, image.shape[1:])
    for k in range(len(x)):
        for b in range(2):
            try:
                ref = Cutout2D(image[b], (x[k], y[k]), size, mode="partial", fill_value=np.nan).data
            except Exception:  # no overlap at all: Cutout2D refuses, we give all-NaN
                assert np.isnan(stamps[k, b]).all()
                continue
            np.testing.assert_array_equal(stamps[k, b], ref)
        assert edge[k] == bool(np.isnan(stamps[k]).any())


def test_region_origin_and_too_small_region():
    image = np.arange(2 * 30 * 30, dtype=np.float32).reshape(2, 30, 30)
    x0, y0 = stamp_origins(np.array([15.0]), np.array([12.0]), 6)
    full = cut_stamps(image, x0, y0, 6)
    region = image[:, 5:25, 10:28]
    part = cut_stamps(region, x0, y0, 6, origin_yx=(5, 10), full_shape_yx=(30, 30))
    np.testing.assert_array_equal(full, part)
    with pytest.raises(ValueError, match="outside the region read"):
        cut_stamps(image[:, 12:, :], x0, y0, 6, origin_yx=(12, 0), full_shape_yx=(30, 30))


def test_non_finite_centres_rejected():
    with pytest.raises(ValueError, match="finite"):
        stamp_origins(np.array([np.nan]), np.array([1.0]), 10)


def test_normalisation_is_robust_and_nan_safe():
    rng = np.random.default_rng(0)
    stamps = (100.0 + 5.0 * rng.normal(size=(3, 2, 32, 32))).astype(np.float32)
    stamps[1, :, :4, :] = np.nan  # padded edge
    original = stamps.copy()
    out = normalise_stamps(stamps, {"method": "asinh_mad", "softening_sigma": 1.0})
    np.testing.assert_array_equal(stamps, original)  # input untouched
    assert out.dtype == torch.float32 and out.shape == stamps.shape
    assert torch.isfinite(out).all()
    assert (out[1, :, :4, :] == 0).all()
    # Noise in sigma units: asinh(z) with z ~ N(0, 1) has std ~0.8 and median ~0.
    assert abs(float(out[0].median())) < 0.05
    assert 0.6 < float(out[0].std()) < 1.0
    # Scale invariance: the same stamp times 10 normalises the same.
    out10 = normalise_stamps(stamps * 10, {"method": "asinh_mad", "softening_sigma": 1.0})
    torch.testing.assert_close(out, out10, rtol=1e-4, atol=1e-4)


def _reference_asinh_mad(band: np.ndarray, softening: float) -> np.ndarray:
    """The normalisation of one band of one stamp, written out in float64 numpy."""
    flat = band.astype(np.float64).ravel()
    med = np.sort(flat)[(flat.size - 1) // 2]  # the lower median, as torch.nanmedian
    dev = np.abs(flat - med)
    sigma = 1.4826 * np.sort(dev)[(dev.size - 1) // 2]
    sigma = sigma if sigma > 0 else 1.0
    return np.arcsinh((band - med) / sigma / softening)


def test_each_band_is_normalised_by_its_own_level_and_noise():
    # Three bands as unlike as a survey's: a bright sky with large noise, a faint one with a
    # negative level and small noise, and a flat band (no noise estimate: all zeros out).
    rng = np.random.default_rng(3)
    stamps = np.empty((4, 3, 24, 24), np.float32)
    stamps[:, 0] = 1000.0 + 40.0 * rng.normal(size=(4, 24, 24))
    stamps[:, 1] = -20.0 + 0.5 * rng.normal(size=(4, 24, 24))
    stamps[:, 2] = 7.0
    stamps[:, :, 10:14, 10:14] += np.array([400.0, 5.0, 0.0], np.float32)[:, None, None]
    out = normalise_stamps(stamps, {"method": "asinh_mad", "softening_sigma": 3.0}).numpy()
    for k in range(len(stamps)):
        for b in range(3):
            ref = _reference_asinh_mad(stamps[k, b], 3.0)
            np.testing.assert_allclose(out[k, b], ref, atol=2e-5, err_msg=f"stamp {k} band {b}")
    assert (out[:, 2] == 0).all()
    # The bright core stands out equally in both noisy bands (10 sigma above each band's sky).
    core = out[:, :2, 10:14, 10:14].mean(axis=(0, 2, 3))
    assert np.allclose(core, np.arcsinh(10 / 3), atol=0.15), core


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"method": "zscore"}, "unknown normalisation"),
        ({"method": "asinh_mad"}, "needs parameters"),
        ({"method": "asinh_mad", "softening_sigma": 0}, "> 0"),
    ],
)
def test_bad_normalisation_spec(spec, match):
    with pytest.raises(ValueError, match=match):
        normalise_stamps(np.zeros((1, 1, 4, 4), np.float32), spec)
