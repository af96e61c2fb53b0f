"""The scan end to end on a real LocalCluster (worker processes) over a synthetic survey.

The model here is a small, randomly initialised checkpoint: these tests check the machinery
(cut, stamps, scoring once, reduction, resume, errors), not the science; the bundled model's
recall is measured in tests/test_bundled_model.py and by ``make demo``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from astropy.nddata import Cutout2D
from astropy.table import Table
from distributed import Client, LocalCluster

from lenscan.config import ScanConfig
from lenscan.select import DEFAULT_COLOUR_CUT, colour_cut_mask, get_colour_cut
from lenscan.simulate import make_survey
from lenscan.survey import open_survey
from lenscan.sweep import ScanError, read_scored, scan
from lenscan.sweep.reduce import merge_groups, rank_candidates
from lenscan.table import read_parquet_table
from tests.helpers import TINY_STAMP_PIX, make_tiny_model

STAMP = TINY_STAMP_PIX
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def survey_url(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("survey") / "survey.zarr")
    make_survey(url, n_tiles=3, seed=11, tile_size_pix=512, lenses_per_tile=8)
    return url


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def first_scan(survey_url, model_path, cluster_client, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("out") / "run")
    table = scan(
        survey_url, out=out, model=model_path, threshold=0.0, client=cluster_client, progress=False
    )
    return out, table


def test_scores_exactly_the_cut_selection(survey_url, first_scan):
    out, table = first_scan
    scored = read_scored(out)
    survey = open_survey(survey_url)
    expected = set()
    for tile_id in survey.tile_ids:
        cat = survey.tile(tile_id).catalog()
        mask = colour_cut_mask(cat, get_colour_cut(DEFAULT_COLOUR_CUT))
        expected |= {(tile_id, int(i)) for i in cat["id"][mask]}
    got = [(str(t), int(i)) for t, i in zip(scored["tile"], scored["id"], strict=True)]
    assert len(got) == len(set(got)), "a source was scored twice"
    assert set(got) == expected, "scored rows differ from the colour-cut selection"
    assert table.meta["summary"]["selected"] == len(expected)
    assert np.all((scored["score"] >= 0) & (scored["score"] <= 1))
    np.testing.assert_allclose(
        scored["score"], (scored["score_m0"] + scored["score_m1"]) / 2, rtol=1e-6
    )


def test_injected_lenses_in_the_cut_are_scored_once_and_centred(survey_url, first_scan):
    out, _ = first_scan
    scored = read_scored(out)
    truth = read_parquet_table(f"{survey_url}/truth.parquet")
    survey = open_survey(survey_url)
    n_checked = 0
    for row in truth:
        tile = survey.tile(str(row["tile"]))
        cat = tile.catalog()
        k = np.flatnonzero(cat["id"] == row["id"])
        assert k.size == 1, f"injected lens {row['id']} missing from its tile catalogue"
        passes = colour_cut_mask(
            {c: v[k] for c, v in cat.items()}, get_colour_cut(DEFAULT_COLOUR_CUT)
        )[0]
        hits = np.flatnonzero((scored["id"] == row["id"]) & (scored["tile"] == row["tile"]))
        assert hits.size == (1 if passes else 0)
        if not passes:
            continue
        n_checked += 1
        hit = scored[hits[0]]
        # The stamp centre is the WCS position of the catalogue source = the injected lens.
        x, y = tile.wcs.world_to_pixel_values(hit["ra"], hit["dec"])
        assert abs(hit["x"] - x) < 1e-6 and abs(hit["y"] - y) < 1e-6
        assert abs(hit["x"] - row["x"]) < 0.05 and abs(hit["y"] - row["y"]) < 0.05
        # The lens galaxy's light is concentrated at the stamp centre: the central 3 x 3 pixels
        # outshine a ring 6-8 pixels out (a stamp shifted by a few pixels fails this), where
        # the arcs are fainter than the lens galaxy (the default cut also keeps arc-dominated
        # blends, issue 11).
        if row["lensed_source_mag_i"] < row["lens_mag_i"] + 1.0:
            continue
        stamp = Cutout2D(
            tile.read_region(0, tile.shape_yx[0], 0, tile.shape_yx[1])[tile.bands.index("i")],
            (hit["x"], hit["y"]),
            STAMP,
            mode="partial",
            fill_value=np.nan,
        ).data
        c = STAMP // 2
        yy, xx = np.mgrid[:STAMP, :STAMP]
        r = np.hypot(yy - c, xx - c)
        assert np.nanmean(stamp[c - 1 : c + 2, c - 1 : c + 2]) > np.nanmean(
            stamp[(r > 6) & (r < 8)]
        )
    assert n_checked >= 3, "the synthetic survey should put several lenses in the cut"


def test_outputs_round_trip_and_provenance(first_scan, model_path):
    out, table = first_scan
    from_parquet = read_parquet_table(f"{out}/candidates.parquet")
    from_fits = Table.read(f"{out}/candidates.fits")
    assert len(from_parquet) == len(from_fits) == len(table) > 0
    assert from_parquet["id"].tolist() == from_fits["id"].tolist() == table["id"].tolist()
    np.testing.assert_array_equal(from_fits["score"], table["score"])
    assert list(table["rank"]) == list(range(1, len(table) + 1))
    assert np.all(np.diff(np.asarray(table["score"])) <= 0)
    run = json.loads(Path(out, "run.json").read_text())
    assert run["status"] == "complete"
    assert run["model_sha256"] == table.meta["model_sha256"]
    assert run["colour_cut"]["name"] == "des-jacobs19-wide"  # the default cut
    assert run["summary"]["tiles"] == 3
    gallery = Path(out, "gallery")
    assert (gallery / "index.html").exists()
    assert len(list(gallery.glob("img/c*.png"))) == min(len(table), 48)


def _threshold_splitting_a_merged_source(scored) -> float:
    """A threshold between the scores of one source seen in two overlapping tiles."""
    group, size = merge_groups(np.asarray(scored["ra"]), np.asarray(scored["dec"]), 1.0)
    score = np.asarray(scored["score"], float)
    splits = [
        (score[group == g].min() + score[group == g].max()) / 2
        for g in np.unique(group[size > 1])
        if np.ptp(score[group == g]) > 0
    ]
    assert splits, "the survey must hold a source detected twice with different scores"
    return float(min(splits, key=lambda t: abs(t - np.median(score))))


def _assert_table_is_the_reduce_of_all_scored_rows(out: str, table, threshold: float) -> None:
    expected = rank_candidates(read_scored(out), threshold=threshold)
    assert len(table) == len(expected)
    for col in ("rank", "tile", "id", "edge", "n_detections"):
        assert table[col].tolist() == expected[col].tolist(), col
    np.testing.assert_array_equal(table["score"], expected["score"])


def test_sweep_at_a_threshold_equals_the_reduce_of_every_scored_row(
    survey_url, model_path, first_scan, cluster_client, tmp_path
):
    # The ledger keeps only rows above the floor plus overlap-zone keys; with the threshold
    # between two detections of one source, a ledger that dropped the keys below the floor
    # would lose the second detection (n_detections 1 instead of 2).
    threshold = _threshold_splitting_a_merged_source(read_scored(first_scan[0]))
    out = str(tmp_path / "run")
    run = dict(out=out, model=model_path, client=cluster_client, progress=False)
    table = scan(survey_url, threshold=threshold, **run)
    _assert_table_is_the_reduce_of_all_scored_rows(out, table, threshold)
    assert max(table["n_detections"]) >= 2
    lower = float(np.quantile(np.asarray(read_scored(out)["score"]), 0.1))
    again = scan(survey_url, threshold=lower, **run)  # resumed: every tile re-read, none scored
    assert again.meta["summary"]["tiles_skipped"] == 3
    _assert_table_is_the_reduce_of_all_scored_rows(out, again, lower)
    assert len(again) > len(table)


def test_one_and_two_workers_give_identical_tables(survey_url, model_path, first_scan, tmp_path):
    out2, _ = first_scan
    out1 = str(tmp_path / "one")
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None
        ) as c,
        Client(c) as cl,
    ):
        scan(survey_url, out=out1, model=model_path, threshold=0.0, client=cl, progress=False)
    a = read_scored(out1)
    b = read_scored(out2)
    a.sort(["tile", "id"])
    b.sort(["tile", "id"])
    assert a.colnames == b.colnames
    for col in a.colnames:
        if a[col].dtype.kind == "f":
            np.testing.assert_array_equal(a[col], b[col], err_msg=col)
        else:
            assert a[col].tolist() == b[col].tolist(), col


def test_resume_skips_done_tiles_and_refuses_another_model(
    survey_url, model_path, cluster_client, tmp_path
):
    out = tmp_path / "resume"
    run = dict(out=str(out), model=model_path, threshold=0.0, client=cluster_client, progress=False)
    full = scan(survey_url, **run)
    parts = sorted((out / "scored").glob("tile-*.parquet"))
    assert len(parts) == 3
    parts[0].unlink()
    again = scan(survey_url, **run)
    assert again.meta["summary"]["tiles_skipped"] == 2
    assert again.meta["summary"]["tiles_scanned"] == 1
    assert again["id"].tolist() == full["id"].tolist()
    other = make_tiny_model(tmp_path / "other", seed=1, name="other")
    with pytest.raises(ValueError, match="different model_sha256"):
        scan(survey_url, out=str(out), model=other, client=cluster_client, progress=False)


def test_incompatible_model_is_refused_before_work(survey_url, cluster_client, tmp_path):
    zband = make_tiny_model(tmp_path / "z", bands=("g", "r", "q"))
    with pytest.raises(ValueError, match="missing"):
        scan(
            survey_url, out=str(tmp_path / "o1"), model=zband, client=cluster_client, progress=False
        )
    hsc = make_tiny_model(tmp_path / "hsc", pixel_scale=0.168)
    with pytest.raises(ValueError, match="arcsec/pixel"):
        scan(survey_url, out=str(tmp_path / "o2"), model=hsc, client=cluster_client, progress=False)
    assert not (tmp_path / "o1" / "scored").exists() and not (tmp_path / "o2").exists()


def test_a_broken_tile_is_named_and_the_others_are_kept(
    survey_url, model_path, cluster_client, tmp_path
):
    broken = tmp_path / "broken.zarr"
    shutil.copytree(survey_url, broken)
    victim = open_survey(str(broken)).tile_ids[1]
    shutil.rmtree(broken / "tiles" / victim / "catalog" / "mag_g")
    out = tmp_path / "out"
    with pytest.raises(ScanError, match=victim):
        scan(
            str(broken),
            out=str(out),
            model=model_path,
            threshold=0.0,
            client=cluster_client,
            progress=False,
        )
    assert len(list((out / "scored").glob("tile-*.parquet"))) == 2
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "failures" and victim in run["failed_tiles"]
    assert (out / "candidates.parquet").exists()
    failures = read_parquet_table(str(out / "failures.parquet"))
    assert failures["tile"].tolist() == [victim] and failures["stage"].tolist() == ["catalog"]
    assert "mag_g" in failures["message"][0]


def test_scan_config_object_and_s3(survey_url, model_path, cluster_client, s3_url):
    """Survey and output on a real S3 API (moto on loopback), read by the worker processes."""
    import fsspec

    prefix, options = s3_url
    fs = fsspec.filesystem("s3", **options)
    fs.put(survey_url, f"{prefix}/survey.zarr", recursive=True)
    config = ScanConfig(
        survey_url=f"{prefix}/survey.zarr",
        out=f"{prefix}/run",
        model=model_path,
        threshold=0.0,
        storage_options=options,
        out_storage_options=options,
        gallery_size=4,
    )
    table = scan(config=config, client=cluster_client, progress=False)
    assert table.meta["summary"]["tiles_scanned"] == 3
    assert fs.exists(f"{prefix}/run/candidates.fits")
    assert fs.exists(f"{prefix}/run/gallery/index.html")
    back = read_parquet_table(f"{prefix}/run/candidates.parquet", storage_options=options)
    assert back["id"].tolist() == table["id"].tolist()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")
@pytest.mark.parametrize(
    ("precision", "compile_model", "atol"), [("fp32", False, 1e-4), ("bf16", True, 2e-2)]
)
def test_gpu_scan_matches_cpu(
    survey_url, model_path, first_scan, tmp_path, precision, compile_model, atol
):
    """Scoring on the GPU (dask-cuda worker when installed) agrees with the CPU scan: in fp32
    to float rounding, under bf16 autocast + torch.compile within bf16 rounding (the GPU
    worker's reader threads, pinned staging buffers and non-blocking copies in both)."""
    import importlib.util

    from lenscan.config import ClusterSpec

    has_dask_cuda = importlib.util.find_spec("dask_cuda") is not None
    config = ScanConfig(
        survey_url=survey_url,
        out=str(tmp_path / "gpu"),
        model=model_path,
        threshold=0.0,
        device="cuda",
        precision=precision,
        compile_model=compile_model,
        cluster=ClusterSpec(n_workers=1, gpu=has_dask_cuda),
    )
    scan(config=config, progress=False)
    cpu, gpu = read_scored(first_scan[0]), read_scored(str(tmp_path / "gpu"))
    cpu.sort(["tile", "id"])
    gpu.sort(["tile", "id"])
    assert cpu["id"].tolist() == gpu["id"].tolist()
    np.testing.assert_allclose(gpu["score"], cpu["score"], atol=atol)
