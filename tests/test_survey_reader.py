"""Tests for the bulk stamp reader (lenscan.survey.read_stamps)."""

from __future__ import annotations

import contextlib
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from astropy.nddata import Cutout2D, NoOverlapError
from zarr.abc.store import RangeByteRequest, SuffixByteRequest
from zarr.codecs import (
    BloscCodec,
    BytesCodec,
    Crc32cCodec,
    GzipCodec,
    ShardingCodec,
    TransposeCodec,
)
from zarr.storage import LocalStore

from lenscan.stamps import stamp_origins
from lenscan.survey import SurveyStore, create_survey, open_survey, read_stamps
from lenscan.survey import reader as reader_mod
from lenscan.survey.store import _check_survey_meta

BANDS = ("g", "r", "i")
SHAPE = (150, 200)  # (ny, nx): not a multiple of the chunk size, so edge chunks are partial


def reference_stamps(image: np.ndarray, x, y, size: int, fill: float) -> np.ndarray:
    """Stamps cut with astropy's Cutout2D (mode='partial'), band by band."""
    out = np.full((len(x), image.shape[0], size, size), fill, dtype=image.dtype)
    for k, (xk, yk) in enumerate(zip(x, y, strict=True)):
        for b in range(image.shape[0]):
            with contextlib.suppress(NoOverlapError):  # no overlap: all fill
                out[k, b] = Cutout2D(
                    image[b], (xk, yk), size, mode="partial", fill_value=fill, copy=True
                ).data
    return out


