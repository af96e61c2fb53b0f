"""Cluster specs become real Dask clusters (or clear errors)."""

from __future__ import annotations

import json
import logging
import os
import re

import pytest
import torch
import yaml
from distributed import Client

import lenscan
from lenscan._secrets import safe_url
from lenscan.cluster import (
    check_versions,
    cluster_record,
    collect_versions,
    connect,
    count_gpus,
    from_spec,
    version_mismatches,
)
from lenscan.config import ClusterSpec, ScanConfig

pytestmark = pytest.mark.timeout(120)


def test_local_cluster_of_worker_processes():
    with connect(ClusterSpec(n_workers=2, threads_per_worker=1)) as client:
        workers = client.scheduler_info()["workers"]
        assert len(workers) == 2
        assert all(w["nthreads"] == 1 for w in workers.values())
        # Worker processes, not threads of this process.
        pids = client.run(os.getpid)
        assert len(set(pids.values())) == 2 and os.getpid() not in pids.values()
    assert client.status == "closed"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without GPU")
def test_gpu_required_without_gpu_is_a_clear_error():
    assert count_gpus() == 0
    with pytest.raises(ValueError, match="no CUDA GPU"), connect(ClusterSpec(gpu=True)):
        pass


def test_a_client_passed_in_is_left_open():
    from distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=":0") as cluster,
        Client(cluster) as mine,
    ):
        with connect(ClusterSpec(), client=mine) as got:
            assert got is mine
        assert mine.status == "running"


# --- one spec, any cluster manager -------------------------------------------------------------

LOCAL_CLUSTER_CLASS = {
    "class": "distributed.LocalCluster",
    "kwargs": {"n_workers": 0, "threads_per_worker": 1, "processes": True,
               "dashboard_address": ":0"},
}  # fmt: skip


def test_a_cluster_manager_by_class_path_scaled_then_connected():
    spec = ClusterSpec.from_dict({**LOCAL_CLUSTER_CLASS, "scale": 2, "wait_for_workers": 2})
    assert spec.resolved_kind == "class"
    with connect(spec) as client:  # waits for 2 workers, checks versions
        assert len(client.scheduler_info()["workers"]) == 2
        versions = check_versions(client)
        assert versions["lenscan"] == lenscan.__version__
        assert versions["torch"] == torch.__version__
        record = cluster_record(client, spec)
        assert record["kind"] == "class" and record["class"] == "distributed.LocalCluster"
        assert record["n_workers"] == 2 and record["n_threads"] == 2
        assert record["versions_match"] is True and record["scale"] == 2
        assert record["dashboard"].startswith("http://") and record["scheduler"].startswith("tcp")
    assert client.status == "closed"


def test_from_spec_returns_an_adapting_manager():
    spec = {**LOCAL_CLUSTER_CLASS, "adapt": {"minimum": 1, "maximum": 2}}
    with from_spec(spec) as cluster, Client(cluster) as client:
        client.wait_for_workers(1, timeout=60)  # adapt's minimum starts one worker
        assert type(cluster).__name__ == "LocalCluster" and cluster._adaptive is not None


