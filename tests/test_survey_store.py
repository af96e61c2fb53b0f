"""Tests for the survey store (lenscan.survey.store): layout, round trips, errors."""

from __future__ import annotations

import json
import pickle
import uuid
from pathlib import Path

import numpy as np
import pytest
import zarr
from astropy.io import fits
from astropy.wcs import WCS

from lenscan.survey import (
    SCHEMA_VERSION,
    SurveyFormatError,
    SurveyStore,
    Tile,
    create_survey,
    open_survey,
)

BANDS = ("g", "r", "i")


def _url(kind: str, tmp_path: Path) -> str:
    if kind == "path":
        return str(tmp_path / "survey.zarr")
    if kind == "file":
        return f"file://{tmp_path / 'survey.zarr'}"
    return f"memory://lenscan-tests/{uuid.uuid4().hex}/survey.zarr"


def _check_round_trip(survey: SurveyStore, data: dict, tile_id: str) -> None:
    tile = survey.tile(tile_id)
    assert isinstance(tile, Tile)
    assert tile.id == tile_id
    assert tile.bands == BANDS
    assert tile.shape_yx == data["image"].shape[1:]
    assert tile.pixel_scale_arcsec == data["pixel_scale_arcsec"]
    assert tile.zero_point == data["zero_point"]
    assert tile.image.dtype == np.float32
    np.testing.assert_array_equal(tile.image[:], data["image"])
    np.testing.assert_array_equal(tile.weight[:], data["weight"])
    np.testing.assert_array_equal(tile.mask[:], data["mask"])
    assert tile.mask.dtype == np.uint8
    np.testing.assert_array_equal(tile.read_region(10, 40, 5, 90), data["image"][:, 10:40, 5:90])
    np.testing.assert_array_equal(
        tile.read_region(0, 3, 0, 4, array="weight"), data["weight"][:, 0:3, 0:4]
    )
    # WCS: same transformation as the one written.
    ref = WCS(data["wcs_header"])
    px = np.array([0.0, 17.3, 199.0]), np.array([0.0, 81.9, 149.0])
    np.testing.assert_allclose(tile.wcs.wcs_pix2world(*px, 0), ref.wcs_pix2world(*px, 0), rtol=0)
    cat = tile.catalog()
    assert list(cat) == list(data["catalog"])
    for col, values in data["catalog"].items():
        np.testing.assert_array_equal(cat[col], values, err_msg=col)
    assert cat["id"].dtype == np.int64
    assert cat["ra"].dtype == np.float64
    assert cat["mag_g"].dtype == np.float32
    assert cat["flags"].dtype == np.int32
    assert cat["extended_class"].dtype == np.int16
    sub = tile.catalog(["y", "id"])
    assert list(sub) == ["y", "id"]


@pytest.mark.parametrize("kind", ["path", "file", "memory"])
def test_round_trip(kind: str, tmp_path: Path, make_tile_data) -> None:
    url = _url(kind, tmp_path)
    data = make_tile_data(seed=1)
    survey = create_survey(url, name="unit", bands=BANDS)
    assert survey.mode == "a"
    survey.write_tile("DES0001-4914", **data, chunk_pix=32, shard_pix=64, extra_attrs={"run": 7})

    reopened = open_survey(url)
    assert reopened.mode == "r"
    assert reopened.name == "unit"
    assert reopened.bands == BANDS
    assert reopened.schema_version == SCHEMA_VERSION
    assert reopened.attrs["lenscan_survey"]["lenscan_version"]
    assert reopened.tile_ids == ["DES0001-4914"]
    assert reopened.has_tile("DES0001-4914")
    assert not reopened.has_tile("DES0002-4914")
    _check_round_trip(reopened, data, "DES0001-4914")
    assert reopened.tile("DES0001-4914").attrs["extra"] == {"run": 7}
    with pytest.raises(PermissionError, match="read-only"):
        reopened.write_tile("other", **data)


