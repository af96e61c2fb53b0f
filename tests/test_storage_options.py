"""Storage options of ``write_tile`` (issue 10): compressed weight/mask planes, quantised images."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from astropy.wcs import WCS

from lenscan.stamps import cut_stamps, mask_stamps, stamp_edge_flags, stamp_origins
from lenscan.survey import create_survey, open_survey, read_model_stamps, read_stamps
from lenscan.survey import reader as _reader

BANDS = ("g", "r", "i")


def _catalog() -> dict[str, np.ndarray]:
    cat = {
        "id": np.arange(1, dtype=np.int64),
        "ra": np.zeros(1),
        "dec": np.zeros(1),
        "x": np.zeros(1),
        "y": np.zeros(1),
        "flags": np.zeros(1, np.int32),
        "extended_class": np.full(1, 2, np.int16),
    }
    for b in BANDS:
        cat[f"mag_{b}"] = np.full(1, 22.0, np.float32)
        cat[f"magerr_{b}"] = np.full(1, 0.1, np.float32)
    return cat


def _wcs() -> WCS:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [30.0, -30.0]
    w.wcs.cdelt = [-0.263 / 3600, 0.263 / 3600]
    return w


@pytest.fixture
def image():
    rng = np.random.default_rng(4)
    img = rng.normal(0.0, 3.0, size=(3, 300, 270)).astype(np.float32)
    img[:, 40, 50] = 60000.0  # a saturated star: far beyond int16 steps, within int32
    img[:, 41, 50] = 3000000.1  # more than 2**24 steps: float32 rounding must match zarr's
    return img


def _write(tmp_path, image, **options):
    tmp_path.mkdir(exist_ok=True)
    survey = create_survey(tmp_path / "s.zarr", name="t", bands=BANDS, overwrite=True)
    weight = np.full(image.shape, 1 / 9.0, np.float32)
    mask = np.zeros(image.shape, np.uint8)
    mask[:, 10:20, 10:20] = 1
    survey.write_tile(
        "t",
        image=image,
        weight=weight,
        mask=mask,
        wcs_header=_wcs().to_header(),
        catalog=_catalog(),
        pixel_scale_arcsec=0.263,
        zero_point=30.0,
        shard_pix=256,
        **options,
    )
    return open_survey(tmp_path / "s.zarr").tile("t"), weight, mask


def _plain(arr, x, y, size):
    """Stamps cut from the whole array as zarr returns it (NaN outside the tile)."""
    full = np.asarray(arr[:], dtype=np.float32)
    ny, nx = full.shape[1:]
    x0, y0 = stamp_origins(x, y, size)
    out = np.full((len(x), full.shape[0], size, size), np.nan, np.float32)
    for k in range(len(x)):
        ya, yb = max(y0[k], 0), min(y0[k] + size, ny)
        xa, xb = max(x0[k], 0), min(x0[k] + size, nx)
        if ya < yb and xa < xb:
            out[k, :, ya - y0[k] : yb - y0[k], xa - x0[k] : xb - x0[k]] = full[:, ya:yb, xa:xb]
    return out


def test_weight_and_mask_planes_are_compressed_by_default_and_read_back_exactly(tmp_path, image):
    tile, weight, mask = _write(tmp_path, image)
    assert tile.attrs["quantise_step"] is None
    for name, data in (("weight", weight), ("mask", mask)):
        arr = tile._array(name)
        assert "zstd" in repr(arr.metadata.codecs).lower()
        np.testing.assert_array_equal(arr[:], data)
    assert "zstd" not in repr(tile.image.metadata.codecs).lower()  # the image stays raw
    np.testing.assert_array_equal(tile.image[:], image)


def test_quantised_image_is_within_half_a_step_and_read_stamps_matches_zarr(tmp_path, image):
    tile, _, _ = _write(tmp_path, image, quantise=16)
    step = tile.attrs["quantise_step"]
    assert step <= 3.0 / 16 * 1.05 and np.log2(step) == round(np.log2(step))
    back = np.asarray(tile.image[:])
    assert back.dtype == np.float32
    assert np.abs(back - image).max() <= step / 2
    assert back[0, 40, 50] == 60000.0
    assert isinstance(_reader._engine_for(tile.image), _reader._DirectEngine)
    rng = np.random.default_rng(1)
    x, y = rng.uniform(-20, 290, 120), rng.uniform(-20, 320, 120)
    stamps, _ = read_stamps(tile, x, y, 48)
    np.testing.assert_array_equal(stamps, _plain(tile.image, x, y, 48))


def test_quantise_refuses_nan_pixels_and_bad_levels(tmp_path, image):
    image[1, 5, 5] = np.nan
    with pytest.raises(ValueError, match="quantise needs finite pixels"):
        _write(tmp_path, image, quantise=16)
    image[1, 5, 5] = 0.0
    with pytest.raises(ValueError, match="quantise must be finite and > 0"):
        _write(tmp_path, image, quantise=0)
    with pytest.raises(ValueError, match="aux_codec must be one of"):
        _write(tmp_path, image, aux_codec="gzip")


def test_quantised_model_stamps_match_a_plain_read_of_the_original_within_half_a_step(
    tmp_path, image
):
    """read_model_stamps on a quantised tile (the scan's read) == the same stamps cut from the
    original pixels with cut_stamps and masked with mask_stamps, within half a step."""
    tile, _, mask = _write(tmp_path, image, quantise=16)
    step = tile.attrs["quantise_step"]
    rng = np.random.default_rng(3)
    x, y = rng.uniform(-20, 290, 80), rng.uniform(-20, 320, 80)
    got, edge, frac = read_model_stamps(tile, x, y, 40, bands=BANDS)
    x0, y0 = stamp_origins(x, y, 40)
    plain, plain_frac = mask_stamps(
        cut_stamps(image, x0, y0, 40), mask=cut_stamps(mask, x0, y0, 40, fill_value=0)
    )
    assert np.array_equal(np.isnan(got), np.isnan(plain))
    assert np.nanmax(np.abs(got - plain)) <= step / 2
    np.testing.assert_array_equal(frac, plain_frac)
    np.testing.assert_array_equal(edge, stamp_edge_flags(x0, y0, 40, image.shape[1:]))


def test_streamed_rows_equal_a_whole_write_and_bad_blocks_are_refused(tmp_path, image):
    """begin_tile + write_rows in blocks (as ingest streams) stores what write_tile stores."""
    whole, weight, mask = _write(tmp_path / "a", image, quantise=16)
    survey = create_survey(tmp_path / "b.zarr", name="t", bands=BANDS)
    writer = survey.begin_tile(
        "t", shape_yx=image.shape[1:], wcs_header=_wcs().to_header(), catalog=_catalog(),
        pixel_scale_arcsec=0.263, zero_point=30.0, weight=True, mask_dtype=np.uint8,
        shard_pix=256, quantise_step=whole.attrs["quantise_step"],
    )  # fmt: skip
    assert "t" not in survey  # invisible until committed
    for b in range(3):
        for y0 in (0, 256):
            rows = slice(y0, y0 + 256)
            writer.write_rows(y0, band=b, image=image[b, rows], weight=weight[b, rows],
                              mask=mask[b, rows])  # fmt: skip
    with pytest.raises(ValueError, match="do not fit the tile"):
        writer.write_rows(290, band=0, image=image[0, :20], weight=weight[0, :20],
                          mask=mask[0, :20])  # fmt: skip
    with pytest.raises(ValueError, match="needs a weight plane"):
        writer.write_rows(0, band=0, image=image[0, :20], mask=mask[0, :20])
    bad = image[0, :20].copy()
    bad[3, 3] = np.nan
    with pytest.raises(ValueError, match="quantise needs finite pixels"):
        writer.write_rows(0, band=0, image=bad, weight=weight[0, :20], mask=mask[0, :20])
    streamed = writer.commit()
    for name in ("image", "weight", "mask"):
        np.testing.assert_array_equal(streamed._array(name)[:], whole._array(name)[:])
    with pytest.raises(ValueError, match="power of two"):
        survey.begin_tile("u", shape_yx=(10, 10), wcs_header=_wcs().to_header(),
                          catalog=_catalog(), pixel_scale_arcsec=0.263, zero_point=30.0,
                          quantise_step=0.3)  # fmt: skip


def test_weight_only_tiles_mask_through_the_zero_weight_plane_without_reading_weights(
    tmp_path, image
):
    """A tile with a weight and no mask gets a uint8 zero_weight plane; read_model_stamps reads
    it instead of the float weights and returns exactly what masking with the weights gives."""
    survey = create_survey(tmp_path / "s.zarr", name="t", bands=BANDS)
    weight = np.full(image.shape, 1 / 9.0, np.float32)
    weight[1, 100:140, 30:90] = 0.0  # no data
    weight[2, 7, 7] = np.nan  # NaN weight counts as not masked, both ways
    survey.write_tile("t", image=image, weight=weight, wcs_header=_wcs().to_header(),
                      catalog=_catalog(), pixel_scale_arcsec=0.263, zero_point=30.0,
                      shard_pix=256)  # fmt: skip
    tile = open_survey(tmp_path / "s.zarr").tile("t")
    np.testing.assert_array_equal(tile.zero_weight[:], (weight == 0).astype(np.uint8))
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.uniform(-20, 290, 60), [60.0, 7.0]])
    y = np.concatenate([rng.uniform(-20, 320, 60), [120.0, 7.0]])
    plain, edge = read_stamps(tile, x, y, 40)
    expected, expected_frac = mask_stamps(
        plain, weight=read_stamps(tile, x, y, 40, array="weight")[0]
    )
    assert expected_frac.max() > 0.3  # the no-data block is inside some stamps
    got, got_edge, got_frac = read_model_stamps(tile, x, y, 40, bands=BANDS)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got_frac, expected_frac)
    np.testing.assert_array_equal(got_edge, edge)
    # The weights' chunks are not read at all: without them the result is the same.
    shutil.rmtree(tmp_path / "s.zarr" / "tiles" / "t" / "weight" / "c")
    again = read_model_stamps(open_survey(tmp_path / "s.zarr").tile("t"), x, y, 40, bands=BANDS)
    np.testing.assert_array_equal(again[0], expected)
    np.testing.assert_array_equal(again[2], expected_frac)
