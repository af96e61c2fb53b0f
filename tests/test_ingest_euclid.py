"""Euclid MER tiles: the real layout read with plain astropy, ingest with the euclid-q1 preset
checked pixel by pixel, each object once, µJy fluxes, the Q1 selection, bad inputs failing their
tile with the file named, reading from an anonymous S3 bucket, and the scan's Euclid defaults."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from lenscan.select import colour_cut_mask, get_colour_cut
from lenscan.simulate.euclid_export import write_mer_survey
from lenscan.survey import open_survey
from lenscan.survey.ingest import ingest
from tests.helpers import make_tiny_model

TILES = ("102018211", "102018212")
CATALOG = "catalogs/MER_FINAL_CATALOG/{tilename}/EUC_MER_FINAL-CAT_TILE{tilename}-*.fits"
NAME = re.compile(
    r"^EUC_MER_(BGSUB-MOSAIC-(VIS|NIR-[YJH])|MOSAIC-(VIS|NIR-[YJH])-(RMS|FLAG))"
    r"_TILE(\d+)-[0-9A-F]{6}_\d{8}T\d{6}\.\dZ_00\.00\.fits$"
)


def _path(url: str) -> str:
    return url.removeprefix("file://")


@pytest.fixture(scope="module")
def mer(tmp_path_factory):
    root = tmp_path_factory.mktemp("mer") / "q1"
    return write_mer_survey(str(root), n_pix=500, n_objects=160, seed=3)


def _ingest(root, out, catalog=CATALOG, **kw):
    kw.setdefault("client", "sync")
    return ingest(root, out, preset="euclid-q1", catalog=f"{root}/{catalog}", **kw)


def test_written_files_have_the_mer_layout(mer):
    for tile, files in mer.files.items():
        assert len(files) == 12  # 4 bands x image, RMS, FLAG
        for key, url in files.items():
            p = Path(_path(url))
            m = NAME.match(p.name)
            assert m and m.group(5) == tile, p.name
            assert p.parent.name == ("VIS" if key.startswith("vis") else "NISP")
            assert p.parent.parent.name == tile and p.parents[2].name == "MER"
            with fits.open(p) as hdul:
                assert len(hdul) == 1 and hdul[0].data.shape == (500, 500)
                h = hdul[0].header
                assert abs(h["CD2_2"] * 3600 - 0.1) < 1e-9 and h["MAGZERO"] == 23.9
        with fits.open(_path(files["vis:rms"])) as hdul:
            rms = hdul[0].data
            assert rms.dtype.kind == "f" and rms.dtype.itemsize == 4
            assert rms[0, 0] == 0 and np.all(rms[-5:, -5:] > 0)
        with fits.open(_path(mer.catalogs[tile])) as hdul:
            assert hdul[1].header["TILEID"] == int(tile)
            names = set(hdul[1].columns.names)
        assert {"OBJECT_ID", "RIGHT_ASCENSION", "DECLINATION", "FLUX_VIS_PSF", "FLUXERR_VIS_PSF",
                "FLUX_Y_TEMPLFIT", "FLUX_J_TEMPLFIT", "FLUX_H_TEMPLFIT", "FLUX_DETECTION_TOTAL",
                "SEGMENTATION_AREA", "VIS_DET", "SPURIOUS_PROB", "POINT_LIKE_PROB",
                "EXTENDED_PROB", "MU_MAX", "MUMAX_MINUS_MAG", "GAIA_ID"} <= names  # fmt: skip


def test_ingest_matches_the_files_and_scores_each_object_once(mer, tmp_path):
    out = str(tmp_path / "euclid.zarr")
    summary = _ingest(mer.root, out)
    assert summary.ok and sorted(summary.ingested) == list(TILES), str(summary)
    store = open_survey(out)
    assert store.bands == ("vis", "y", "j", "h") and store.survey == "euclid"
    seen: list[int] = []
    for tile in TILES:
        t = store.tile(tile)
        files = mer.files[tile]
        assert t.pixel_scale_arcsec == pytest.approx(0.1)
        for b, band in enumerate(store.bands):
            image = fits.getdata(_path(files[f"{band}:image"]))
            rms = fits.getdata(_path(files[f"{band}:rms"]))
            flag = fits.getdata(_path(files[f"{band}:flag"]))
            np.testing.assert_array_equal(t.image[b], image)
            r = rms.astype(np.float32)
            want = np.where(r > 0, 1 / np.where(r > 0, r, 1) ** 2, 0).astype(np.float32)
            np.testing.assert_allclose(t.weight[b], want, rtol=1e-6)
            np.testing.assert_array_equal(t.mask[b], flag)
            assert (flag != 0).any() and (want == 0).any()
        cat = t.catalog()
        assert set(cat["id"].tolist()) == set(mer.truth[tile].tolist())
        seen += cat["id"].tolist()
        raw = Table.read(_path(mer.catalogs[tile]))
        order = np.argsort(raw["OBJECT_ID"])
        got = np.argsort(cat["id"])
        mag = 23.9 - 2.5 * np.log10(np.asarray(raw["FLUX_VIS_PSF"])[order])
        np.testing.assert_allclose(cat["mag_vis"][got], mag, atol=1e-5)
        np.testing.assert_array_equal(
            cat["gaia_match"][got], (np.asarray(raw["GAIA_ID"])[order] > 0).astype(np.int8)
        )
    assert len(seen) == len(set(seen)) == 160
    fits_bytes = sum(os.path.getsize(_path(u)) for f in mer.files.values() for u in f.values())
    store_bytes = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
    assert store_bytes <= 1.5 * fits_bytes, (store_bytes, fits_bytes)


def test_a_merged_lower_case_parquet_catalogue_gives_each_object_to_one_tile(tmp_path):
    exp = write_mer_survey(
        str(tmp_path / "q1"), n_pix=400, n_objects=120, seed=5,
        bands=("vis",), catalog_format="parquet-lower", merged_catalog=True,
    )  # fmt: skip
    out = str(tmp_path / "s.zarr")
    summary = ingest(exp.root, out, preset="euclid-q1", catalog=exp.merged_catalog, client="sync")
    assert summary.ok, str(summary)
    store = open_survey(out)
    ids = {t: store.tile(t).catalog(["id"])["id"].tolist() for t in TILES}
    for t in TILES:
        assert set(ids[t]) == set(exp.truth[t].tolist())
    assert not set(ids[TILES[0]]) & set(ids[TILES[1]])


def test_zero_and_negative_fluxes_become_nan_magnitudes(tmp_path):
    exp = write_mer_survey(str(tmp_path / "q1"), tiles=(TILES[0],), n_pix=300,
                           n_objects=40, bands=("vis", "y"))  # fmt: skip
    path = _path(exp.catalogs[TILES[0]])
    with fits.open(path, mode="update") as hdul:
        hdul[1].data["FLUX_VIS_PSF"][:2] = [0.0, -1.5]
        hdul[1].data["FLUX_Y_TEMPLFIT"][2] = np.nan
        ids = hdul[1].data["OBJECT_ID"][:3].tolist()
    out = str(tmp_path / "s.zarr")
    assert _ingest(exp.root, out).ok
    cat = open_survey(out).tile(TILES[0]).catalog()
    rows = [cat["id"].tolist().index(i) for i in ids]
    assert np.isnan(cat["mag_vis"][rows[:2]]).all() and np.isnan(cat["mag_y"][rows[2]])
    assert np.isfinite(cat["mag_vis"][rows[2]])
    assert not colour_cut_mask(cat, get_colour_cut("euclid-q1"))[rows[:2]].any()


def _copy(exp, tmp_path):
    import shutil

    dst = tmp_path / "q1"
    shutil.copytree(_path(exp.root), dst)
    return str(dst)


def _file(root, tile, pattern):
    return next(Path(root, "MER", tile).rglob(pattern))


@pytest.mark.parametrize("case", ["no rms", "no flag", "rms nan", "other grid", "other tile cat"])
def test_bad_inputs_fail_their_tile_with_the_file_named(mer, tmp_path, case):
    root = _copy(mer, tmp_path)
    bad, good = TILES
    if case == "no rms":
        gone = _file(root, bad, "EUC_MER_MOSAIC-NIR-J-RMS_*")
        gone.unlink()
        named, what = "EUC_MER_MOSAIC-NIR-J-RMS_TILE102018211-*.fits", "missing"
    elif case == "no flag":
        gone = _file(root, bad, "EUC_MER_MOSAIC-VIS-FLAG_*")
        gone.unlink()
        named, what = "EUC_MER_MOSAIC-VIS-FLAG_TILE102018211-*.fits", "missing"
    elif case == "rms nan":
        path = _file(root, bad, "EUC_MER_MOSAIC-NIR-H-RMS_*")
        with fits.open(path, mode="update") as hdul:
            hdul[0].data[:] = np.nan
        named, what = str(path), "no positive finite pixel"
    elif case == "other grid":
        path = _file(root, bad, "EUC_MER_BGSUB-MOSAIC-NIR-Y_*")
        with fits.open(path, mode="update") as hdul:
            hdul[0].header["CRPIX1"] += 3.0
        named, what = str(path), "one pixel grid"
    else:
        path = next(Path(root, "catalogs", "MER_FINAL_CATALOG", bad).glob("*.fits"))
        other = next(Path(root, "catalogs", "MER_FINAL_CATALOG", good).glob("*.fits"))
        path.write_bytes(other.read_bytes())
        named, what = path.name, "another tile"
    out = str(tmp_path / "s.zarr")
    summary = _ingest(root, out)
    assert summary.ingested == [good] and list(summary.failed) == [bad], str(summary)
    msg = summary.failed[bad]
    assert "\n" not in msg and what in msg and named in msg, msg
    assert not open_survey(out).has_tile(bad)
    # Fixing the input and running again adds the tile; the good one is kept, not redone.
    if case in ("no rms", "no flag"):
        return
    again = _ingest(_copy(mer, tmp_path / "fixed"), out)
    assert again.ingested == [bad] and again.skipped == [good]


def _lenscan(*args: str) -> subprocess.CompletedProcess:
    # No AWS credentials in the environment: anon=True must be what reaches the bucket.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return subprocess.run(
        [sys.executable, "-m", "lenscan.cli", *args],
        capture_output=True,
        text=True,
        timeout=400,
        env=env,
    )


def _public_bucket(endpoint: str) -> str:
    import boto3

    client = boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id="testing",
        aws_secret_access_key="testing", region_name="us-east-1",
    )  # fmt: skip
    bucket = "euclid-q1-public"
    client.create_bucket(Bucket=bucket, ACL="public-read")
    policy = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": "*", "Action": ["s3:GetObject",
                       "s3:ListBucket"], "Resource": [f"arn:aws:s3:::{bucket}",
                       f"arn:aws:s3:::{bucket}/*"]}],
    }  # fmt: skip
    client.put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))
    return bucket


def test_ingest_and_scan_from_an_anonymous_bucket(mer, s3_server, tmp_path):
    """`lenscan ingest s3://... --source-storage-options '{"anon": true, ...}'` reads the Q1
    layout from a public bucket with no credentials; with an explicit VIS + NISP model at
    0.1"/px the scan scores every selected object once, reading the store from the public
    bucket anonymously."""
    import fsspec

    endpoint, opts = s3_server
    bucket = _public_bucket(endpoint)
    writer = fsspec.filesystem("s3", **opts)
    writer.put(_path(mer.root), f"{bucket}/q1", recursive=True)
    anon = {"anon": True, "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    assert fsspec.filesystem("s3", **anon).ls(f"{bucket}/q1/MER")  # readable without a key
    store = str(tmp_path / "euclid.zarr")
    src = f"s3://{bucket}/q1"
    run = _lenscan("ingest", src, store, "--preset", "euclid-q1", "--catalog", f"{src}/{CATALOG}",
                   "--sync", "--source-storage-options", json.dumps(anon))  # fmt: skip
    assert run.returncode == 0 and "2 tile(s) ingested" in run.stdout, run.stdout + run.stderr
    files = open_survey(store).tile(TILES[0]).attrs["extra"]["ingest"]["files"]
    assert files["vis:rms"].startswith(
        f"s3://{bucket}/q1/MER/{TILES[0]}/VIS/EUC_MER_MOSAIC-VIS-RMS"
    )
    model = make_tiny_model(tmp_path / "euclid", bands=("vis", "y", "j", "h"), pixel_scale=0.1)
    # The store itself in the public bucket, scanned anonymously (storage_options anon: true).
    writer.put(store, f"{bucket}/euclid.zarr", recursive=True)
    config = tmp_path / "scan.yaml"
    scan_cfg = {"survey_url": f"s3://{bucket}/euclid.zarr", "storage_options": anon}
    config.write_text(json.dumps({"scan": scan_cfg}))  # JSON is YAML
    out = tmp_path / "run"
    run = _lenscan(
        "scan", "--config", str(config), "--model", model, "--cut", "euclid-q1", "--out",
        str(out), "--workers", "1", "--threads-per-worker", "1", "--threshold", "0.0",
        "--no-progress", "--gallery-size", "0",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    cands = Table.read(out / "candidates.parquet")
    s = open_survey(store)
    cut = get_colour_cut("euclid-q1")
    want = {
        i
        for t in TILES
        for i in s.tile(t).catalog()["id"][colour_cut_mask(s.tile(t).catalog(), cut)].tolist()
    }
    assert 0 < len(want) < 160
    assert set(np.asarray(cands["id"]).tolist()) <= want
    assert int(np.sum(cands["n_detections"])) == len(want)


def test_a_euclid_store_is_scanned_with_the_bundled_euclid_model_and_q1_selection(mer, tmp_path):
    """`lenscan scan euclid.zarr --out run`, no --model or --cut: the store's survey picks
    lenscan-euclid-v1 (VIS + NISP Y/J/H, 0.1"/px, 80 px stamps) and the euclid-q1 selection,
    and every selected object of the real-layout tiles gets one score in [0, 1]."""
    from lenscan.models import list_bundled_models, read_model_meta
    from lenscan.sweep import read_scored

    assert "lenscan-euclid-v1" in list_bundled_models()
    store = str(tmp_path / "euclid.zarr")
    assert _ingest(mer.root, store).ok
    out = tmp_path / "run"
    run = _lenscan("scan", store, "--out", str(out), "--workers", "1", "--threads-per-worker",
                   "1", "--no-progress", "--gallery-size", "0")  # fmt: skip
    assert run.returncode == 0, run.stderr
    record = json.loads((out / "run.json").read_text())
    assert record["model_name"] == "lenscan-euclid-v1"
    assert record["colour_cut"]["name"] == "euclid-q1"
    meta = read_model_meta("lenscan-euclid-v1")
    assert meta.bands == ("vis", "y", "j", "h") and meta.stamp_size_pix == 80
    s = open_survey(store)
    cut = get_colour_cut("euclid-q1")
    want = {
        i
        for t in TILES
        for i in s.tile(t).catalog()["id"][colour_cut_mask(s.tile(t).catalog(), cut)].tolist()
    }
    scored = read_scored(str(out))
    ids = np.asarray(scored["id"]).tolist()
    assert len(want) > 0 and set(ids) == want and len(ids) == len(want)
    scores = np.asarray(scored["score"], dtype=float)
    assert np.all(np.isfinite(scores)) and np.all((scores >= 0) & (scores <= 1))


def test_catalogues_found_by_pattern_go_to_the_tile_their_tileid_names(mer, tmp_path):
    """`--catalog 'q1/catalogs/MER_FINAL_CATALOG/*/EUC_MER_FINAL-CAT*.fits'` (and one tile's
    file alone): each file's rows go to the tile its TILEID names, all of them (MER assigned
    them), and a tile without a file gets none."""
    pattern = f"{mer.root}/catalogs/MER_FINAL_CATALOG/*/EUC_MER_FINAL-CAT*.fits"
    out = str(tmp_path / "all.zarr")
    summary = ingest(mer.root, out, preset="euclid-q1", catalog=pattern, client="sync")
    assert summary.ok, str(summary)
    store = open_survey(out)
    for t in TILES:
        assert set(store.tile(t).catalog(["id"])["id"].tolist()) == set(mer.truth[t].tolist())
    one = str(tmp_path / "one.zarr")
    summary = ingest(mer.root, one, preset="euclid-q1", catalog=_path(mer.catalogs[TILES[1]]),
                     client="sync")  # fmt: skip
    assert summary.ok and summary.n_sources == {TILES[0]: 0, TILES[1]: len(mer.truth[TILES[1]])}
