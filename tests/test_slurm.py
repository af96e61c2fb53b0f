"""Scans on a real SLURM: Dask workers are SLURM jobs started by dask-jobqueue from the shipped
``cluster/slurm-cpu.yaml``, adapted to the local single-node partition (see ``slurm_fixture``).

The candidate table must equal the one a ``LocalCluster`` run gives; workers whose lifetime ends
mid-sweep (as jobs reaching their walltime do) are replaced by ``adapt`` and lose nothing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lenscan.config import ClusterSpec
from lenscan.models import ModelMeta, create_model, save_model
from lenscan.simulate import make_survey
from lenscan.sweep import scan

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[1]


def slurm_spec(slurm, work: Path, **changes) -> ClusterSpec:
    """``cluster/slurm-cpu.yaml`` with the site lines edited for the local SLURM."""
    data = yaml.safe_load((REPO / "cluster" / "slurm-cpu.yaml").read_text())
    data["kwargs"].update(
        queue=slurm.partition,
        account=None,
        cores=1,
        memory="1GB",
        walltime="00:10:00",
        interface="lo",
        local_directory=str(work / "spill"),
        log_directory=str(work / "logs"),
        job_script_prologue=[f"source {sys.prefix}/bin/activate", "export OMP_NUM_THREADS=1"],
        scheduler_options={"dashboard_address": ":0"},
    )
    data["adapt"] = {"minimum_jobs": 1, "maximum_jobs": 2}
    data["timeout_s"] = 120
    for key, value in changes.items():
        if key == "kwargs":
            data["kwargs"].update(value)
        else:
            data[key] = value
    return ClusterSpec.from_dict(data)


#: Score every catalogue source (no colour cut): ~40 stamps per small tile.
EVERY_SOURCE = {"name": "every-source"}


def _wide_model(path: Path) -> str:
    """A randomly initialised CNN, wide enough that scoring a tile takes a fraction of a second
    (the lifetime test needs a sweep of several seconds from a small survey)."""
    torch.manual_seed(0)
    kwargs = {"channels": [96, 192], "hidden": 32}
    meta = ModelMeta(
        name="wide",
        architecture="jacobs-cnn",
        arch_kwargs=kwargs,
        bands=("g", "r", "i"),
        stamp_size_pix=32,
        pixel_scale_arcsec=0.263,
        normalisation={"method": "asinh_mad", "softening_sigma": 3.0},
        n_members=2,
    )
    members = [create_model("jacobs-cnn", in_chans=3, stamp_size_pix=32, **kwargs)
               for _ in range(2)]  # fmt: skip
    save_model(path, members, meta)
    return str(path)


def _scan(survey: str, model: str, out: Path, cluster, **options):
    return scan(survey, out=str(out), model=model, colour_cut=EVERY_SOURCE, threshold=0.0,
                formats=["parquet"], gallery_size=0, cluster=cluster, progress=False,
                **options)  # fmt: skip


@pytest.fixture(scope="module")
def survey_and_reference(tmp_path_factory):
    """A small synthetic survey, a model, and their candidate table from a LocalCluster."""
    work = tmp_path_factory.mktemp("slurm-survey")
    survey = str(work / "survey.zarr")
    make_survey(survey, n_tiles=8, seed=47, tile_size_pix=384, lenses_per_tile=4)
    model = _wide_model(work / "wide")
    reference = _scan(survey, model, work / "local", {"n_workers": 2, "threads_per_worker": 1})
    assert len(reference) > 100  # ~40 sources per tile, every one scored
    return survey, model, reference


def _rows(table) -> list[tuple]:
    order = np.lexsort((np.asarray(table["id"]), np.asarray(table["tile"])))
    return [(str(table["tile"][i]), int(table["id"][i]), float(table["score"][i])) for i in order]


def test_scan_on_slurm_jobs_equals_local_cluster(slurm, survey_and_reference, tmp_path):
    survey, model, reference = survey_and_reference
    spec = slurm_spec(slurm, tmp_path)
    table = _scan(survey, model, tmp_path / "slurm", spec)
    assert len(reference) > 0
    assert _rows(table) == _rows(reference)
    # The workers really were SLURM jobs: one log per job, written by sbatch's --output.
    logs = sorted((tmp_path / "logs").glob("*.err")) + sorted((tmp_path / "logs").glob("*.out"))
    assert logs, "no SLURM job logs: the workers did not run as SLURM jobs"
    assert any("Starting Worker" in p.read_text() for p in logs)
    run = json.loads((tmp_path / "slurm" / "run.json").read_text())
    assert run["cluster"]["kind"] == "class"
    assert run["cluster"]["class"] == "dask_jobqueue.SLURMCluster"
    assert run["cluster"]["n_workers"] >= 1 and run["cluster"]["versions_match"] is True
    assert run["cluster"]["dashboard"].startswith("http")
    assert run["config"]["cluster"]["adapt"] == {"minimum_jobs": 1, "maximum_jobs": 2}


def _retired(log_dir: Path) -> tuple[int, int]:
    """(SLURM jobs that ran a worker, workers that retired at the end of their lifetime)."""
    logs = [p.read_text() for p in log_dir.glob("*.err")]
    return len(logs), sum("worker-lifetime-reached" in text for text in logs)


def test_workers_replaced_when_their_lifetime_ends_lose_nothing(
    slurm, survey_and_reference, tmp_path
):
    survey, model, _ = survey_and_reference
    # Dihedral averaging scores every stamp 8 times: a sweep several seconds long even on an
    # idle machine, without a bigger survey. Its own LocalCluster reference.
    slow = {"dihedral_average": True}
    reference = _scan(survey, model, tmp_path / "local-tta", {"n_workers": 2}, **slow)
    # Lifetimes shorter than the sweep, as a 4 h walltime is for a 12 h sweep; one job at a
    # time, so every retirement must be followed by a new job for the sweep to finish. The
    # sweep's length depends on the machine's load: try shorter lifetimes until one is shorter.
    # Workers import lenscan and torch before their lifetime clock starts (--preload), so even
    # the shortest lifetime leaves time to score tiles.
    for lifetime in ("10s", "5s", "2.5s", "1.5s"):
        # SpecCluster forgets a departed worker's job after lost-worker-timeout (15 s by
        # default), then adapt submits its replacement; shortened so the test stays short. A
        # worker that retires while scoring a tile counts as one of the tile's allowed failures
        # (3 by default: a tile interrupted 4 times failed with KilledWorker on a loaded
        # machine); with seconds-long lifetimes that happens, with hours-long ones it does not.
        # The spec's dask_config reaches the scheduler, which runs in this process.
        spec = slurm_spec(
            slurm,
            tmp_path,
            kwargs={
                "worker_extra_args": ["--lifetime", lifetime, "--preload", "lenscan.sweep"],
                "log_directory": str(tmp_path / f"logs-{lifetime}"),
            },
            adapt={"minimum_jobs": 1, "maximum_jobs": 1, "interval": "500ms"},
            dask_config={
                "distributed.deploy.lost-worker-timeout": "1s",
                "distributed.scheduler.allowed-failures": 20,
            },
        )
        table = _scan(survey, model, tmp_path / f"slurm-{lifetime}", spec, **slow)
        assert _rows(table) == _rows(reference)
        run = json.loads((tmp_path / f"slurm-{lifetime}" / "run.json").read_text())
        assert run["summary"]["tiles_failed"] == 0 and run["summary"]["tiles_scanned"] == 8
        jobs, retired = _retired(tmp_path / f"logs-{lifetime}")
        if retired and jobs >= 2:  # a worker left mid-sweep and a new job took over
            break
    else:
        pytest.fail("no worker reached its lifetime: the sweeps were shorter than 1.5 s")
