"""lenscan on Kubernetes with the dask-kubernetes operator (``lenscan[kubernetes]``).

:func:`render_cluster_spec` builds the ``DaskCluster`` resource with dask-kubernetes' own
``make_cluster_spec`` and then gives workers and scheduler their own resources (GPU limits on
workers only), the GPU taint toleration and a service account, so that pods get cloud
credentials from workload identity and never from the spec. :func:`kube_cluster` starts it;
``cluster/kubernetes.yaml`` names it as ``class: lenscan.cluster.kubernetes.kube_cluster``.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

from dask_kubernetes.operator import KubeCluster, make_cluster_spec

__all__ = [
    "GPU_RESOURCE",
    "kube_cluster",
    "render_cluster_spec",
]

GPU_RESOURCE = "nvidia.com/gpu"


def render_cluster_spec(
    *,
    name: str,
    image: str,
    n_workers: int = 1,
    worker_resources: dict[str, Any] | None = None,
    scheduler_resources: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    worker_command: str = "dask worker",
    service_account: str | None = None,
    idle_timeout: int = 0,
    scheduler_service_type: str = "ClusterIP",
) -> dict[str, Any]:
    """The ``DaskCluster`` resource for a lenscan sweep.

    Parameters
    ----------
    name : str
        Cluster name (Kubernetes object name).
    image : str
        The lenscan image (``cluster/Dockerfile`` or ``cluster/Dockerfile.gpu``).
    n_workers : int
        Worker replicas at start (``adapt``/``scale`` in the spec changes them later).
    worker_resources, scheduler_resources : dict, optional
        Kubernetes ``resources`` (``requests``/``limits``) per container, e.g. worker limits
        ``{"nvidia.com/gpu": 1, "cpu": 8, "memory": "32Gi"}``.
    env : dict, optional
        Environment for both containers (no secrets: use ``service_account``).
    worker_command : str
        ``dask worker`` for CPU workers, ``dask cuda worker`` for GPU ones.
    service_account : str, optional
        Kubernetes service account for the pods, bound to a cloud identity (GKE workload
        identity, EKS IRSA / pod identity, Azure workload identity).
    idle_timeout : int
        Seconds of idleness after which the operator deletes the cluster (0: never).
    scheduler_service_type : str
        ``ClusterIP`` (default; reach it with port-forwarding) or ``LoadBalancer``.

    Returns
    -------
    dict
        The resource, ready for ``KubeCluster(custom_cluster_spec=...)`` or ``kubectl apply``.
    """
    spec = make_cluster_spec(
        name=name,
        image=image,
        n_workers=n_workers,
        resources=worker_resources,
        env=env,
        worker_command=worker_command,
        scheduler_service_type=scheduler_service_type,
        idle_timeout=idle_timeout,
    )
    worker_pod = spec["spec"]["worker"]["spec"]
    scheduler_pod = spec["spec"]["scheduler"]["spec"]
    # make_cluster_spec gives the scheduler the workers' resources; it needs no GPU.
    scheduler_pod["containers"][0]["resources"] = copy.deepcopy(scheduler_resources or {})
    limits = (worker_resources or {}).get("limits", {})
    if GPU_RESOURCE in limits:
        worker_pod["tolerations"] = [
            {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
        ]
    if service_account:
        for pod in (worker_pod, scheduler_pod):
            pod["serviceAccountName"] = service_account
    return spec


def kube_cluster(*, namespace: str | None = None, **render: Any) -> KubeCluster:
    """Start a ``KubeCluster`` from :func:`render_cluster_spec` (keyword arguments as there)."""
    return KubeCluster(custom_cluster_spec=render_cluster_spec(**render), namespace=namespace)


# Spec validation (lenscan.cluster.check_manager) reads this: every render argument + namespace.
kube_cluster.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [
        inspect.Parameter("namespace", inspect.Parameter.KEYWORD_ONLY, default=None),
        *inspect.signature(render_cluster_spec).parameters.values(),
    ],
    return_annotation=KubeCluster,
)
