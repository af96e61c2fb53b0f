"""FITS ingest (issue 5): DES-style tiles written with astropy -> lenscan store, checked against
astropy's own reading of the files (Cutout2D, world_to_pixel)."""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.nddata import Cutout2D
from astropy.wcs import WCS, FITSFixedWarning

from lenscan.simulate.fits_export import (
    catalog_to_des_columns,
    des_file_name,
    des_tilename,
    write_catalog_file,
    write_des_tile,
)
from lenscan.survey import open_survey, read_stamps
from lenscan.survey.ingest import (
    IngestPreset,
    add_ingest_arguments,
    discover_tiles,
    ingest,
    list_ingest_presets,
    load_ingest_preset,
    place_sources,
    run_ingest_cli,
)

BANDS = ("g", "r", "i")
SHAPE = (160, 224)  # (ny, nx): not square, so a swapped axis shows
STAMP = 24


def _wcs(ra: float, dec: float, shape=SHAPE) -> WCS:
    ny, nx = shape
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra, dec]
    w.wcs.crpix = [(nx + 1) / 2, (ny + 1) / 2]
    w.wcs.cd = [[-0.263 / 3600, 0.0], [0.0, 0.263 / 3600]]
    return w


def _tile_arrays(seed: int, shape=SHAPE):
    rng = np.random.default_rng(seed)
    image = rng.normal(0.0, 3.0, (len(BANDS), *shape)).astype(np.float32)
    image[:, 40:60, 100:130] += 50.0  # a bright block, so stamps are not all noise
    weight = rng.uniform(0.05, 0.2, image.shape).astype(np.float32)
    mask = (rng.random(image.shape) < 0.02).astype(np.int16) * 4
    return image, weight, mask


def _catalog(seed: int, tilename: str, wcs: WCS, n_in: int = 30, n_out: int = 4, shape=SHAPE):
    """lenscan-style rows: n_in inside the tile (some at its edges) and n_out outside."""
    rng = np.random.default_rng(seed + 100)
    ny, nx = shape
    x = np.concatenate([rng.uniform(-0.4, nx - 0.6, n_in), nx + rng.uniform(5, 50, n_out)])
    y = np.concatenate([rng.uniform(-0.4, ny - 0.6, n_in), rng.uniform(0, ny, n_out)])
    x[:2], y[:2] = [0.2, nx - 1.3], [ny - 0.8, 0.1]  # stamps that hang over the edges
    ra, dec = wcs.wcs_pix2world(x, y, 0)
    n = n_in + n_out
    cat = {"id": np.arange(n, dtype=np.int64) + 1000 * (seed + 1), "ra": ra, "dec": dec}
    for b in BANDS:
        cat[f"mag_{b}"] = rng.uniform(18, 25, n).astype(np.float32)
        cat[f"magerr_{b}"] = rng.uniform(0.01, 0.3, n).astype(np.float32)
    cat["mag_g"][3] = np.nan  # not measured -> 99 in DES files
    cat["flags"] = rng.integers(0, 4, n).astype(np.int32)
    cat["extended_class"] = rng.integers(0, 4, n).astype(np.int16)
    return catalog_to_des_columns(cat, bands=BANDS, tilename=tilename)


def _write_source(
    folder: Path, n_tiles: int = 2, *, compress: bool = True, lossless: bool = True
) -> dict:
    """DES-style tiles + one FITS catalogue; returns what was written."""
    tiles = {}
    parts = []
    for k in range(n_tiles):
        wcs = _wcs(40.0 + 0.2 * k, -30.0 + 0.1 * k)
        name = des_tilename(*wcs.wcs.crval)
        image, weight, mask = _tile_arrays(k)
        files = write_des_tile(
            str(folder),
            name,
            bands=BANDS,
            image=image,
            weight=weight,
            mask=mask,
            wcs_header=wcs.to_header(),
            compress=compress,
            lossless=lossless,
        )
        tiles[name] = {"files": files, "wcs": wcs, "image": image, "weight": weight, "mask": mask}
        parts.append(_catalog(k, name, wcs))
    cat = {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}
    cat_path = write_catalog_file(str(folder / "dr2_main.fits"), cat)
    return {"tiles": tiles, "catalog": cat_path, "rows": cat}


def _open_fits(path: str):
    return fits.open(path.removeprefix("file://"))