def test_an_address_spec_is_connected_to_not_started():
    with pytest.raises(ValueError, match="names a running scheduler; connect"):
        from_spec({"address": "tcp://127.0.0.1:8786"})


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"class": "dask_jobqueue.SLURMCluster", "kwargs": {"coress": 4}}, "cluster.kwargs"),
        ({"class": "not a path"}, "cluster.class"),
        ({"class": "distributed.NoSuchCluster"}, "cluster.class"),
        ({"class": "no_such_package_xyz.Cluster"}, "cluster.class"),
        ({**LOCAL_CLUSTER_CLASS, "scale": 2, "adapt": {"maximum": 2}}, "scale or adapt"),
        ({**LOCAL_CLUSTER_CLASS, "scale": -1}, "cluster.scale"),
        ({**LOCAL_CLUSTER_CLASS, "scale": {"job": 2}}, "cluster.scale"),
        ({**LOCAL_CLUSTER_CLASS, "adapt": {"max": 2}}, "cluster.adapt"),
        ({**LOCAL_CLUSTER_CLASS, "n_workers": 2}, "cluster.n_workers"),
        ({"address": "tcp://a:1", "scheduler_file": "s.json"}, "only one of"),
        ({"kind": "address"}, "cluster.kind"),
        ({"kind": "yarn"}, "cluster.kind"),
        ({"scale": 3}, "cluster.scale"),
        ({"kwargs": {"cores": 1}}, "cluster.kwargs"),
        ({"address": ""}, "cluster.address"),
        ({"wait_for_workers": -1}, "cluster.wait_for_workers"),
        ({"timeout_s": 0}, "cluster.timeout_s"),
        ({"claas": "x.Y"}, "unknown cluster fields"),
    ],
)
def test_a_wrong_spec_fails_before_anything_starts_naming_the_field(data, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        ClusterSpec.from_dict(data)


def test_a_spec_file_in_the_scan_config_and_credentials_redacted(tmp_path):
    spec_file = tmp_path / "mine.yaml"
    spec_file.write_text(
        yaml.safe_dump(
            {"cluster": {**LOCAL_CLUSTER_CLASS, "kwargs": {
                **LOCAL_CLUSTER_CLASS["kwargs"], "security_token": "s3cr3t"}}}
        )
    )  # fmt: skip
    config = ScanConfig(survey_url="s.zarr", out="o", cluster=str(spec_file))
    assert config.cluster.manager == "distributed.LocalCluster"
    provenance = json.dumps(config.to_dict())
    assert "s3cr3t" not in provenance and '"security_token": "<redacted>"' in provenance
    assert config.to_dict()["cluster"]["class"] == "distributed.LocalCluster"
    with pytest.raises(FileNotFoundError, match="cluster spec"):
        ScanConfig(survey_url="s.zarr", out="o", cluster=str(tmp_path / "missing.yaml"))


def test_version_mismatches_name_the_place_and_package(cluster_client):
    versions = collect_versions(cluster_client)
    assert len(versions) == 4  # client, scheduler, two workers
    assert version_mismatches(versions) == []
    worker = next(p for p in versions if p.startswith("worker "))
    versions[worker] = {**versions[worker], "torch": "0.0.1"}
    versions["scheduler"] = {**versions["scheduler"], "torch": None}  # no torch there: fine
    (problem,) = version_mismatches(versions)
    assert problem.startswith(f"{worker} has torch 0.0.1 but the client has {torch.__version__}")


def test_links_lose_credentials_and_tokens():
    assert safe_url("https://u:p@dash.example.org:8443/status?token=abc") == (
        "https://dash.example.org:8443/status"
    )
    assert safe_url("tcp://10.0.0.1:8786") == "tcp://10.0.0.1:8786"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_local_cuda_kind_starts_one_worker_per_gpu():
    pytest.importorskip("dask_cuda", reason="needs lenscan[gpu] (dask-cuda)")
    spec = ClusterSpec(kind="local-cuda")
    with connect(spec) as client:
        assert len(client.scheduler_info()["workers"]) == count_gpus()
        assert cluster_record(client, spec)["kind"] == "local-cuda"


def test_command_line_flags_apply_on_top_of_a_spec_file(tmp_path):
    from lenscan.cli import _scan_config, build_parser

    local, remote = tmp_path / "local.yaml", tmp_path / "remote.yaml"
    local.write_text("n_workers: 1\nthreads_per_worker: 1\n")
    remote.write_text(yaml.safe_dump({"cluster": {**LOCAL_CLUSTER_CLASS, "scale": 1}}))
    parse = build_parser().parse_args
    config = _scan_config(parse(["scan", "s.zarr", "--out", "o", "--cluster", str(local),
                                 "--workers", "2"]))  # fmt: skip
    assert (config.cluster.n_workers, config.cluster.threads_per_worker) == (2, 1)
    config = _scan_config(parse(["scan", "s.zarr", "--out", "o", "--cluster", str(remote)]))
    assert config.cluster.manager == "distributed.LocalCluster" and config.cluster.scale == 1
    # --scheduler replaces what the file describes by the running scheduler.
    config = _scan_config(parse(["scan", "s.zarr", "--out", "o", "--cluster", str(remote),
                                 "--scheduler", "tcp://10.0.0.1:8786"]))  # fmt: skip
    assert config.cluster.resolved_kind == "address" and config.cluster.manager is None
    with pytest.raises(ValueError, match="cluster.n_workers applies to local clusters only"):
        _scan_config(parse(["scan", "s.zarr", "--out", "o", "--cluster", str(remote),
                            "--workers", "2"]))  # fmt: skip


def test_dask_config_reaches_a_scheduler_started_here_and_is_undone():
    import dask

    before = dask.config.get("distributed.scheduler.allowed-failures")
    spec = {**LOCAL_CLUSTER_CLASS, "scale": 1,
            "dask_config": {"distributed.scheduler.allowed-failures": before + 7}}  # fmt: skip
    with connect(spec) as client:
        allowed = client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.allowed_failures)
        assert allowed == before + 7
    assert dask.config.get("distributed.scheduler.allowed-failures") == before
    with pytest.raises(ValueError, match="cluster.dask_config"):
        ClusterSpec.from_dict({"dask_config": ["distributed.scheduler.allowed-failures"]})


def test_cancelled_task_warnings_are_dropped_and_others_kept():
    from lenscan.cluster import DropCancelledTasks

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("distributed.worker.state_machine", logging.WARNING, __file__,
                                 1, msg, None, None)  # fmt: skip

    drop = DropCancelledTasks()
    assert not drop.filter(record("Async instruction for <Task x> ended with CancelledError"))
    assert drop.filter(record("Worker is at 85% memory usage"))
