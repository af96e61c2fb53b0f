"""Sweeps that lose nothing: resume on S3 after a killed client, unique task keys, the survey's
identity, failures recorded as data, orphans cleaned, workers killed mid-sweep.

Every test runs real Dask worker processes; the S3 tests a real S3 API (moto on loopback).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest
from distributed import Client, LocalCluster

from lenscan.config import ScanConfig
from lenscan.select import DEFAULT_COLOUR_CUT, colour_cut_mask, get_colour_cut
from lenscan.simulate import make_survey
from lenscan.survey import open_survey
from lenscan.sweep import ScanError, read_scored, scan
from lenscan.sweep.plan import plan_scan
from lenscan.table import read_parquet_table
from tests.helpers import make_tiny_model

pytestmark = pytest.mark.timeout(420)
N_TILES = 8


@pytest.fixture(scope="module")
def survey_url(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("sweep") / "survey.zarr")
    make_survey(url, n_tiles=N_TILES, seed=23, tile_size_pix=384, lenses_per_tile=6)
    return url


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


def _ids_scores(table) -> list[tuple[str, int, float]]:
    return sorted(
        (str(t), int(i), round(float(s), 6))
        for t, i, s in zip(table["tile"], table["id"], table["score"], strict=True)
    )


@pytest.fixture(scope="module")
def clean_run(survey_url, model_path, cluster_client, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("clean") / "run")
    table = scan(survey_url, out=out, model=model_path, threshold=0.3, client=cluster_client,
                 progress=False)  # fmt: skip
    assert len(table) > 10
    return out, table


# ------------------------------------------------------------------ defect 1: resume on S3


def _wait_for_parts(fs, prefix: str, at_least: int, proc: subprocess.Popen, timeout: float):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        assert proc.poll() is None, "the scan ended before it could be killed"
        fs.invalidate_cache()
        if len(fs.glob(f"{prefix}/run/scored/tile-*.parquet")) >= at_least:
            return
        time.sleep(0.05)
    raise AssertionError("no parts appeared in time")


def test_s3_resume_after_killed_client_matches_a_clean_run(
    survey_url, model_path, clean_run, s3_server, monkeypatch, tmp_path
):
    """Survey and output on S3, endpoint from the environment; the client is SIGKILLed
    mid-scan; the same command again must give the clean run's candidate table."""
    endpoint, options = s3_server
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)  # as a user points boto at a store
    fs = fsspec.filesystem("s3", **options)
    prefix = f"lenscan-test/resume-{os.getpid()}-{time.monotonic_ns()}"
    fs.put(survey_url, f"{prefix}/survey.zarr", recursive=True)
    # One single-threaded worker, and a ledger commit after every tile.
    config = tmp_path / "scan.yaml"
    config.write_text(
        f"survey_url: s3://{prefix}/survey.zarr\nout: s3://{prefix}/run\nmodel: {model_path}\n"
        "threshold: 0.3\ncommit_interval_seconds: 0\n"
        "cluster: {n_workers: 1, threads_per_worker: 1}\n"
    )
    command = [sys.executable, "-m", "lenscan.cli", "scan", "--config", str(config),
               "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        _wait_for_parts(fs, prefix, 3, proc, timeout=180)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the client and its local cluster, at once
        proc.wait()
    fs.invalidate_cache()
    killed_parts = len(fs.glob(f"{prefix}/run/scored/tile-*.parquet"))
    assert 3 <= killed_parts < N_TILES, "the kill must land mid-scan"
    assert json.loads(fs.cat_file(f"{prefix}/run/run.json"))["status"] == "running"
    assert not fs.exists(f"{prefix}/run/candidates.parquet")

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as c, Client(c) as client:  # fmt: skip
        table = scan(f"s3://{prefix}/survey.zarr", out=f"s3://{prefix}/run", model=model_path,
                     threshold=0.3, client=client, progress=False)  # fmt: skip
    summary = table.meta["summary"]
    assert summary["tiles_skipped"] >= 1, "tiles committed before the kill are not rescored"
    assert summary["tiles_skipped"] + summary["tiles_scanned"] == N_TILES
    assert _ids_scores(table) == _ids_scores(clean_run[1])
    assert summary["scored_total"] == clean_run[1].meta["summary"]["scored_total"]


# ------------------------------------------------------------------ defect 3: task keys


def test_two_scans_on_one_scheduler_in_the_same_second_do_not_share_tasks(
    survey_url, model_path, cluster_client, clean_run, tmp_path
):
    outs = [str(tmp_path / "a"), str(tmp_path / "b")]
    tables: dict[str, object] = {}

    def run(out: str) -> None:
        tables[out] = scan(survey_url, out=out, model=model_path, threshold=0.3,
                           client=cluster_client, progress=False, gallery_size=0)  # fmt: skip

    threads = [threading.Thread(target=run, args=(o,)) for o in outs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for out in outs:
        assert len(list(Path(out, "scored").glob("tile-*.parquet"))) == N_TILES
        assert _ids_scores(tables[out]) == _ids_scores(clean_run[1])
    tokens = {json.loads(Path(o, "run.json").read_text())["run_token"] for o in outs}
    assert len(tokens) == 2


# ------------------------------------------------------------------ defect 4: identity


def test_a_survey_rewritten_at_the_same_url_is_not_resumed(model_path, cluster_client, tmp_path):
    url = str(tmp_path / "s.zarr")
    make_survey(url, n_tiles=2, seed=1, tile_size_pix=256, lenses_per_tile=2)
    out = str(tmp_path / "out")
    scan(url, out=out, model=model_path, threshold=0.3, client=cluster_client, progress=False,
         gallery_size=0)  # fmt: skip
    shutil.rmtree(url)
    make_survey(url, n_tiles=2, seed=2, tile_size_pix=256, lenses_per_tile=2)
    with pytest.raises(ValueError, match="survey_uuid"):
        scan(url, out=out, model=model_path, threshold=0.3, client=cluster_client,
             progress=False)  # fmt: skip


def test_a_rewritten_tile_is_rescored_and_tiles_reduces_only_those(
    survey_url, model_path, cluster_client, clean_run, tmp_path
):
    url = str(tmp_path / "copy.zarr")
    shutil.copytree(survey_url, url)
    out = str(tmp_path / "out")
    shutil.copytree(clean_run[0], out)
    run = json.loads(Path(out, "run.json").read_text())
    survey = open_survey(url)
    assert survey.uuid == run["survey_uuid"]
    victim = survey.tile_ids[2]
    _rewrite_tile(url, victim)
    table = scan(url, out=out, model=model_path, threshold=0.3, client=cluster_client,
                 progress=False, gallery_size=0)  # fmt: skip
    assert table.meta["summary"]["tiles_scanned"] == 1
    assert table.meta["summary"]["tiles_skipped"] == N_TILES - 1
    assert _ids_scores(table) == _ids_scores(clean_run[1])  # same pixels, same scores
    only = scan(url, out=out, model=model_path, threshold=0.3, client=cluster_client,
                progress=False, gallery_size=0, tiles=[victim])  # fmt: skip
    assert set(only["tile"]) == {victim}
    assert only.meta["summary"]["tiles"] == 1 and only.meta["summary"]["tiles_skipped"] == 1
    # Rewritten again, now unreadable: its old rows must not reach the candidate table.
    _rewrite_tile(url, victim)
    for shard in Path(url, "tiles", victim, "image", "c").rglob("*"):
        if shard.is_file():
            shard.write_bytes(b"\x00" * 9)
    with pytest.raises(ScanError, match=victim) as err:
        scan(url, out=out, model=model_path, threshold=0.3, client=cluster_client,
             progress=False, gallery_size=0)  # fmt: skip
    assert len(err.value.candidates) > 0 and victim not in set(err.value.candidates["tile"])


def _rewrite_tile(url: str, tile_id: str, **changes) -> None:
    """Write a tile again with the same content except ``changes`` (a new write id)."""
    survey = open_survey(url, mode="a")
    tile = survey.tile(tile_id)
    ny, nx = tile.shape_yx
    data = {
        "image": tile.read_region(0, ny, 0, nx),
        "catalog": tile.catalog(),
        "wcs_header": tile.attrs["wcs_header"],
        "pixel_scale_arcsec": tile.pixel_scale_arcsec,
        "zero_point": tile.zero_point,
    }
    for plane in ("weight", "mask"):
        if tile._array(plane) is not None:
            data[plane] = tile.read_region(0, ny, 0, nx, array=plane)
    data.update(changes)
    survey.write_tile(tile_id, **data)


# ------------------------------------------------------------------ failures are data


def _selected_ids(tile) -> np.ndarray:
    cat = tile.catalog()
    return cat["id"][colour_cut_mask(cat, get_colour_cut(DEFAULT_COLOUR_CUT))]


def _edit_tile_attrs(url: str, tile_id: str, edit) -> None:
    path = Path(url, "tiles", tile_id, "zarr.json")
    meta = json.loads(path.read_text())
    edit(meta["attributes"]["lenscan_tile"])
    path.write_text(json.dumps(meta))


def test_failures_are_recorded_and_the_rest_of_the_sweep_finishes(
    survey_url, model_path, cluster_client, clean_run, tmp_path
):
    url = str(tmp_path / "broken.zarr")
    shutil.copytree(survey_url, url)
    survey = open_survey(url)
    t = survey.tile_ids
    # t[0]: one selected source at the antipode of the tile's sky: no finite pixel position.
    cat = survey.tile(t[0]).catalog()
    k = int(np.flatnonzero(np.isin(cat["id"], _selected_ids(survey.tile(t[0]))))[0])
    cat["ra"][k] = (cat["ra"][k] + 180.0) % 360.0
    cat["dec"][k] = -cat["dec"][k]
    _rewrite_tile(url, t[0], catalog=cat)
    # t[1]: every image chunk corrupted on disk.
    for shard in Path(url, "tiles", t[1], "image", "c").rglob("*"):
        if shard.is_file():
            shard.write_bytes(b"\x00garbage" * 7)
    # t[2]: no WCS; t[3]: a band missing; t[4]: all pixels NaN; t[5]: an empty catalogue.
    _edit_tile_attrs(url, t[2], lambda m: m.update(wcs_header=""))
    _edit_tile_attrs(url, t[3], lambda m: m.update(bands=["g", "r", "z"]))
    tile4 = survey.tile(t[4])
    _rewrite_tile(url, t[4], image=np.full((3, *tile4.shape_yx), np.nan, np.float32))
    _rewrite_tile(url, t[5], catalog={c: v[:0] for c, v in survey.tile(t[5]).catalog().items()})
    out = tmp_path / "out"
    orphan = out / "scored" / ".tmp-0123abcd-tile-x.parquet"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"half a part from a crashed run")

    with pytest.raises(ScanError, match="3 of 8 tiles failed") as err:
        scan(url, out=str(out), model=model_path, threshold=0.3, client=cluster_client,
             progress=False, gallery_size=0)  # fmt: skip
    assert not orphan.exists(), "temporary files of a crashed run are cleaned"
    failures = read_parquet_table(str(out / "failures.parquet"))
    by_tile = {str(r["tile"]): r for r in failures if r["id"] == -1}
    assert set(by_tile) == {t[1], t[2], t[3]}
    assert by_tile[t[1]]["stage"] == "read"
    assert by_tile[t[2]]["stage"] == "open" and "WCS" in by_tile[t[2]]["message"]
    assert by_tile[t[3]]["stage"] == "open" and "'i'" in by_tile[t[3]]["message"]
    sources = failures[failures["id"] != -1]
    wcs_failed = sources[sources["stage"] == "wcs"]
    assert wcs_failed["id"].tolist() == [int(cat["id"][k])]
    nan_failed = sources[sources["tile"] == t[4]]
    assert set(nan_failed["error_type"]) == {"NoFinitePixels"}
    assert sorted(nan_failed["id"].tolist()) == sorted(_selected_ids(survey.tile(t[4])).tolist())
    summary = err.value.candidates.meta["summary"]
    assert summary["tiles_failed"] == 3 and summary["sources_failed"] == 1 + len(nan_failed)
    # Every tile that could be scored is committed, and its rows equal the clean run's.
    parts = {p.name for p in (out / "scored").glob("tile-*.parquet")}
    assert parts == {f"tile-{x}.parquet" for x in t if x not in by_tile}
    clean = read_scored(clean_run[0], tiles=[t[6], t[7]])
    assert _ids_scores(read_scored(str(out), tiles=[t[6], t[7]])) == _ids_scores(clean)
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "failures" and set(run["failed_tiles"]) == set(by_tile)

    # The CLI exits non-zero on failures, 0 with --allow-failures; a re-run retries only the
    # failed tiles.
    base = [sys.executable, "-m", "lenscan.cli", "scan", url, "--out", str(out), "--model",
            model_path, "--threshold", "0.3", "--workers", "1", "--no-progress"]  # fmt: skip
    again = subprocess.run(base, capture_output=True, text=True, timeout=300)
    assert again.returncode == 1 and "3 of 8 tiles failed" in again.stderr
    assert "8 (0 scanned, 5 already done, 3 failed)" in again.stdout
    allowed = subprocess.run([*base, "--allow-failures"], capture_output=True, text=True,
                             timeout=300)  # fmt: skip
    assert allowed.returncode == 0, allowed.stderr


# ------------------------------------------------------------------ workers lost mid-sweep


def test_a_worker_killed_mid_sweep_loses_nothing(survey_url, model_path, clean_run, tmp_path):
    out = str(tmp_path / "out")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as c, Client(c) as client:  # fmt: skip
        result: dict[str, object] = {}
        thread = threading.Thread(
            target=lambda: result.update(table=scan(
                survey_url, out=out, model=model_path, threshold=0.3, client=client,
                progress=False, gallery_size=0)),
        )  # fmt: skip
        thread.start()
        deadline = time.monotonic() + 120
        while not list(Path(out, "scored").glob("tile-*.parquet")):
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.02)
        victim = sorted(client.run(os.getpid).values())[0]
        os.kill(victim, signal.SIGKILL)  # its nanny starts a new worker; its tasks run again
        thread.join(timeout=300)
    table = result["table"]
    assert _ids_scores(table) == _ids_scores(clean_run[1])
    scored = read_scored(out)
    keys = list(zip(scored["tile"], scored["id"], strict=True))
    assert len(keys) == len(set(keys)) == clean_run[1].meta["summary"]["scored_total"]