def _check_against_fits(store_url: str, written: dict, **open_kw) -> None:
    """Stamps equal Cutout2D of the FITS files; positions equal astropy's; outside rows dropped."""
    store = open_survey(store_url, **open_kw)
    assert store.tile_ids == sorted(written["tiles"])
    rows = written["rows"]
    for name, info in written["tiles"].items():
        tile = store.tile(name)
        assert tile.shape_yx == SHAPE
        assert tile.zero_point == 30.0
        cat = tile.catalog()
        mine = rows["TILENAME"] == name
        ra, dec = rows["RA"][mine], rows["DEC"][mine]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            with _open_fits(info["files"]["g"]) as hdul:
                wcs = WCS(hdul["SCI"].header)
        x, y = wcs.world_to_pixel_values(ra, dec)
        inside = (x >= -0.5) & (x < SHAPE[1] - 0.5) & (y >= -0.5) & (y < SHAPE[0] - 0.5)
        assert inside.sum() == 30 and len(cat["id"]) == 30
        np.testing.assert_array_equal(
            np.sort(cat["id"]), np.sort(rows["COADD_OBJECT_ID"][mine][inside])
        )
        order = np.argsort(rows["COADD_OBJECT_ID"][mine][inside])
        by_id = np.argsort(cat["id"])
        np.testing.assert_allclose(cat["x"][by_id], x[inside][order], atol=1e-9)
        np.testing.assert_allclose(cat["y"][by_id], y[inside][order], atol=1e-9)
        np.testing.assert_array_equal(cat["mag_r"][by_id], rows["MAG_AUTO_R"][mine][inside][order])
        assert np.any(cat["mag_g"] == 99.0)  # the DES sentinel survives
        np.testing.assert_array_equal(cat["flags"][by_id], rows["FLAGS_G"][mine][inside][order])

        stamps, edge = read_stamps(tile, cat["x"], cat["y"], STAMP)
        wstamps, _ = read_stamps(tile, cat["x"], cat["y"], STAMP, array="weight")
        mstamps, _ = read_stamps(tile, cat["x"], cat["y"], STAMP, array="mask")
        assert edge.sum() >= 2
        for b, band in enumerate(BANDS):
            with _open_fits(info["files"][band]) as hdul:
                planes = {e: hdul[e].data for e in ("SCI", "WGT", "MSK")}
                for k in range(len(cat["id"])):
                    pos = (cat["x"][k], cat["y"][k])
                    for ext, got in (("SCI", stamps), ("WGT", wstamps)):
                        ref = Cutout2D(
                            planes[ext].astype(np.float32),
                            pos,
                            STAMP,
                            mode="partial",
                            fill_value=np.nan,
                            copy=True,
                        ).data
                        np.testing.assert_array_equal(got[k, b], ref)
                    ref_m = Cutout2D(
                        planes["MSK"].astype(np.int32), pos, STAMP, mode="partial", fill_value=0
                    ).data
                    np.testing.assert_array_equal(mstamps[k, b], ref_m)


# ------------------------------------------------------------------------------- presets


def test_des_preset_is_data():
    assert "des-dr2" in list_ingest_presets()
    p = load_ingest_preset("des-dr2")
    assert p.bands == ("g", "r", "i", "z", "y")
    assert p.shape_yx == (10000, 10000)
    assert p.pixel_scale_arcsec == 0.263 and p.zero_point == 30.0
    assert p.band_column("mag", "y") == "MAG_AUTO_Y"
    assert p.band_column("flags", "g") == "FLAGS_G"
    assert (p.hdu_science, p.hdu_mask, p.hdu_weight) == ("SCI", "MSK", "WGT")


def test_preset_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="unknown ingest preset 'hsc'"):
        load_ingest_preset("hsc")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nbands: [g]\n")
    with pytest.raises(ValueError, match="bad.yaml"):
        load_ingest_preset(str(bad))
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_ingest_preset(str(tmp_path / "nope.yaml"))


def test_des_names():
    assert des_tilename(40.0, -30.0) == "DES0240-3000"
    assert des_tilename(0.25, 2.15) == "DES0001+0209"
    assert des_file_name("DES0240-3000", "y") == "DES0240-3000_r4907p01_Y.fits.fz"
    assert des_file_name("DES0240-3000", "g", compress=False) == "DES0240-3000_r4907p01_g.fits"