def test_round_trip_s3(s3_url, make_tile_data) -> None:
    url, storage_options = s3_url
    url = f"{url}/survey.zarr"
    data = make_tile_data(seed=2, shape_yx=(100, 120))  # small: every object is a request
    survey = create_survey(url, name="s3", bands=BANDS, storage_options=storage_options)
    survey.write_tile("t0", **data, chunk_pix=32, shard_pix=64)
    small = make_tile_data(seed=3, shape_yx=(20, 20), n_sources=2)
    survey.write_tile("t1", **{**small, "weight": None, "mask": None})
    reopened = open_survey(url, storage_options=storage_options)
    assert reopened.tile_ids == ["t0", "t1"]
    _check_round_trip(reopened, data, "t0")
    # The tile really is sharded: one shard object per (band, shard row, shard col).
    image = reopened.tile("t0").image
    assert image.shards == (1, 64, 64)
    assert image.chunks == (1, 32, 32)


def test_memory_url_shared_within_process(make_tile_data) -> None:
    url = f"memory://lenscan-tests/{uuid.uuid4().hex}"
    create_survey(url, name="m", bands=BANDS).write_tile("a", **make_tile_data())
    # A second open of the same memory:// URL sees the same data (fsspec's memory filesystem).
    assert open_survey(url).tile_ids == ["a"]


def test_wcs_distortion_round_trip(tmp_path: Path, make_tile_data) -> None:
    data = make_tile_data(seed=4)
    sip = fits.Header()
    sip.update(
        {
            "CTYPE1": "RA---TAN-SIP",
            "CTYPE2": "DEC--TAN-SIP",
            "CRVAL1": 30.0,
            "CRVAL2": -40.0,
            "CRPIX1": 100.0,
            "CRPIX2": 75.0,
            "CD1_1": -7.3e-5,
            "CD1_2": 0.0,
            "CD2_1": 0.0,
            "CD2_2": 7.3e-5,
            "A_ORDER": 2,
            "B_ORDER": 2,
            "A_2_0": 2.0e-5,
            "A_0_2": -1.0e-5,
            "B_1_1": 3.0e-5,
        }
    )
    tpv = fits.Header()
    tpv.update(
        {
            "CTYPE1": "RA---TPV",
            "CTYPE2": "DEC--TPV",
            "CRVAL1": 30.0,
            "CRVAL2": -40.0,
            "CRPIX1": 100.0,
            "CRPIX2": 75.0,
            "CD1_1": -7.3e-5,
            "CD1_2": 0.0,
            "CD2_1": 0.0,
            "CD2_2": 7.3e-5,
            "PV1_0": 0.0,
            "PV1_1": 1.0,
            "PV1_4": 2.0e-3,
            "PV1_7": 1.0e-2,
            "PV2_0": 0.0,
            "PV2_1": 1.0,
            "PV2_5": -3.0e-3,
        }
    )
    survey = create_survey(tmp_path / "s.zarr", name="d", bands=BANDS)
    px = np.array([0.0, 50.0, 199.0]), np.array([0.0, 140.0, 149.0])
    for tile_id, header in (("sip", sip), ("tpv", tpv)):
        survey.write_tile(tile_id, **{**data, "wcs_header": header})
        ref = WCS(header)
        got = open_survey(tmp_path / "s.zarr").tile(tile_id).wcs
        np.testing.assert_allclose(got.all_pix2world(*px, 0), ref.all_pix2world(*px, 0), rtol=0)
        # The distortion survived: the result differs from the plain TAN solution.
        linear = fits.Header(
            [c for c in header.cards if not c.keyword.startswith(("A_", "B_", "PV"))]
        )
        linear["CTYPE1"], linear["CTYPE2"] = "RA---TAN", "DEC--TAN"
        lin = np.asarray(WCS(linear).all_pix2world(*px, 0))
        assert np.max(np.abs(np.asarray(got.all_pix2world(*px, 0)) - lin)) > 1e-8
    assert open_survey(tmp_path / "s.zarr").tile("sip").wcs.sip is not None


def test_open_and_append_mode(tmp_path: Path, make_tile_data) -> None:
    url = tmp_path / "s.zarr"
    first = make_tile_data(seed=5)
    create_survey(url, name="a", bands=BANDS).write_tile("t1", **first)
    survey = open_survey(url, mode="a")
    survey.write_tile("t2", **make_tile_data(seed=6))
    reopened = open_survey(url)
    assert reopened.tile_ids == ["t1", "t2"]
    _check_round_trip(reopened, first, "t1")
    assert len(reopened) == 2
    assert "t2" in reopened
    assert [t.id for t in reopened] == ["t1", "t2"]
    with pytest.raises(ValueError, match="mode"):
        open_survey(url, mode="w")  # type: ignore[arg-type]


