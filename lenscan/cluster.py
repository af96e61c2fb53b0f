"""Turn a :class:`~lenscan.config.ClusterSpec` into a connected ``distributed.Client``.

Local runs start a ``LocalCluster`` of worker processes sized to the machine, or dask-cuda's
``LocalCUDACluster`` (one worker per GPU) when GPUs are present; a scheduler address connects to
a cluster started elsewhere (cloud VMs, Kubernetes, SLURM via dask-jobqueue).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from distributed import Client, LocalCluster

from lenscan.config import ClusterSpec

log = logging.getLogger(__name__)


def count_gpus() -> int:
    """Number of CUDA GPUs visible to this process (0 without torch CUDA support)."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # a broken CUDA install must not stop a CPU scan
        return 0


def _local_cluster(spec: ClusterSpec):
    n_gpus = count_gpus()
    use_gpu = spec.gpu is True or (spec.gpu == "auto" and n_gpus > 0)
    if use_gpu:
        if n_gpus == 0:
            raise ValueError("cluster.gpu is true but no CUDA GPU is visible to this process")
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            if spec.gpu is True:
                raise ValueError(
                    "cluster.gpu is true but dask-cuda is not installed: pip install "
                    "'lenscan[gpu]', or set cluster.gpu to auto/false"
                ) from None
            # One worker process drives the first GPU; dask-cuda would give each GPU its own.
            log.warning(
                "%d GPU(s) found but dask-cuda is not installed (pip install 'lenscan[gpu]'): "
                "starting one worker process that uses the first GPU",
                n_gpus,
            )
            return LocalCluster(
                n_workers=1,
                threads_per_worker=spec.threads_per_worker or 1,
                processes=True,
                memory_limit=spec.memory_limit,
                dashboard_address=":0",
            )
        return LocalCUDACluster(
            threads_per_worker=spec.threads_per_worker or 1,
            memory_limit=spec.memory_limit,
            dashboard_address=":0",
        )
    cores = os.cpu_count() or 1
    # Torch already parallelises each forward pass, so favour fewer, fatter workers.
    n_workers = spec.n_workers or max(1, cores // 2)
    threads = spec.threads_per_worker or max(1, cores // n_workers)
    return LocalCluster(
        n_workers=n_workers,
        threads_per_worker=threads,
        processes=True,
        memory_limit=spec.memory_limit,
        dashboard_address=":0",  # a free port: never clash with another cluster
    )


@contextlib.contextmanager
def connect(spec: ClusterSpec | None = None, client: Client | None = None) -> Iterator[Client]:
    """Yield a client: the one given, one connected to ``spec.scheduler``, or a local cluster.

    Clusters and clients this function starts are closed on exit; a client passed in is left
    open (it belongs to the caller).
    """
    if client is not None:
        yield client
        return
    spec = spec or ClusterSpec()
    if spec.scheduler:
        target = spec.scheduler
        if target.endswith(".json"):
            with Client(scheduler_file=target) as remote:
                yield remote
            return
        with Client(target) as remote:
            yield remote
        return
    with _local_cluster(spec) as cluster, Client(cluster) as local:
        yield local