def test_plans_of_one_config_get_distinct_run_tokens(survey_url, model_path, tmp_path):
    config = ScanConfig(survey_url=survey_url, out=str(tmp_path / "o"), model=model_path)
    assert plan_scan(config).run_token != plan_scan(config).run_token


# ------------------------------------------------------------------ a local --out on remote disks


@pytest.fixture
def worker_with_its_own_disk(tmp_path):
    """A scheduler and one worker process that sees its own, private ``tmp_path/private``.

    The worker runs in a new mount namespace with a tmpfs over that folder: exactly what a
    worker on another machine sees of a client's local path.
    """
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare(1) to give a worker its own mount namespace")
    private = tmp_path / "private"
    private.mkdir()
    with LocalCluster(n_workers=0, processes=True, dashboard_address=None) as cluster:
        worker = subprocess.Popen(
            ["unshare", "-m", "sh", "-c",
             f"mount -t tmpfs none {private} && exec {sys.executable} -m distributed.cli."
             f"dask_worker {cluster.scheduler_address} --nthreads 1 --no-dashboard"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            with Client(cluster) as client:
                client.wait_for_workers(1, timeout=60)
                yield client, private
        finally:
            worker.terminate()
            worker.wait(timeout=30)


def test_a_local_out_that_workers_cannot_see_is_refused_before_scoring(
    survey_url, model_path, worker_with_its_own_disk
):
    from lenscan.sweep import OutputNotShared

    client, private = worker_with_its_own_disk
    out = private / "run"
    with pytest.raises(OutputNotShared, match="cannot see"):
        scan(survey_url, out=str(out), model=model_path, client=client, progress=False)
    assert not (out / "scored").exists() or not list((out / "scored").iterdir())


def test_dihedral_averaging_is_a_scan_option_and_part_of_the_resume_fingerprint(
    survey_url, model_path, cluster_client, clean_run, tmp_path
):
    out = str(tmp_path / "tta")
    first = open_survey(survey_url).tile_ids[:1]
    table = scan(survey_url, out=out, model=model_path, threshold=0.3, client=cluster_client,
                 progress=False, gallery_size=0, dihedral_average=True, tiles=first)  # fmt: skip
    assert json.loads(Path(out, "run.json").read_text())["dihedral_average"] is True
    plain = {(t, i): s for t, i, s in _ids_scores(read_scored(clean_run[0]))}
    tta = _ids_scores(read_scored(out))
    assert tta and any(abs(plain[(t, i)] - s) > 1e-4 for t, i, s in tta)
    assert table.meta["summary"]["tiles_scanned"] == 1
    with pytest.raises(ValueError, match="dihedral_average"):
        scan(survey_url, out=out, model=model_path, threshold=0.3, client=cluster_client,
             progress=False, tiles=first)  # fmt: skip


def test_bf16_precision_is_opt_in_close_to_fp32_and_part_of_the_resume_fingerprint(
    survey_url, model_path, cluster_client, clean_run, tmp_path
):
    out = str(tmp_path / "bf16")
    first = open_survey(survey_url).tile_ids[:1]
    scan(survey_url, out=out, model=model_path, threshold=0.3, client=cluster_client,
         progress=False, gallery_size=0, precision="bf16", tiles=first)  # fmt: skip
    assert json.loads(Path(out, "run.json").read_text())["precision"] == "bf16"
    assert json.loads(Path(clean_run[0], "run.json").read_text())["precision"] == "fp32"
    plain = {(t, i): s for t, i, s in _ids_scores(read_scored(clean_run[0]))}
    bf16 = _ids_scores(read_scored(out))
    diffs = [abs(plain[(t, i)] - s) for t, i, s in bf16]
    assert diffs and 0 < max(diffs) < 2e-2, "bf16 autocast ran and stayed within bf16 rounding"
    with pytest.raises(ValueError, match="precision"):
        scan(survey_url, out=out, model=model_path, threshold=0.3, client=cluster_client,
             progress=False, tiles=first)  # fmt: skip
    with pytest.raises(ValueError, match="precision must be 'fp32' or 'bf16'"):
        scan(survey_url, out=out, model=model_path, precision="fp16", progress=False)


def test_the_largest_tiles_are_scored_first(tmp_path):
    """The plan orders the remaining tiles by their number of sources, largest first."""
    url = str(tmp_path / "survey.zarr")
    make_survey(url, n_tiles=3, seed=5, tile_size_pix=256, lenses_per_tile=1)
    counts = {t: e["n_sources"] for t, e in open_survey(url).tile_index().items()}
    config = ScanConfig(
        survey_url=url, out=str(tmp_path / "out"), model=make_tiny_model(tmp_path / "tiny")
    )
    plan = plan_scan(config)
    assert len(set(counts.values())) == 3, counts  # the order is not decided by a tie
    assert sorted(plan.todo) == sorted(counts)
    assert [counts[t] for t in plan.todo] == sorted(counts.values(), reverse=True)
