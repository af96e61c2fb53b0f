"""A cluster started by hand (``dask scheduler`` + ``dask worker`` processes), used by address.

This is how cloud VMs, Kubernetes pods and SLURM jobs appear to lenscan: a scheduler address.
The workers run in another folder and never see the model file; the scan ships it to them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from distributed import Client

from lenscan.simulate import make_survey
from lenscan.sweep import read_scored, scan
from tests.helpers import make_tiny_model

pytestmark = pytest.mark.timeout(300)


def _wait_for(path: Path, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > end:
            raise TimeoutError(f"{path} did not appear within {timeout} s")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def hand_started_cluster(tmp_path_factory):
    work = tmp_path_factory.mktemp("cluster")
    scheduler_file = work / "scheduler.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
             "--port", "0", "--dashboard-address", ":0", "--scheduler-file", str(scheduler_file)],
            cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
    ]  # fmt: skip
    try:
        _wait_for(scheduler_file)
        for _ in range(2):
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file",
                     str(scheduler_file), "--nthreads", "1", "--no-dashboard",
                     "--local-directory", str(work)],
                    cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )
            )  # fmt: skip
        address = json.loads(scheduler_file.read_text())["address"]
        with Client(address) as client:
            client.wait_for_workers(2, timeout=120)
        yield address, scheduler_file
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def test_scan_on_a_cluster_started_by_hand(hand_started_cluster, tmp_path):
    address, scheduler_file = hand_started_cluster
    survey = str(tmp_path / "survey.zarr")
    make_survey(survey, n_tiles=2, seed=31, tile_size_pix=384, lenses_per_tile=4)
    model = make_tiny_model(tmp_path / "private" / "tiny")  # a path the workers never read

    # The command line with a cluster spec file naming the scheduler file.
    spec_file = tmp_path / "cluster.yaml"
    spec_file.write_text(f"scheduler_file: {scheduler_file}\nwait_for_workers: 2\n")
    run = subprocess.run(
        [sys.executable, "-m", "lenscan.cli", "scan", survey, "--model", model, "--out",
         str(tmp_path / "by-file"), "--cluster", str(spec_file), "--threshold", "0",
         "--no-progress", "-v"],  # -v: lenscan's INFO lines, the dashboard link among them
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "2 scanned" in run.stdout
    assert "Dask dashboard (scheduler_file cluster): http" in run.stderr

    # The same through the Python API and the scheduler's address: identical rows.
    with Client(scheduler_file=str(scheduler_file)) as client:
        workers = client.scheduler_info()["workers"]
        assert len(workers) == 2
    scan(survey, out=str(tmp_path / "by-address"), model=model, threshold=0.0,
         cluster={"address": address}, progress=False)  # fmt: skip
    a, b = read_scored(str(tmp_path / "by-address")), read_scored(str(tmp_path / "by-file"))
    a.sort(["tile", "id"])
    b.sort(["tile", "id"])
    assert len(a) > 0 and a["id"].tolist() == b["id"].tolist()
    assert a["score"].tolist() == b["score"].tolist()
    # run.json records the cluster: kind, workers, dashboard, versions checked.
    for out, kind in (("by-file", "scheduler_file"), ("by-address", "address")):
        record = json.loads((tmp_path / out / "run.json").read_text())["cluster"]
        assert record["kind"] == kind and record["n_workers"] == 2
        assert record["scheduler"] == address and record["versions_match"] is True
        assert record["dashboard"].startswith("http://")