def test_rewrite_replaces_tile_cleanly(tmp_path: Path, make_tile_data) -> None:
    survey = create_survey(tmp_path / "s.zarr", name="a", bands=BANDS)
    survey.write_tile("t", **make_tile_data(seed=7, shape_yx=(150, 200)))
    second = make_tile_data(seed=8, shape_yx=(90, 70), n_sources=3)
    second["weight"] = None
    second["mask"] = None
    survey.write_tile("t", **second, codec="zstd", shard_pix=None)
    tile = open_survey(tmp_path / "s.zarr").tile("t")
    assert tile.shape_yx == (90, 70)
    assert tile.weight is None and tile.mask is None
    assert not (tmp_path / "s.zarr" / "tiles" / "t" / "weight").exists()
    np.testing.assert_array_equal(tile.image[:], second["image"])
    assert tile.image.shards is None
    assert tile.n_sources == 3


def test_interrupted_tile_is_never_complete(tmp_path: Path, make_tile_data) -> None:
    url = tmp_path / "s.zarr"
    survey = create_survey(url, name="a", bands=BANDS)
    data = make_tile_data(seed=9)
    survey.write_tile("good", **data)
    # Simulate a write interrupted after the pixels landed but before the complete flag.
    good_meta = survey.tile("good").attrs
    store = zarr.storage.LocalStore(url)
    group = zarr.create_group(
        store, path="tiles/broken", attributes={"lenscan_tile": {**good_meta, "complete": False}}
    )
    group.create_array("image", data=data["image"], chunks=(1, 64, 64))
    reopened = open_survey(url)
    assert reopened.tile_ids == ["good"]
    assert not reopened.has_tile("broken")
    assert "broken" not in reopened
    with pytest.raises(KeyError, match="did not complete"):
        reopened.tile("broken")
    # Resuming: writing it again makes it complete.
    open_survey(url, mode="a").write_tile("broken", **data)
    assert open_survey(url).tile_ids == ["broken", "good"]


def test_write_failure_leaves_no_complete_tile(tmp_path: Path, make_tile_data) -> None:
    survey = create_survey(tmp_path / "s.zarr", name="a", bands=BANDS)
    data = make_tile_data(seed=10)
    data["extra_attrs"] = {"bad": {1, 2}}  # not JSON: fails validation before any write
    with pytest.raises(ValueError, match="extra_attrs"):
        survey.write_tile("t", **data)
    assert not survey.has_tile("t")
    assert not (tmp_path / "s.zarr" / "tiles" / "t").exists()


def test_empty_catalog(tmp_path: Path, make_tile_data) -> None:
    data = make_tile_data(seed=11, n_sources=0)
    survey = create_survey(tmp_path / "s.zarr", name="a", bands=BANDS)
    survey.write_tile("t", **data)
    cat = open_survey(tmp_path / "s.zarr").tile("t").catalog()
    assert all(len(v) == 0 for v in cat.values())
    assert cat["mag_r"].dtype == np.float32


def test_extra_catalog_columns_kept(tmp_path: Path, make_tile_data) -> None:
    data = make_tile_data(seed=12, n_sources=4)
    data["catalog"]["flux_radius"] = np.arange(4, dtype=np.float64)
    data["catalog"]["is_psf"] = np.array([True, False, True, False])
    survey = create_survey(tmp_path / "s.zarr", name="a", bands=BANDS)
    survey.write_tile("t", **data)
    cat = survey.tile("t").catalog(["flux_radius", "is_psf"])
    np.testing.assert_array_equal(cat["flux_radius"], np.arange(4))
    np.testing.assert_array_equal(cat["is_psf"], [True, False, True, False])


def test_unknown_catalog_column(tmp_path: Path, make_tile_data) -> None:
    survey = create_survey(tmp_path / "s.zarr", name="a", bands=BANDS)
    survey.write_tile("t9", **make_tile_data())
    with pytest.raises(KeyError, match=r"t9.*mag_u.*available.*mag_g"):
        survey.tile("t9").catalog(["id", "mag_u"])