def positions(rng: np.random.Generator, size: int, n: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """Random centres over and around the tile, plus corners, edges, half-pixels, off-tile."""
    ny, nx = SHAPE
    x = rng.uniform(-size, nx + size, n)
    y = rng.uniform(-size, ny + size, n)
    special_x = [0.0, nx - 1.0, -0.5, nx - 0.5, 31.5, 32.0, 100.49, 100.5, -size * 2.0, 55.0]
    special_y = [0.0, ny - 1.0, -0.5, ny - 0.5, 63.5, 64.0, 70.51, 70.5, 20.0, ny + size * 2.0]
    return np.concatenate([x, special_x]), np.concatenate([y, special_y])


def make_tile(url, data: dict, **layout):
    survey = create_survey(url, name="r", bands=BANDS, overwrite=True)
    return survey.write_tile("t", **data, **layout)


@pytest.fixture
def tile_data(make_tile_data) -> dict:
    data = make_tile_data(seed=21, shape_yx=SHAPE)
    # An all-NaN corner: its chunks are never written (fill value), the reader must still
    # return NaN there, not zeros or garbage.
    data["image"][:, :40, :70] = np.nan
    data["weight"][:, 100:, 150:] = 0.0  # chunks equal to the 0 fill value... of a float array
    return data


LAYOUTS = [
    pytest.param({"chunk_pix": 32, "shard_pix": 64}, id="sharded"),
    pytest.param({"chunk_pix": 32, "shard_pix": 64, "codec": "zstd"}, id="sharded-zstd"),
    pytest.param({"chunk_pix": 16, "shard_pix": None}, id="unsharded"),
    pytest.param({"chunk_pix": 64, "shard_pix": 2048}, id="one-shard"),
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("where", ["path", "memory"])
def test_stamps_equal_cutout2d(tmp_path: Path, tile_data: dict, layout: dict, where: str) -> None:
    url = str(tmp_path / "s.zarr") if where == "path" else f"memory://rd/{uuid.uuid4().hex}"
    tile = make_tile(url, tile_data, **layout)
    tile = open_survey(url).tile("t")  # read through a fresh, read-only handle
    rng = np.random.default_rng(5)
    for size in (1, 16, 33, 64):
        x, y = positions(rng, size)
        stamps, edge = read_stamps(tile, x, y, size)
        assert stamps.shape == (len(x), len(BANDS), size, size)
        assert stamps.dtype == np.float32
        np.testing.assert_array_equal(
            stamps, reference_stamps(tile_data["image"], x, y, size, np.nan)
        )
        x0, y0 = stamp_origins(x, y, size)
        expected_edge = (x0 < 0) | (y0 < 0) | (x0 + size > SHAPE[1]) | (y0 + size > SHAPE[0])
        np.testing.assert_array_equal(edge, expected_edge)
        assert edge.dtype == bool
    size = 24
    x, y = positions(rng, size)
    weight, _ = read_stamps(tile, x, y, size, array="weight")
    np.testing.assert_array_equal(weight, reference_stamps(tile_data["weight"], x, y, size, np.nan))
    mask, _ = read_stamps(tile, x, y, size, array="mask")
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, reference_stamps(tile_data["mask"], x, y, size, 0))


def gzip_tile(url: Path, tile_data: dict):
    """A tile whose image uses a layout the direct engine does not know (gzip, unsharded)."""
    make_tile(url, tile_data, chunk_pix=32, shard_pix=64)
    group = zarr.open_group(LocalStore(url), path="tiles/t", mode="r+")
    del group["image"]
    group.create_array(
        "image",
        data=tile_data["image"],
        chunks=(1, 32, 32),
        compressors=GzipCodec(),
        fill_value=np.nan,
    )
    return open_survey(url).tile("t")


def test_generic_zarr_engine(tmp_path: Path, tile_data: dict) -> None:
    """A layout the direct engine does not know (gzip) is served by zarr, with equal stamps."""
    tile = gzip_tile(tmp_path / "s.zarr", tile_data)
    assert isinstance(reader_mod._engine_for(tile.image), reader_mod._ZarrEngine)
    rng = np.random.default_rng(6)
    x, y = positions(rng, 40)
    stamps, _ = read_stamps(tile, x, y, 40)
    np.testing.assert_array_equal(stamps, reference_stamps(tile_data["image"], x, y, 40, np.nan))


def test_small_batches_give_same_stamps(tmp_path: Path, tile_data: dict) -> None:
    tile = make_tile(tmp_path / "s.zarr", tile_data, chunk_pix=32, shard_pix=64)
    rng = np.random.default_rng(7)
    x, y = positions(rng, 50)
    full, edge = read_stamps(tile, x, y, 50)
    # A budget of one chunk per batch forces many batches.
    small, edge_small = read_stamps(tile, x, y, 50, max_batch_bytes=1)
    np.testing.assert_array_equal(full, small)
    np.testing.assert_array_equal(edge, edge_small)


def test_empty_and_off_tile(tmp_path: Path, tile_data: dict) -> None:
    tile = make_tile(tmp_path / "s.zarr", tile_data)
    stamps, edge = read_stamps(tile, np.array([]), np.array([]), 20)
    assert stamps.shape == (0, 3, 20, 20) and edge.shape == (0,)
    stamps, edge = read_stamps(tile, [-100.0, 500.0], [10.0, 10.0], 20)
    assert np.isnan(stamps).all() and edge.all()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"size_pix": 0}, ValueError, "size_pix"),
        ({"size_pix": 2.5}, ValueError, "size_pix"),
        ({"x": [1.0, 2.0]}, ValueError, "equal length"),
        ({"x": [np.nan]}, ValueError, "finite"),
        ({"array": "flux"}, ValueError, "unknown array"),
        ({"array": "weight"}, ValueError, "no 'weight' array"),
        ({"tile": "t"}, TypeError, "Tile"),
    ],
)
def test_read_stamps_validates(tmp_path: Path, tile_data: dict, kwargs, error, match) -> None:
    tile_data["weight"] = None
    tile = make_tile(tmp_path / "s.zarr", tile_data)
    args: dict[str, Any] = {"tile": tile, "x": [5.0], "y": [5.0], "size_pix": 10, **kwargs}
    with pytest.raises(error, match=match):
        read_stamps(args.pop("tile"), args.pop("x"), args.pop("y"), args.pop("size_pix"), **args)


# ------------------------------------------------------------------------------ chunk reads


class CountingLocalStore(LocalStore):
    """A real LocalStore that records every ``get`` (key and byte range)."""

    def __init__(self, root, *, read_only: bool = False) -> None:
        super().__init__(root, read_only=read_only)
        self.gets: list[tuple[str, Any]] = []

    def with_read_only(self, read_only: bool = False) -> CountingLocalStore:
        store = type(self)(self.root, read_only=read_only)
        store.gets = self.gets  # share the log across the views zarr makes
        return store

    async def get(self, key, prototype, byte_range=None):
        self.gets.append((key, byte_range))
        return await super().get(key, prototype, byte_range)