def test_des_file_layout(tmp_path):
    written = _write_source(tmp_path, n_tiles=1)
    (info,) = written["tiles"].values()
    with _open_fits(info["files"]["r"]) as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "SCI", "MSK", "WGT"]
        assert isinstance(hdul[1], fits.CompImageHDU)
        assert hdul["SCI"].header["CTYPE1"] == "RA---TAN"
        assert hdul["SCI"].header["MAGZERO"] == 30.0
        # Lossless by default: bit-identical pixels.
        np.testing.assert_array_equal(hdul["SCI"].data, info["image"][1])
        np.testing.assert_array_equal(hdul["MSK"].data, info["mask"][1])


def test_discover_prefers_fz_and_groups_by_tile(tmp_path):
    _write_source(tmp_path, n_tiles=2, compress=True)
    _write_source(tmp_path, n_tiles=1, compress=False)  # same first tile as plain .fits
    (tmp_path / "notes.txt").write_text("not a tile")
    found = discover_tiles(str(tmp_path), load_ingest_preset("des-dr2"))
    assert len(found) == 2
    for files in found.values():
        assert sorted(files) == ["g", "i", "r"]
        assert all(f.endswith(".fits.fz") for f in files.values())


def test_place_sources_drops_outside():
    wcs = _wcs(10.0, 5.0)
    ny, nx = SHAPE
    x = np.array([-0.49, -0.51, nx - 0.51, nx - 0.49, 10.0, 10.0])
    y = np.array([0.0, 0.0, 3.0, 3.0, ny - 0.49, np.nan])
    ra, dec = wcs.wcs_pix2world(x, y, 0)
    out, outside, no_coords = place_sources({"ra": ra, "dec": dec, "id": np.arange(6)}, wcs, SHAPE)
    assert outside == 3  # just outside (2) and past the top edge
    assert no_coords == 1  # a row without RA/Dec is not "outside the tile"
    np.testing.assert_array_equal(out["id"], [0, 2])
    np.testing.assert_allclose(out["x"], [-0.49, nx - 0.51], atol=1e-8)


# ------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("compress", [True, False], ids=["fits.fz", "fits"])
def test_ingest_matches_fits_pixel_for_pixel(tmp_path, compress):
    written = _write_source(tmp_path / "src", compress=compress)
    summary = ingest(
        tmp_path / "src",
        tmp_path / "store.zarr",
        catalog=written["catalog"],
        client="sync",
        expected_shape_yx=SHAPE,
        chunk_pix=32,
        shard_pix=64,
    )
    assert summary.ok, str(summary)
    assert sorted(summary.ingested) == sorted(written["tiles"])
    assert summary.dropped_outside == {t: 4 for t in written["tiles"]}
    assert summary.dropped_no_coords == {}
    assert summary.bytes_read > 0
    _check_against_fits(str(tmp_path / "store.zarr"), written)


def test_rows_without_ra_dec_are_reported_apart_from_rows_outside_the_tile(tmp_path):
    written = _write_source(tmp_path / "src", n_tiles=1)
    rows = {c: v.copy() for c, v in written["rows"].items()}
    rows["RA"][:2] = np.nan  # two rows of the tile lose their position
    rows["DEC"][2] = np.inf
    cat = write_catalog_file(str(tmp_path / "src" / "nan.fits"), rows)
    summary = ingest(tmp_path / "src", tmp_path / "store.zarr", catalog=cat, client="sync",
                     expected_shape_yx=SHAPE, chunk_pix=32, shard_pix=64)  # fmt: skip
    assert summary.ok, str(summary)
    (tile,) = written["tiles"]
    assert summary.dropped_no_coords == {tile: 3}
    assert summary.dropped_outside == {tile: 4}, "NaN rows are not counted outside the tile"
    text = str(summary)
    assert "4 dropped outside their tile" in text
    assert (
        f"3 catalogue rows without a valid RA/Dec (NaN or infinite) were dropped, in tile(s) {tile}"
        in text
    )


def test_ingest_memory_store_parquet_catalogue_threads(tmp_path):
    distributed = pytest.importorskip("distributed")
    written = _write_source(tmp_path, compress=True)
    pq = write_catalog_file(str(tmp_path / "dr2_main.parquet"), written["rows"])
    out = f"memory://ingest-{os.getpid()}-{tmp_path.name}.zarr"
    # memory:// exists in this process only: threads, not worker processes.
    with distributed.Client(
        processes=False, n_workers=1, threads_per_worker=2, dashboard_address=":0"
    ) as client:
        summary = ingest(tmp_path, out, catalog=pq, client=client, expected_shape_yx=None)
    assert summary.ok, str(summary)
    assert len(summary.ingested) == 2
    _check_against_fits(out, written)