def test_pickle_reopens_by_url(tmp_path: Path, make_tile_data) -> None:
    data = make_tile_data(seed=13)
    survey = create_survey(tmp_path / "s.zarr", name="a", bands=BANDS)
    survey.write_tile("t", **data)
    tile = pickle.loads(pickle.dumps(open_survey(tmp_path / "s.zarr").tile("t")))
    np.testing.assert_array_equal(tile.image[:], data["image"])
    again = pickle.loads(pickle.dumps(survey))
    assert again.mode == "a" and again.tile_ids == ["t"]


# ------------------------------------------------------------------------------ not a store


def test_not_a_store_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.zarr"
    with pytest.raises(SurveyFormatError, match="nope.zarr"):
        open_survey(missing)
    assert not missing.exists()  # opening read-only never creates anything

    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("hello")
    with pytest.raises(SurveyFormatError, match=str(plain)):
        open_survey(plain)

    group_url = str(tmp_path / "group.zarr")
    zarr.create_group(group_url, attributes={"something": 1})
    with pytest.raises(SurveyFormatError, match=r"group\.zarr.*not a lenscan survey"):
        open_survey(group_url)

    array_url = str(tmp_path / "array.zarr")
    zarr.create_array(array_url, shape=(3,), dtype="f4")
    with pytest.raises(SurveyFormatError, match=r"array\.zarr.*array"):
        open_survey(array_url)

    v2_url = str(tmp_path / "v2.zarr")
    zarr.create_group(v2_url, zarr_format=2)
    with pytest.raises(SurveyFormatError, match=r"v2\.zarr.*Zarr v2"):
        open_survey(v2_url)

    with pytest.raises(SurveyFormatError, match="memory://"):
        open_survey(f"memory://lenscan-tests/{uuid.uuid4().hex}")
    assert issubclass(SurveyFormatError, ValueError)


def test_newer_schema_refused(tmp_path: Path) -> None:
    url = tmp_path / "s.zarr"
    create_survey(url, name="a", bands=BANDS)
    meta_path = url / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["lenscan_survey"]["schema_version"] = SCHEMA_VERSION + 1
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(SurveyFormatError) as err:
        open_survey(url)
    msg = str(err.value)
    assert str(url) in msg
    assert f"schema_version {SCHEMA_VERSION + 1}" in msg
    assert f"schema_version {SCHEMA_VERSION} at most" in msg
    assert "upgrade lenscan" in msg


def test_create_refuses_existing(tmp_path: Path, make_tile_data) -> None:
    url = tmp_path / "s.zarr"
    create_survey(url, name="a", bands=BANDS).write_tile("t", **make_tile_data())
    with pytest.raises(FileExistsError, match="overwrite=True"):
        create_survey(url, name="a", bands=BANDS)
    fresh = create_survey(url, name="b", bands=("r",), overwrite=True)
    assert fresh.tile_ids == [] and fresh.bands == ("r",)

    other = tmp_path / "data"
    other.mkdir()
    (other / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not empty"):
        create_survey(other, name="x", bands=BANDS, overwrite=True)
    assert (other / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": ""}, "name"),
        ({"bands": "gri"}, "bands"),
        ({"bands": ["G"]}, "band 'G'"),
        ({"bands": ["g", "g"]}, "unique"),
        ({"bands": []}, "bands"),
    ],
)
def test_create_validates(tmp_path: Path, kwargs: dict, match: str) -> None:
    args = {"name": "a", "bands": BANDS, **kwargs}
    with pytest.raises(ValueError, match=match):
        create_survey(tmp_path / "s.zarr", **args)


# ------------------------------------------------------------------------------ invalid writes


def _bad(data: dict, key: str, value) -> dict:
    return {**data, key: value}


def _bad_cat(data: dict, **changes) -> dict:
    cat = dict(data["catalog"])
    for col, value in changes.items():
        if value is None:
            del cat[col]
        else:
            cat[col] = value
    return {**data, "catalog": cat}


