"""gs:// and az:// for real: a sweep, a killed client and its resume, against emulators.

The GCS JSON API is gcp-storage-emulator's, Azure Blob is azurite's (npm), both on loopback and
started by session fixtures (``tests/conftest.py``). The survey and the scan's output live in
the store; the scan is the ``lenscan`` command a user runs, with ``--storage-options``.
Credentials reach the client and its workers only through the environment: the tests check
that neither the task graph nor any output holds the Azure account key.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
import uuid

import fsspec
import pytest
from distributed import Client, LocalCluster

from lenscan.config import ScanConfig
from lenscan.simulate import make_survey
from lenscan.sweep import read_scored, scan
from lenscan.sweep.plan import plan_scan
from tests.conftest import AZURITE_KEY, S3_BUCKET
from tests.helpers import make_tiny_model

pytestmark = pytest.mark.timeout(600)
N_TILES = 4
FIXTURES = {"gs": "gcs_server", "az": "azure_server"}


@pytest.fixture(scope="module")
def local_survey(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("cloud") / "survey.zarr")
    make_survey(url, n_tiles=N_TILES, seed=31, tile_size_pix=256, lenses_per_tile=3)
    return url


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def local_run(local_survey, model, tmp_path_factory):
    """The same scan on the local copy: what every cloud run must reproduce."""
    out = str(tmp_path_factory.mktemp("local") / "run")
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                      dashboard_address=None) as c, Client(c) as client:  # fmt: skip
        scan(local_survey, out=out, model=model, threshold=0.0, gallery_size=0, client=client,
             progress=False)  # fmt: skip
    return _ids_scores(read_scored(out))


@pytest.fixture(scope="module", params=sorted(FIXTURES))
def store(request, local_survey):
    """(protocol, root URL of a fresh prefix holding ``survey.zarr``, storage options, fs)."""
    protocol = request.param
    _, options = request.getfixturevalue(FIXTURES[protocol])
    fs = fsspec.filesystem(protocol, **options)
    root = f"{protocol}://{S3_BUCKET}/{uuid.uuid4().hex[:12]}"
    fs.put(local_survey, f"{root}/survey.zarr", recursive=True)
    return protocol, root, options, fs


def _ids_scores(table) -> list[tuple[str, int, float]]:
    return sorted(
        (str(t), int(i), round(float(s), 6))
        for t, i, s in zip(table["tile"], table["id"], table["score"], strict=True)
    )


def _command(root: str, out: str, options: dict, config_path) -> list[str]:
    config_path.write_text(
        f"survey_url: {root}/survey.zarr\nout: {out}\nthreshold: 0.0\ngallery_size: 0\n"
        "commit_interval_seconds: 0\ncluster: {n_workers: 1, threads_per_worker: 1}\n"
    )
    flag = json.dumps(options)
    return [sys.executable, "-m", "lenscan.cli", "scan", "--config", str(config_path),
            "--storage-options", flag, "--out-storage-options", flag, "--no-progress"]  # fmt: skip


def test_a_full_sweep_in_the_store_matches_the_local_one(store, model, local_run, tmp_path):
    _protocol, root, options, fs = store
    out = f"{root}/full"
    command = [*_command(root, out, options, tmp_path / "scan.yaml"), "--model", model]
    run = subprocess.run(command, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    record = json.loads(fs.cat_file(f"{out}/run.json"))
    assert record["status"] == "complete" and record["summary"]["tiles_scanned"] == N_TILES
    assert fs.exists(f"{out}/candidates.parquet")
    assert _ids_scores(read_scored(out, storage_options=options)) == local_run
    for text in (run.stdout, run.stderr, json.dumps(record)):
        assert AZURITE_KEY not in text


def test_the_task_graph_and_the_config_carry_no_secret(store, model):
    """The key is in the environment of client and workers; never in what travels to them."""
    protocol, root, options, _ = store
    config = ScanConfig(survey_url=f"{root}/survey.zarr", out=f"{root}/plan-only", model=model,
                        storage_options=options, out_storage_options=options)  # fmt: skip
    plan = plan_scan(config)
    graph_bytes = pickle.dumps(plan.job())
    assert AZURITE_KEY.encode() not in graph_bytes
    assert AZURITE_KEY not in json.dumps(config.to_dict())
    if protocol == "az":
        assert AZURITE_KEY in os.environ["AZURE_STORAGE_CONNECTION_STRING"]


def test_a_killed_client_resumes_in_the_store(store, model, local_run, tmp_path):
    _protocol, root, options, fs = store
    out = f"{root}/killed"
    command = [*_command(root, out, options, tmp_path / "scan.yaml"), "--model", model]
    proc = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 300:
            assert proc.poll() is None, "the scan ended before it could be killed"
            fs.invalidate_cache()
            if fs.glob(f"{out}/ledger/*.tiles.parquet"):
                break
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the client and its local cluster, at once
        proc.wait()
    fs.invalidate_cache()
    assert len(fs.glob(f"{out}/scored/tile-*.parquet")) < N_TILES, "the kill must land mid-scan"
    assert json.loads(fs.cat_file(f"{out}/run.json"))["status"] == "running"

    again = subprocess.run(command, capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, again.stderr[-3000:]
    fs.invalidate_cache()
    summary = json.loads(fs.cat_file(f"{out}/run.json"))["summary"]
    assert summary["tiles_skipped"] >= 1, "tiles committed before the kill are not rescored"
    assert summary["tiles_skipped"] + summary["tiles_scanned"] == N_TILES
    assert _ids_scores(read_scored(out, storage_options=options)) == local_run