def test_ingest_local_cluster_resumable(tmp_path):
    distributed = pytest.importorskip("distributed")
    written = _write_source(tmp_path / "src", n_tiles=3, compress=True)
    out = tmp_path / "store.zarr"
    first = sorted(written["tiles"])[0]
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        one = ingest(
            tmp_path / "src",
            out,
            catalog=written["catalog"],
            client=client,
            tiles=[first],
            expected_shape_yx=SHAPE,
        )
        assert one.ingested == [first] and not one.failed
        rest = ingest(
            tmp_path / "src",
            out,
            catalog=written["catalog"],
            client=client,
            expected_shape_yx=SHAPE,
        )
    assert rest.skipped == [first]
    assert sorted(rest.ingested) == sorted(written["tiles"])[1:]
    assert "1 skipped (already complete)" in str(rest)
    again = ingest(
        tmp_path / "src", out, catalog=written["catalog"], client="sync", expected_shape_yx=SHAPE
    )
    assert again.ingested == [] and sorted(again.skipped) == sorted(written["tiles"])
    assert again.bytes_read == 0
    _check_against_fits(str(out), written)


def test_lossy_des_compression_is_close(tmp_path):
    written = _write_source(tmp_path, n_tiles=1, compress=True, lossless=False)
    summary = ingest(
        tmp_path,
        tmp_path / "s.zarr",
        catalog=written["catalog"],
        client="sync",
        expected_shape_yx=None,
    )
    assert summary.ok
    ((name, info),) = written["tiles"].items()
    got = np.asarray(open_survey(tmp_path / "s.zarr").tile(name).image[:])
    diff = np.abs(got - info["image"])
    assert 0 < diff.max() < 3.0 / 16 * 2  # quantised to ~ noise/16, not bit-exact
    assert np.array_equal(
        np.asarray(open_survey(tmp_path / "s.zarr").tile(name).mask[:]),
        info["mask"].astype(np.int32),
    )


def test_quantised_fits_are_stored_within_half_a_source_step(tmp_path):
    """An fpack-quantised source is stored quantised: the stored step is a power of two no
    larger than the finest fpack step (ZSCALE), and every pixel agrees with astropy's reading
    of the FITS file within half of it; stamps through read_stamps equal Cutout2D's within it."""
    written = _write_source(tmp_path, n_tiles=1, compress=True, lossless=False)
    summary = ingest(tmp_path, tmp_path / "s.zarr", catalog=written["catalog"], client="sync",
                     expected_shape_yx=None)  # fmt: skip
    assert summary.ok
    ((name, info),) = written["tiles"].items()
    tile = open_survey(tmp_path / "s.zarr").tile(name)
    step = tile.attrs["quantise_step"]
    fits_pixels, zscale_min = [], np.inf
    for band in BANDS:
        with fits.open(
            info["files"][band].removeprefix("file://"), disable_image_compression=True
        ) as h:
            zscale_min = min(zscale_min, float(np.min(h["SCI"].data["ZSCALE"])))
        with _open_fits(info["files"][band]) as h:
            fits_pixels.append(h["SCI"].data.astype(np.float32))
    fits_image = np.stack(fits_pixels)
    assert step is not None and step <= zscale_min and np.log2(step) == round(np.log2(step))
    assert zscale_min <= 3.0 / 16 * 1.2  # fpack's step: ~ sigma / 16 of this noise
    stored = np.asarray(tile.image[:])
    assert 0 < np.abs(stored - fits_image).max() <= step / 2
    # Max error in noise units: half a step <= sigma / 32.
    assert np.abs(stored - fits_image).max() / 3.0 <= 1 / 32 * 1.2
    # The fast read path gives the plain read's stamps, which agree with Cutout2D on the FITS.
    x, y = tile.catalog(["x", "y"]).values()
    stamps, _ = read_stamps(tile, x, y, STAMP)
    for k in range(len(x)):
        ref = Cutout2D(fits_image[1], (x[k], y[k]), STAMP, mode="partial", fill_value=np.nan)
        got = stamps[k, 1]
        assert np.array_equal(np.isnan(got), np.isnan(ref.data))
        assert np.nanmax(np.abs(got - ref.data)) <= step / 2
    # Weight and mask planes stay lossless.
    np.testing.assert_array_equal(np.asarray(tile.mask[:]), info["mask"].astype(np.int32))


