"""Rubin and HSC ingest (issue 20): afw ExposureF patches and Object / forced catalogues in the
real layouts -> store -> ``lenscan scan``; each file checked against plain astropy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from lenscan.simulate.afw_export import AFW_MASK_PLANES, write_afw_survey
from lenscan.survey import open_survey
from lenscan.survey.formats import get_format, list_formats
from lenscan.survey.ingest import ingest, list_ingest_presets, load_ingest_preset
from lenscan.survey.ingest.catalog import flux_to_mag
from tests.helpers import make_tiny_model

pytestmark = pytest.mark.timeout(600)

SMALL = {"inner_pix": 96, "border_pix": 12, "objects_per_patch": 20}


def _write(tmp_path: Path, release: str, **kw):
    opts = {**SMALL, **kw}
    return write_afw_survey(str(tmp_path / release), release=release, **opts)


def _path(url: str) -> str:
    return url.removeprefix("file://")


def test_presets_and_formats_are_data():
    assert {"lsst-dp1", "lsst-dp02", "hsc-pdr3", "des-dr2"} <= set(list_ingest_presets())
    assert {"afw_exposure", "des_coadd"} <= set(list_formats())
    with pytest.raises(ValueError, match="unknown file format 'euclid'"):
        get_format("euclid")
    dp1, hsc = load_ingest_preset("lsst-dp1"), load_ingest_preset("hsc-pdr3")
    assert dp1.format == hsc.format == "afw_exposure" and dp1.survey == "lsst"
    assert dp1.bands == tuple("ugrizy") and hsc.bands == tuple("grizy")
    assert (dp1.pixel_scale_arcsec, hsc.pixel_scale_arcsec) == (0.2, 0.168)
    assert hsc.tile_id(9813, "4,4") == "9813-4.4" and hsc.survey_tile("9813-4.4") == "9813-4,4"
    assert load_ingest_preset("lsst-dp02").catalog_primary_column == "detect_isPrimary"
    assert dp1.catalog_primary_column is None  # DP1's Object table holds primaries only


@pytest.mark.parametrize("release", ["lsst-dp1", "lsst-dp02", "hsc-pdr3"])
def test_written_files_have_the_afw_layout(tmp_path, release):
    """Plain astropy sees what afw writes: HDU names, EXTTYPE, MP_* bits, the A-WCS, units."""
    exp = _write(tmp_path, release)
    tiles = sorted(exp.files)
    bits_seen = set()
    for tile in tiles:
        for url in exp.files[tile].values():
            with fits.open(_path(url)) as hdul:
                assert hdul[0].data is None and "AR_HDU" in hdul[0].header
                assert [h.name for h in hdul[1:4]] == ["IMAGE", "MASK", "VARIANCE"]
                assert [h.header["EXTTYPE"] for h in hdul[1:4]] == ["IMAGE", "MASK", "VARIANCE"]
                mask_h, img_h = hdul["MASK"].header, hdul["IMAGE"].header
                planes = {k[3:]: v for k, v in mask_h.items() if k.startswith("MP_")}
                assert set(planes) == set(AFW_MASK_PLANES)
                assert planes != {p: i for i, p in enumerate(AFW_MASK_PLANES)}  # not afw's order
                bits_seen.add(tuple(sorted(planes.items())))
                assert img_h["CTYPE1A"] == "LINEAR" and img_h["CTYPE1"] == "RA---TAN"
                assert img_h["LTV1"] == -img_h["CRVAL1A"]
                if release.startswith("lsst"):
                    assert img_h["BUNIT"] == "nJy"
                else:
                    assert hdul[0].header["FLUXMAG0"] == pytest.approx(10**10.8)
    assert len(bits_seen) > 1  # bit numbers differ from file to file
    # Neighbouring patches overlap and agree on the sky: XY0 + local pixel = tract pixel.
    a, b = (exp.files[t]["g"] for t in tiles[:2])
    with fits.open(_path(a)) as ha, fits.open(_path(b)) as hb:
        wa, wb = WCS(ha["IMAGE"].header), WCS(hb["IMAGE"].header)
        xa0, ya0 = ha["IMAGE"].header["CRVAL1A"], ha["IMAGE"].header["CRVAL2A"]
        xb0, yb0 = hb["IMAGE"].header["CRVAL1A"], hb["IMAGE"].header["CRVAL2A"]
        tx, ty = 100.0, 90.0  # a tract pixel inside both patches' outer regions
        assert np.allclose(
            wa.pixel_to_world_values(tx - xa0, ty - ya0),
            wb.pixel_to_world_values(tx - xb0, ty - yb0),
        )


@pytest.mark.parametrize("release", ["lsst-dp02", "hsc-pdr3"])
def test_catalogues_have_the_real_columns(tmp_path, release):
    exp = _write(tmp_path, release, catalog_format="fits")
    cat = Table.read(_path(exp.catalog_path))
    if release == "hsc-pdr3":
        need = ["object_id", "ra", "dec", "tract", "patch", "i_cmodel_mag", "i_cmodel_magerr",
                "i_extendedness_value", "i_cmodel_flag", "isprimary"]  # fmt: skip
        primary = np.asarray(cat["isprimary"])
    else:
        need = ["objectId", "coord_ra", "coord_dec", "tract", "patch", "u_cModelFlux",
                "u_cModelFluxErr", "u_psfFlux", "refExtendedness", "detect_isPrimary"]  # fmt: skip
        primary = np.asarray(cat["detect_isPrimary"])
    assert set(need) <= set(cat.colnames)
    # Overlap duplicates exist as non-primary rows; the primaries are each object once.
    assert (~primary).sum() > 0
    assert primary.sum() == len(exp.objects["id"])


def _ingest(exp, preset, out, **kw):
    return ingest(exp.out_dir, out, preset=preset, catalog=exp.catalog_path, client="sync", **kw)


@pytest.mark.parametrize(
    "release, cat_format", [("lsst-dp1", "parquet"), ("lsst-dp02", "fits"), ("hsc-pdr3", "parquet")]
)
def test_ingest_matches_the_files(tmp_path, release, cat_format):
    exp = _write(tmp_path, release, catalog_format=cat_format)
    out = str(tmp_path / "store.zarr")
    summary = _ingest(exp, release, out)
    assert summary.ok, str(summary)
    store = open_survey(out)
    assert store.survey == release.split("-")[0] and store.info["ingest_preset"] == release
    assert sorted(store.tile_ids) == sorted(exp.files)
    index = store.tile_index()
    preset = load_ingest_preset(release)
    for tile in store.tile_ids:
        assert index[tile]["survey_tile"] == preset.survey_tile(tile)
    if release == "hsc-pdr3":
        assert index["9813-1.1"]["survey_tile"] == "9813-1,1"
    # Overlap duplicates merged once: every object in exactly one tile, in its own patch.
    ids = np.concatenate([store.tile(t).catalog(["id"])["id"] for t in store.tile_ids])
    assert np.array_equal(np.sort(ids), np.sort(exp.objects["id"]))
    where = {i: t for t in store.tile_ids for i in store.tile(t).catalog(["id"])["id"]}
    assert all(where[i] == t for i, t in zip(exp.objects["id"], exp.objects["tile"], strict=True))
    _check_pixels(store, exp)
    fits_bytes = sum(Path(_path(u)).stat().st_size for f in exp.files.values() for u in f.values())
    store_bytes = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file())
    assert store_bytes <= 1.5 * fits_bytes


def _check_pixels(store, exp):
    """Image as in IMAGE, weight = 1/VARIANCE, mask = the blanking planes only, by name."""
    tile_id = sorted(exp.files)[-1]
    tile = store.tile(tile_id)
    b = tile.bands.index("g")
    with fits.open(_path(exp.files[tile_id]["g"])) as hdul:
        image, var = hdul["IMAGE"].data, hdul["VARIANCE"].data
        raw = hdul["MASK"].data.astype(np.int64)
        planes = {k[3:]: v for k, v in hdul["MASK"].header.items() if k.startswith("MP_")}
    assert np.array_equal(tile.image[b], image)
    assert np.allclose(tile.weight[b], 1.0 / var, rtol=1e-6)
    stored = np.asarray(tile.mask[b])
    no_data = (raw >> planes["NO_DATA"]) & 1
    assert np.array_equal(stored & 1, no_data)  # NO_DATA is the preset's first blanking plane
    detected_only = raw == (1 << planes["DETECTED"])
    assert detected_only.any() and not stored[detected_only].any()  # DETECTED never blanks


def test_flux_conversion_and_bad_fluxes(tmp_path):
    """nJy -> AB (31.4 - 2.5 log10 f); zero / negative fluxes give NaN, not a crash."""
    exp = _write(tmp_path, "lsst-dp1")
    table = pq.read_table(_path(exp.catalog_path)).to_pandas()
    bad_ids = table["objectId"].to_numpy()[:3]
    table.loc[:2, "g_cModelFlux"] = [0.0, -12.0, np.nan]
    table.to_parquet(_path(exp.catalog_path))
    out = str(tmp_path / "s.zarr")
    assert _ingest(exp, "lsst-dp1", out).ok
    store = open_survey(out)
    rows = {}
    for t in store.tile_ids:
        cat = store.tile(t).catalog()
        rows.update({int(i): (t, k) for k, i in enumerate(cat["id"])})
    for i in bad_ids:
        t, k = rows[int(i)]
        assert np.isnan(store.tile(t).catalog()["mag_g"][k])
    good = table.iloc[5]
    t, k = rows[int(good["objectId"])]
    mag, _ = flux_to_mag(np.array([good["r_cModelFlux"]]), np.array([good["r_cModelFluxErr"]]))
    assert store.tile(t).catalog()["mag_r"][k] == pytest.approx(mag[0])
    assert mag[0] == pytest.approx(31.4 - 2.5 * np.log10(good["r_cModelFlux"]), abs=1e-4)
    assert store.tile(t).catalog()["extended_class"][k] in (0, 3)


def _lenscan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lenscan.cli", *args], capture_output=True, text=True, timeout=400
    )


def test_scan_uses_the_survey_and_an_explicit_model(tmp_path):
    """`lenscan scan dp1.zarr --out run` asks for the Rubin model by name until it exists; with
    an explicit model of the right bands and pixel scale the scan writes the candidate table."""
    exp = _write(tmp_path, "lsst-dp1")
    store = str(tmp_path / "dp1.zarr")
    run = _lenscan("ingest", exp.out_dir, store, "--preset", "lsst-dp1",
                   "--catalog", exp.catalog_path, "--sync")  # fmt: skip
    assert run.returncode == 0 and "4 tile(s) ingested" in run.stdout, run.stderr
    run = _lenscan("scan", store, "--out", str(tmp_path / "run0"), "--no-progress")
    from lenscan.models import list_bundled_models

    if "lenscan-lsst-v1" not in list_bundled_models():
        assert run.returncode == 2
        err = run.stderr.strip().splitlines()
        assert len(err) == 1 and "'lenscan-lsst-v1'" in err[0] and "--model" in err[0]
        assert "Traceback" not in run.stderr
    else:  # the bundled Rubin model and cut, with no flags
        assert run.returncode == 0, run.stderr
        record = json.loads((tmp_path / "run0" / "run.json").read_text())
        assert record["model_name"] == "lenscan-lsst-v1"
        assert record["colour_cut"]["name"] == "lsst-gri-wide"
    des_model = make_tiny_model(tmp_path / "des")  # 0.263" g, r, i: refused on a Rubin store
    run = _lenscan("scan", store, "--model", des_model, "--cut", "all",
                   "--out", str(tmp_path / "run1"), "--no-progress")  # fmt: skip
    assert run.returncode == 2 and "pixel" in run.stderr
    model = make_tiny_model(tmp_path / "rubin", bands=("g", "r", "i"), pixel_scale=0.2)
    out = tmp_path / "run"
    run = _lenscan(
        "scan", store, "--model", model, "--cut", "all", "--out", str(out), "--workers", "1",
        "--threads-per-worker", "1", "--threshold", "0.0", "--no-progress", "--gallery-size", "0",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    cands = Table.read(out / "candidates.parquet")
    # Every object scored once, none twice (objects closer than the 1" merge radius are one
    # candidate with n_detections 2: the scan's own merge, not an overlap duplicate).
    assert int(np.sum(cands["n_detections"])) == len(exp.objects["id"])
    assert len(set(np.asarray(cands["id"]).tolist())) == len(cands)
    assert set(np.asarray(cands["tile"]).tolist()) == set(exp.files)


def _drop_hdu_name(path: str, name: str) -> None:
    with fits.open(path, mode="update") as hdul:
        hdul[name].header["EXTNAME"] = "PIXELS"


def test_bad_inputs_fail_their_tile_with_the_file_named(tmp_path):
    exp = _write(tmp_path, "lsst-dp02", n_patches=(3, 2))
    tiles = sorted(exp.files)
    no_image, no_mp, bad_wcs, no_band = tiles[:4]
    _drop_hdu_name(_path(exp.files[no_image]["r"]), "IMAGE")
    with fits.open(_path(exp.files[no_mp]["i"]), mode="update") as hdul:
        for key in [k for k in hdul["MASK"].header if k.startswith("MP_")]:
            del hdul["MASK"].header[key]
    for url in exp.files[bad_wcs].values():
        with fits.open(_path(url), mode="update") as hdul:
            for h in hdul[1:4]:
                h.header["CRVAL1"] += 0.5  # half a degree off its tract / patch
    Path(_path(exp.files[no_band]["z"])).unlink()
    summary = _ingest(exp, "lsst-dp02", str(tmp_path / "s.zarr"))
    assert sorted(summary.ingested) == sorted(tiles[4:])
    msg = summary.failed
    assert set(msg) == {no_image, no_mp, bad_wcs, no_band}
    assert Path(_path(exp.files[no_image]["r"])).name in msg[no_image] and "IMAGE" in msg[no_image]
    assert Path(_path(exp.files[no_mp]["i"])).name in msg[no_mp] and "MP_" in msg[no_mp]
    assert "disagrees with the catalogue's tract/patch" in msg[bad_wcs]
    assert "missing band file" in msg[no_band] and "band(s) ['z']" in msg[no_band]
    assert all("\n" not in m for m in msg.values())


def test_catalogue_of_another_survey_is_named(tmp_path):
    rubin = _write(tmp_path, "lsst-dp1", bands=("g", "r", "i"))
    hsc = _write(tmp_path, "hsc-pdr3", bands=("g", "r", "i"))
    summary = ingest(rubin.out_dir, str(tmp_path / "s.zarr"), preset="lsst-dp1",
                     catalog=hsc.catalog_path, client="sync")  # fmt: skip
    assert not summary.ingested and set(summary.failed) == set(rubin.files)
    one = next(iter(summary.failed.values()))
    assert "catalog.parquet" in one and "objectId" in one and "hsc-pdr3" in one


def test_scan_takes_the_model_and_cut_the_store_records(tmp_path):
    """A store ingested with a preset whose `scan:` names a model and cut is scanned with them,
    no --model / --cut given (what `lenscan scan dp1.zarr --out run` does once
    lenscan-lsst-v1 ships)."""
    import yaml

    from lenscan import scan

    model = make_tiny_model(tmp_path / "rubin", bands=("g", "r", "i"), pixel_scale=0.2)
    data = yaml.safe_load(
        (Path(__file__).parents[1] / "lenscan/survey/presets/lsst-dp1.yaml").read_text()
    )
    data.update(name="my-dp1", scan={"model": model, "colour_cut": "all"})
    preset = tmp_path / "my-dp1.yaml"
    preset.write_text(yaml.safe_dump(data))
    exp = _write(tmp_path, "lsst-dp1", bands=("g", "r", "i"))
    store = str(tmp_path / "dp1.zarr")
    assert _ingest(exp, str(preset), store).ok
    assert open_survey(store).info["scan_defaults"] == {"model": model, "colour_cut": "all"}
    out = tmp_path / "run"
    table = scan(store, out=str(out), threshold=0.0, gallery_size=0, progress=False,
                 cluster={"n_workers": 1, "threads_per_worker": 1})  # fmt: skip
    run = __import__("json").loads((out / "run.json").read_text())
    assert run["model_name"] == "tiny" and run["colour_cut"]["name"] == "all"
    assert int(np.sum(table["n_detections"])) == len(exp.objects["id"])


def test_hsc_file_on_another_zero_point_is_rescaled(tmp_path):
    """FLUXMAG0 says ZP 28: pixels (and variance) are put on the preset's 27, factor recorded."""
    exp = _write(tmp_path, "hsc-pdr3", bands=("g", "r", "i"), n_patches=(1, 1))
    tile = next(iter(exp.files))
    url = _path(exp.files[tile]["r"])
    with fits.open(url, mode="update") as hdul:
        hdul[0].header["FLUXMAG0"] = 10 ** (0.4 * 28.0)
        image, var = hdul["IMAGE"].data.copy(), hdul["VARIANCE"].data.copy()
    out = str(tmp_path / "s.zarr")
    assert _ingest(exp, "hsc-pdr3", out).ok
    t = open_survey(out).tile(tile)
    factor = 10 ** (0.4 * (27.0 - 28.0))
    b = t.bands.index("r")
    assert t.zero_point == 27.0
    assert np.allclose(t.image[b], image * factor, rtol=1e-6)
    assert np.allclose(t.weight[b], 1 / (var * factor**2), rtol=1e-5)
    info = t.attrs["extra"]["ingest"]["format"]["r"]
    assert info["zero_point_source"] == "FLUXMAG0" and info["flux_scale"] == pytest.approx(factor)
    assert t.attrs["extra"]["ingest"]["format"]["g"]["flux_scale"] == 1.0
    # The candidate table names the patch as HSC does, beside the store's tile id.
    model = make_tiny_model(tmp_path / "hsc", bands=("g", "r", "i"), pixel_scale=0.168)
    from lenscan import scan

    one = {"n_workers": 1, "threads_per_worker": 1}
    table = scan(out, out=str(tmp_path / "run"), model=model, colour_cut="all", threshold=0.0,
                 gallery_size=0, progress=False, cluster=one)  # fmt: skip
    assert set(table["tile"]) == {tile} and set(table["survey_tile"]) == {"9813-0,0"}