INVALID_WRITES = [
    (lambda d: _bad(d, "image", d["image"][0]), ValueError, "image must be 3-D"),
    (lambda d: _bad(d, "image", d["image"][:2]), ValueError, "image has 2 planes"),
    (lambda d: _bad(d, "image", d["image"].astype(np.int32)), TypeError, "image must be floating"),
    (lambda d: _bad(d, "weight", d["weight"][:, :10]), ValueError, "weight shape"),
    (lambda d: _bad(d, "weight", -d["weight"]), ValueError, "weight.*negative"),
    (lambda d: _bad(d, "mask", d["mask"].astype(np.float32)), TypeError, "mask must be integer"),
    (lambda d: _bad(d, "mask", d["mask"][:, :, :5]), ValueError, "mask shape"),
    (lambda d: _bad(d, "pixel_scale_arcsec", float("nan")), ValueError, "pixel_scale_arcsec"),
    (lambda d: _bad(d, "pixel_scale_arcsec", -0.2), ValueError, "pixel_scale_arcsec"),
    (lambda d: _bad(d, "zero_point", float("inf")), ValueError, "zero_point"),
    (lambda d: _bad(d, "zero_point", "thirty"), TypeError, "zero_point"),
    (lambda d: _bad_cat(d, mag_r=None), ValueError, r"lacks required column\(s\) \['mag_r'\]"),
    (lambda d: _bad_cat(d, y=d["catalog"]["y"][:-1]), ValueError, "different lengths"),
    (lambda d: _bad_cat(d, id=d["catalog"]["ra"]), TypeError, "'id' must be integer"),
    (lambda d: _bad_cat(d, x=np.full(25, np.nan)), ValueError, "'x' has non-finite"),
    (lambda d: _bad_cat(d, name=np.array(["a"] * 25)), TypeError, "'name'"),
    (lambda d: _bad(d, "catalog", [1, 2]), TypeError, "catalog must be a mapping"),
    (lambda d: _bad(d, "wcs_header", 3), TypeError, "wcs_header"),
    (lambda d: _bad(d, "wcs_header", fits.Header({"NAXIS": 2})), ValueError, "celestial"),
    (
        lambda d: _bad(d, "wcs_header", fits.Header({**d["wcs_header"], "NAXIS1": 99})),
        ValueError,
        "NAXIS1=99",
    ),
    (lambda d: {**d, "chunk_pix": 0}, ValueError, "chunk_pix"),
    (lambda d: {**d, "chunk_pix": 32, "shard_pix": 48}, ValueError, "shard_pix"),
    (lambda d: {**d, "codec": "gzip"}, ValueError, "codec"),
]


@pytest.mark.parametrize(("change", "error", "match"), INVALID_WRITES)
def test_invalid_writes(tmp_path: Path, make_tile_data, change, error, match) -> None:
    survey = create_survey(tmp_path / "s.zarr", name="a", bands=BANDS)
    kwargs = change(make_tile_data(seed=14))
    with pytest.raises(error, match=match) as err:
        survey.write_tile("T-17", **kwargs)
    assert "T-17" in str(err.value)  # errors name the tile
    assert not survey.has_tile("T-17")


@pytest.mark.parametrize("tile_id", ["", "../up", "a/b", ".hidden", "sp ace", "x" * 201, 5])
def test_invalid_tile_ids(tmp_path: Path, make_tile_data, tile_id) -> None:
    survey = create_survey(tmp_path / "s.zarr", name="a", bands=BANDS)
    with pytest.raises(ValueError, match="invalid tile id"):
        survey.write_tile(tile_id, **make_tile_data())
    with pytest.raises(ValueError, match="invalid tile id"):
        survey.has_tile(tile_id)


def test_shard_clipped_to_image(tmp_path: Path, make_tile_data) -> None:
    survey = create_survey(tmp_path / "s.zarr", name="a", bands=BANDS)
    tile = survey.write_tile("t", **make_tile_data(shape_yx=(150, 200)), chunk_pix=64)
    assert tile.image.chunks == (1, 64, 64)
    assert tile.image.shards == (1, 192, 256)  # ceil to whole chunks, never 2048
    assert tile.attrs["shard_pix"] == [192, 256]


def test_read_region_validates(tmp_path: Path, make_tile_data) -> None:
    survey = create_survey(tmp_path / "s.zarr", name="a", bands=BANDS)
    data = make_tile_data()
    data["weight"] = None
    tile = survey.write_tile("t", **data)
    with pytest.raises(ValueError, match="outside the tile"):
        tile.read_region(0, 151, 0, 10)
    with pytest.raises(ValueError, match="no 'weight' array"):
        tile.read_region(0, 10, 0, 10, array="weight")
    with pytest.raises(ValueError, match="unknown array"):
        tile.read_region(0, 10, 0, 10, array="flux")