def test_quantised_source_with_nan_pixels_is_stored_losslessly(tmp_path):
    """NaN cannot be a quantised step: such a tile is ingested again, losslessly."""
    wcs = _wcs(40.0, -30.0)
    name = des_tilename(*wcs.wcs.crval)
    image, weight, mask = _tile_arrays(0)
    image[1, 10:12, 20:25] = np.nan
    files = write_des_tile(str(tmp_path / "src"), name, bands=BANDS, image=image, weight=weight,
                           mask=mask, wcs_header=wcs.to_header(), lossless=False)  # fmt: skip
    cat = write_catalog_file(str(tmp_path / "cat.fits"), _catalog(0, name, wcs))
    summary = ingest(tmp_path / "src", tmp_path / "s.zarr", catalog=cat, client="sync",
                     expected_shape_yx=SHAPE)  # fmt: skip
    assert summary.ok, str(summary)
    tile = open_survey(tmp_path / "s.zarr").tile(name)
    assert tile.attrs["quantise_step"] is None
    with _open_fits(files["r"]) as h:
        np.testing.assert_array_equal(tile.image[1], h["SCI"].data.astype(np.float32))
    assert np.isnan(tile.image[1, 10:12, 20:25]).all()


# ------------------------------------------------------------------------------- bad input


def test_bad_inputs_fail_their_tile_only(tmp_path):
    src = tmp_path / "src"
    written = _write_source(src, n_tiles=7, compress=False)
    names = sorted(written["tiles"])
    good, no_band, bad_wcs, bad_shape, corrupt, bad_cat, neg_weight = names
    tiles = written["tiles"]
    # 1. missing band file
    os.remove(tiles[no_band]["files"]["r"].removeprefix("file://"))
    # 2. the i band on a shifted pixel grid
    w = tiles[bad_wcs]["wcs"].deepcopy()
    w.wcs.crpix = [w.wcs.crpix[0] + 3, w.wcs.crpix[1]]
    info = tiles[bad_wcs]
    write_des_tile(
        str(src),
        bad_wcs,
        bands=["i"],
        image=info["image"][2:],
        wcs_header=w.to_header(),
        weight=info["weight"][2:],
        mask=info["mask"][2:],
        compress=False,
    )
    # 3. one band with another shape
    info = tiles[bad_shape]
    write_des_tile(
        str(src),
        bad_shape,
        bands=["g"],
        image=info["image"][:1, :100],
        mask=None,
        weight=None,
        wcs_header=info["wcs"].to_header(),
        compress=False,
    )
    # 4. a truncated, unreadable file
    path = tiles[corrupt]["files"]["g"].removeprefix("file://")
    Path(path).write_bytes(Path(path).read_bytes()[:2000])
    # 5. negative inverse variance in one band
    info = tiles[neg_weight]
    write_des_tile(
        str(src),
        neg_weight,
        bands=["i"],
        image=info["image"][2:],
        weight=-info["weight"][2:],
        mask=info["mask"][2:],
        wcs_header=info["wcs"].to_header(),
        compress=False,
    )
    # 6. per-tile catalogues; one lacks a needed column
    rows = written["rows"]
    for name in names:
        mine = {c: v[rows["TILENAME"] == name] for c, v in rows.items()}
        if name == bad_cat:
            del mine["MAGERR_AUTO_I"]
        write_catalog_file(str(tmp_path / "cats" / f"{name}_cat.parquet"), mine)

    summary = ingest(
        src,
        tmp_path / "store.zarr",
        catalog=str(tmp_path / "cats" / "{tilename}_cat.parquet"),
        client="sync",
        expected_shape_yx=SHAPE,
    )
    assert summary.ingested == [good]
    assert sorted(summary.failed) == sorted(names[1:])
    msg = summary.failed
    assert "missing band file" in msg[no_band] and f"{no_band}_r4907p01_r.fits" in msg[no_band]
    assert f"{bad_wcs}_r4907p01_i.fits" in msg[bad_wcs] and "WCS" in msg[bad_wcs]
    assert f"{bad_shape}_r4907p01_g.fits" in msg[bad_shape] and "shape" in msg[bad_shape]
    assert f"{corrupt}_r4907p01_g.fits" in msg[corrupt]
    assert f"{bad_cat}_cat.parquet" in msg[bad_cat] and "MAGERR_AUTO_I" in msg[bad_cat]
    assert f"{neg_weight}_r4907p01_i.fits" in msg[neg_weight] and "negative" in msg[neg_weight]
    store = open_survey(tmp_path / "store.zarr")
    assert store.tile_ids == [good]
    assert not any(store.has_tile(t) for t in summary.failed)
    assert "FAILED" in str(summary) and not summary.ok