def counting_tile(url: Path, tile_id: str = "t"):
    store = CountingLocalStore(url, read_only=True)
    meta = _check_survey_meta(str(url), json_meta(url), store)
    survey = SurveyStore(str(url), store, meta, storage_options=None, mode="r")
    tile = survey.tile(tile_id)
    tile.image  # noqa: B018 - open the array metadata before counting
    store.gets.clear()
    return tile, store


def json_meta(url: Path) -> dict:
    import json

    return json.loads((url / "zarr.json").read_text())


def touched_chunks(x, y, size, chunk, shape_yx) -> set[tuple[int, int]]:
    """Inner chunks (row, col) overlapped by the in-tile part of each stamp (independent loop)."""
    ny, nx = shape_yx
    x0, y0 = stamp_origins(x, y, size)
    out = set()
    for sx, sy in zip(x0, y0, strict=True):
        for yy in range(max(sy, 0), min(sy + size, ny)):
            for xx in range(max(sx, 0), min(sx + size, nx)):
                out.add((yy // chunk, xx // chunk))
    return out


@pytest.mark.parametrize(
    ("x", "y", "size"),
    [
        ([40.0], [40.0], 8),  # inside one chunk
        ([64.0], [64.0], 10),  # four chunks in one shard
        ([128.0], [50.0], 20),  # straddles a shard boundary in x
        ([0.0], [149.0], 30),  # corner, partly off the tile
        ([10.0, 12.0, 120.0, 190.0, 70.0], [10.0, 14.0, 90.0, 140.0, 300.0], 25),  # shared chunks
    ],
)
def test_reads_only_touched_chunks(tmp_path: Path, make_tile_data, x, y, size) -> None:
    data = make_tile_data(seed=22, shape_yx=SHAPE)
    url = tmp_path / "s.zarr"
    make_tile(url, data, chunk_pix=32, shard_pix=64)
    tile, store = counting_tile(url)
    stamps, _ = read_stamps(tile, np.array(x), np.array(y), size)
    np.testing.assert_array_equal(
        stamps, reference_stamps(data["image"], np.array(x), np.array(y), size, np.nan)
    )
    chunks = touched_chunks(np.array(x), np.array(y), size, 32, SHAPE)
    shards = {(r // 2, c // 2) for r, c in chunks}
    nb = len(BANDS)
    index_reads = [g for g in store.gets if isinstance(g[1], SuffixByteRequest)]
    chunk_reads = [g for g in store.gets if isinstance(g[1], RangeByteRequest)]
    assert len(index_reads) == nb * len(shards)
    assert len(store.gets) == len(index_reads) + len(chunk_reads)
    # Inner chunks side by side in a shard are fetched in one ranged read (issue 10), so a read
    # is a whole number of uncompressed chunks, and together they are exactly the touched ones.
    assert len(chunk_reads) <= nb * len(chunks)
    assert all((g[1].end - g[1].start) % (32 * 32 * 4) == 0 for g in chunk_reads)
    assert sum(g[1].end - g[1].start for g in chunk_reads) == nb * len(chunks) * 32 * 32 * 4
    assert all(g[0].startswith("tiles/t/image/c/") for g in store.gets)


def test_unsharded_reads_one_object_per_chunk(tmp_path: Path, make_tile_data) -> None:
    data = make_tile_data(seed=23, shape_yx=SHAPE)
    url = tmp_path / "s.zarr"
    make_tile(url, data, chunk_pix=32, shard_pix=None)
    tile, store = counting_tile(url)
    x, y = np.array([33.0, 100.0]), np.array([33.0, 120.0])
    read_stamps(tile, x, y, 20)
    chunks = touched_chunks(x, y, 20, 32, SHAPE)
    assert len(store.gets) == len(BANDS) * len(chunks)
    assert all(g[1] is None for g in store.gets)


def test_read_region_reads_only_touched_chunks(tmp_path: Path, make_tile_data) -> None:
    data = make_tile_data(seed=24, shape_yx=SHAPE)
    url = tmp_path / "s.zarr"
    make_tile(url, data, chunk_pix=32, shard_pix=64)
    tile, store = counting_tile(url)
    region = tile.read_region(50, 80, 60, 100)
    np.testing.assert_array_equal(region, data["image"][:, 50:80, 60:100])
    chunks = {(r, c) for r in (1, 2) for c in (1, 2, 3)}  # 32-px chunks of y 50:80, x 60:100
    shards = {(r // 2, c // 2) for r, c in chunks}  # 4 shards of 2 x 2 chunks
    assert len(store.gets) == len(BANDS) * (len(shards) + len(chunks))


def test_read_stamps_s3(s3_url, make_tile_data) -> None:
    url, storage_options = s3_url
    url = f"{url}/survey.zarr"
    data = {**make_tile_data(seed=25, shape_yx=SHAPE), "weight": None, "mask": None}
    create_survey(url, name="s3", bands=BANDS, storage_options=storage_options).write_tile(
        "t", **data, chunk_pix=32, shard_pix=64
    )
    tile = open_survey(url, storage_options=storage_options).tile("t")
    assert isinstance(reader_mod._engine_for(tile.image), reader_mod._DirectEngine)
    rng = np.random.default_rng(8)
    x, y = positions(rng, 40, n=20)
    stamps, edge = read_stamps(tile, x, y, 40)
    np.testing.assert_array_equal(stamps, reference_stamps(data["image"], x, y, 40, np.nan))
    assert edge.any() and not edge.all()


def test_band_subset_reads_only_those_bands(tmp_path: Path, make_tile_data) -> None:
    data = make_tile_data(seed=24, shape_yx=SHAPE)
    url = tmp_path / "s.zarr"
    make_tile(url, data, chunk_pix=32, shard_pix=64)
    x, y = np.array([40.0, 150.0]), np.array([60.0, 20.0])
    full, _ = read_stamps(open_survey(url).tile("t"), x, y, 24)
    tile, store = counting_tile(url)
    wanted = [BANDS[2], BANDS[0]]
    sub, _ = read_stamps(tile, x, y, 24, bands=wanted)
    np.testing.assert_array_equal(sub, full[:, [2, 0]])
    # Only the two bands' objects were touched (chunk keys start with the band index).
    read_bands = {int(g[0].split("/c/")[1].split("/")[0]) for g in store.gets}
    assert read_bands == {0, 2}
    with pytest.raises(ValueError, match="cannot read"):
        read_stamps(tile, x, y, 24, bands=["u"])


def test_band_subset_through_generic_engine(tmp_path: Path, tile_data: dict) -> None:
    tile = gzip_tile(tmp_path / "s.zarr", tile_data)
    x, y = positions(np.random.default_rng(8), 20)
    full, _ = read_stamps(tile, x, y, 30)
    sub, _ = read_stamps(tile, x, y, 30, bands=[tile.bands[2], tile.bands[1]])
    np.testing.assert_array_equal(sub, full[:, [2, 1]])


def test_band_asked_twice(tmp_path: Path, tile_data: dict) -> None:
    tile = make_tile(tmp_path / "s.zarr", tile_data, chunk_pix=32, shard_pix=64)
    x, y = positions(np.random.default_rng(9), 10)
    full, _ = read_stamps(tile, x, y, 16)
    twice, _ = read_stamps(tile, x, y, 16, bands=[tile.bands[1], tile.bands[1], tile.bands[0]])
    np.testing.assert_array_equal(twice, full[:, [1, 1, 0]])


def _relayout(url: Path, tile_data: dict, **array_kwargs: Any):
    """A tile whose image is rewritten by plain zarr in the layout given (any valid Zarr v3)."""
    make_tile(url, tile_data, chunk_pix=32, shard_pix=64)
    group = zarr.open_group(LocalStore(url), path="tiles/t", mode="r+")
    del group["image"]
    image = tile_data["image"]
    if "codecs" in array_kwargs:  # a codec chain spelled out: zarr's general constructor
        arr = zarr.create(
            shape=image.shape, dtype=image.dtype, fill_value=np.nan, zarr_format=3,
            store=LocalStore(url), path="tiles/t/image", **array_kwargs,
        )  # fmt: skip
        arr[:] = image
    else:
        group.create_array("image", data=image, fill_value=np.nan, **array_kwargs)
    return open_survey(url).tile("t")


_BIG = BytesCodec(endian="big")
_LITTLE = BytesCodec(endian="little")
LAYOUTS = {
    # name: (create_array kwargs, engine the reader must pick)
    "bands-in-one-shard-crc": (dict(chunks=(1, 32, 32), shards=(3, 64, 64)), "direct"),
    "bands-in-one-shard-no-crc": (
        dict(codecs=[ShardingCodec(chunk_shape=(1, 32, 32), index_codecs=[_LITTLE])],
             chunks=(3, 64, 64)),
        "direct",
    ),
    "index-at-start": (
        dict(codecs=[ShardingCodec(chunk_shape=(1, 32, 32), index_location="start")],
             chunks=(1, 64, 64)),
        "direct",
    ),
    "shard-of-two-bands": (dict(chunks=(1, 32, 32), shards=(2, 64, 96)), "direct"),
    "inner-chunk-spans-bands": (dict(chunks=(3, 32, 32), shards=(3, 64, 64)), "zarr"),
    "big-endian-pixels": (
        dict(codecs=[ShardingCodec(chunk_shape=(1, 32, 32), codecs=[_BIG])], chunks=(1, 64, 64)),
        "zarr",
    ),
    "big-endian-index": (
        dict(codecs=[ShardingCodec(chunk_shape=(1, 32, 32), index_codecs=[_BIG, Crc32cCodec()])],
             chunks=(1, 64, 64)),
        "zarr",
    ),
    "transposed": (
        dict(codecs=[TransposeCodec(order=(0, 2, 1)), _LITTLE], chunks=(1, 32, 32)),
        "zarr",
    ),
    "unsharded-multi-band-chunks": (dict(chunks=(3, 32, 32)), "zarr"),
    "blosc-lz4-shuffle-inside-shards": (
        dict(codecs=[ShardingCodec(chunk_shape=(1, 32, 32),
                                   codecs=[_LITTLE, BloscCodec(cname="lz4", shuffle="shuffle")])],
             chunks=(1, 64, 64)),
        "direct",
    ),
    "blosc-unsharded": (dict(chunks=(1, 32, 32), compressors=BloscCodec(cname="zstd")), "direct"),
    "gzip-inside-shards": (
        dict(codecs=[ShardingCodec(chunk_shape=(1, 32, 32), codecs=[_LITTLE, GzipCodec()])],
             chunks=(1, 64, 64)),
        "zarr",
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_every_valid_layout_reads_like_plain_zarr(tmp_path: Path, tile_data: dict, name: str):
    """The fast engine checks the layout it assumes and hands any other one to zarr."""
    kwargs, engine = LAYOUTS[name]
    tile = _relayout(tmp_path / "s.zarr", tile_data, **kwargs)
    chosen = reader_mod._engine_for(tile.image)
    expected_type = reader_mod._DirectEngine if engine == "direct" else reader_mod._ZarrEngine
    assert isinstance(chosen, expected_type), f"{name}: {type(chosen).__name__}"
    plain = np.asarray(tile.image[:])  # zarr's own read of the whole array
    np.testing.assert_array_equal(plain, tile_data["image"])
    rng = np.random.default_rng(8)
    x, y = positions(rng, 40)
    for bands in (None, ["i", "g"]):
        stamps, _ = read_stamps(tile, x, y, 40, bands=bands)
        order = [BANDS.index(b) for b in bands] if bands else list(range(3))
        np.testing.assert_array_equal(stamps, reference_stamps(plain[order], x, y, 40, np.nan))


def test_coalesce_merges_touching_ranges_and_reads_no_other_byte(monkeypatch):
    """Adjacent ranges of one object become one read (up to the size cap); a repeated range
    rides along; ranges of other objects or with gaps between them stay separate."""
    monkeypatch.setattr(reader_mod, "MAX_COALESCED_BYTES", 300)
    ranges = [
        ("a", 100, 200),
        ("a", 0, 100),
        ("b", 100, 200),
        ("a", 200, 300),
        ("a", 0, 100),  # the same chunk twice
        ("a", 300, 400),  # would make the read 400 bytes: a new read
        ("a", 450, 500),  # a gap: a new read
        ("b", 0, 50),  # a gap before b's other range
    ]
    merged = reader_mod._coalesce(ranges)
    assert [(o, s, e) for o, s, e, _ in merged] == [
        ("a", 0, 300),
        ("a", 300, 400),
        ("a", 450, 500),
        ("b", 0, 50),
        ("b", 100, 200),
    ]
    covered = sorted(i for *_, members in merged for i in members)
    assert covered == list(range(len(ranges)))  # every range in exactly one read
    for obj, start, end, members in merged:
        assert all(
            ranges[i][0] == obj and start <= ranges[i][1] < ranges[i][2] <= end for i in members
        )
