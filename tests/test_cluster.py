"""Cluster specs become real Dask clusters (or clear errors)."""

from __future__ import annotations

import os

import pytest
import torch

from lenscan.cluster import connect, count_gpus
from lenscan.config import ClusterSpec

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