def test_single_catalogue_without_columns_fails_every_tile(tmp_path):
    written = _write_source(tmp_path, n_tiles=2)
    rows = {c: v for c, v in written["rows"].items() if c != "EXTENDED_CLASS_COADD"}
    cat = write_catalog_file(str(tmp_path / "thin.fits"), rows)
    summary = ingest(
        tmp_path, tmp_path / "s.zarr", catalog=cat, client="sync", expected_shape_yx=None
    )
    assert summary.ingested == [] and len(summary.failed) == 2
    assert all("thin.fits" in m and "EXTENDED_CLASS_COADD" in m for m in summary.failed.values())


def test_wrong_shape_against_preset_and_api_errors(tmp_path):
    written = _write_source(tmp_path, n_tiles=1)
    summary = ingest(tmp_path, tmp_path / "s.zarr", catalog=written["catalog"], client="sync")
    (msg,) = summary.failed.values()
    assert "(10000, 10000)" in msg and "_r4907p01_g.fits.fz" in msg
    with pytest.raises(ValueError, match="needs a catalogue"):
        ingest(tmp_path, tmp_path / "s2.zarr")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ingest(tmp_path / "nowhere", tmp_path / "s3.zarr", catalog=written["catalog"])
    with pytest.raises(ValueError, match="bands"):
        ingest(tmp_path, tmp_path / "s4.zarr", catalog=written["catalog"], bands=["u"])


def test_custom_preset_object(tmp_path):
    written = _write_source(tmp_path, n_tiles=1)
    base = load_ingest_preset("des-dr2")
    preset = IngestPreset(
        **{**base.__dict__, "hdu_mask": None, "hdu_weight": None, "shape_yx": None}
    )
    summary = ingest(
        tmp_path, tmp_path / "s.zarr", catalog=written["catalog"], preset=preset, client="sync"
    )
    assert summary.ok
    tile = open_survey(tmp_path / "s.zarr").tile(summary.ingested[0])
    assert tile.weight is None and tile.mask is None


# ------------------------------------------------------------------------------- CLI


def test_cli_runs_and_resumes(tmp_path, capsys):
    written = _write_source(tmp_path / "src", n_tiles=2)
    parser = add_ingest_arguments(argparse.ArgumentParser(prog="lenscan ingest"))
    argv = [
        str(tmp_path / "src"),
        str(tmp_path / "s.zarr"),
        "--catalog",
        written["catalog"],
        "--sync",
        "--shape",
        f"{SHAPE[0]}x{SHAPE[1]}",
        "--chunk-pix",
        "32",
        "--shard-pix",
        "64",
    ]
    assert run_ingest_cli(parser.parse_args(argv)) == 0
    assert "2 tile(s) ingested" in capsys.readouterr().out
    assert run_ingest_cli(parser.parse_args(argv)) == 0
    assert "2 skipped (already complete)" in capsys.readouterr().out
    bad = parser.parse_args([*argv[:4], "--sync", "--shape", "1x2x3"])
    assert run_ingest_cli(bad) == 2
    assert "--shape" in capsys.readouterr().err


def test_zero_point_mismatch_fails_the_tile(tmp_path):
    written = _write_source(tmp_path, n_tiles=2)
    name = sorted(written["tiles"])[1]
    info = written["tiles"][name]
    write_des_tile(
        str(tmp_path),
        name,
        bands=["r"],
        image=info["image"][1:2],
        weight=info["weight"][1:2],
        mask=info["mask"][1:2],
        wcs_header=info["wcs"].to_header(),
        zero_point=27.0,
    )
    summary = ingest(
        tmp_path,
        tmp_path / "s.zarr",
        catalog=written["catalog"],
        client="sync",
        expected_shape_yx=SHAPE,
    )
    assert list(summary.failed) == [name]
    assert (
        "MAGZERO=27.0" in summary.failed[name]
        and f"{name}_r4907p01_r.fits.fz" in summary.failed[name]
    )
    assert summary.ingested == [sorted(written["tiles"])[0]]
