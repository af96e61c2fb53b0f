"""Every shipped cluster spec (``cluster/*.yaml``) loads, and each is built by its own cluster
manager as far as this machine allows: SLURM job scripts rendered by dask-jobqueue, the
Kubernetes ``DaskCluster`` resource by dask-kubernetes' spec builder, the cloud VM clusters
constructed by dask-cloudprovider up to the first call to a cloud account (with the worker's
cloud-init rendered). The real-SLURM sweeps are in ``test_slurm.py``.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import sys
from pathlib import Path
from typing import Any

import dask
import pytest
import yaml

import lenscan
from lenscan.cluster import import_manager
from lenscan.config import ClusterSpec

pytestmark = pytest.mark.timeout(120)
#: Keys whose value would be a credential (``auth: jupyterhub`` names a method, not a secret).
CREDENTIAL_NAME = re.compile(r"(?i)(secret|token|passw|credential|api_?key|access_?key|private)")

SPECS = Path(__file__).resolve().parents[1] / "cluster"
SPEC_FILES = sorted(p.name for p in SPECS.glob("*.yaml"))
GPU_IMAGE = "lenscan-gpu:" + lenscan.__version__


@pytest.fixture(autouse=True)
def _restore_dask_config():
    """dask-cloudprovider's VM clusters switch this process's Dask config to TLS-only (meant
    for the client that starts them); undo it so later tests' clusters are not refused."""
    saved = copy.deepcopy(dask.config.config["distributed"])
    yield
    dask.config.config["distributed"] = saved


def _raw(name: str) -> dict[str, Any]:
    return yaml.safe_load((SPECS / name).read_text())


def _walk(value: Any, path: str = ""):
    if isinstance(value, dict):
        for k, v in value.items():
            yield f"{path}.{k}", k, v
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _walk(v, f"{path}[{i}]")


def test_the_issue_targets_are_all_shipped():
    expected = {"slurm-cpu.yaml", "slurm-gpu.yaml", "kubernetes.yaml", "ec2-gpu.yaml"}
    expected |= {"azure-gpu.yaml", "gcp-gpu.yaml", "gateway.yaml", "coiled.yaml"}
    assert expected <= set(SPEC_FILES)


@pytest.mark.parametrize("name", SPEC_FILES)
def test_every_shipped_spec_loads_and_holds_no_credentials(name):
    spec = ClusterSpec.from_yaml(SPECS / name)  # imports the manager, checks every kwarg
    assert spec.resolved_kind == "class"
    assert spec.adapt or spec.scale, f"{name} neither scales nor adapts"
    assert spec.wait_for_workers >= 1 and spec.timeout_s >= 600
    for where, key, value in _walk(spec.kwargs):
        secret = CREDENTIAL_NAME.search(str(key)) is not None
        assert not (secret and value), f"{name}: {where} looks like a credential"
    images = [v for _, k, v in _walk(spec.kwargs) if k in ("image", "docker_image", "container")]
    for image in images:  # the images cluster/Dockerfile* build, tagged with this version
        assert image.endswith(":" + lenscan.__version__), f"{name}: {image}"
        if "gpu" in name:
            assert image.endswith(GPU_IMAGE), f"{name} must use the GPU image, not {image}"


def test_a_missing_manager_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "dask_jobqueue", None)  # as if it were not installed
    with pytest.raises(ValueError, match=r"lenscan\[slurm\]") as err:
        ClusterSpec.from_yaml(SPECS / "slurm-cpu.yaml")
    assert "slurm-cpu.yaml" in str(err.value) and "cluster.class" in str(err.value)


def _slurm_cluster(name: str):
    """The spec's SLURMCluster (its scheduler starts here; no job is submitted)."""
    raw = _raw(name)
    kwargs = {**raw["kwargs"], "interface": None, "scheduler_options": {"dashboard_address": ":0"}}
    kwargs["log_directory"] = None
    return import_manager(raw["class"])(**kwargs)


def test_slurm_cpu_job_script():
    with _slurm_cluster("slurm-cpu.yaml") as cluster:
        script = cluster.job_script()
    assert "#SBATCH -p compute" in script and "#SBATCH -t 04:00:00" in script
    assert "#SBATCH --cpus-per-task=8" in script and "#SBATCH --mem=30G" in script
    assert "source ~/lenscan-env/bin/activate" in script
    assert "-m distributed.cli.dask_worker" in script
    assert "--lifetime 220m --lifetime-stagger 10m" in script
    assert "--local-directory $TMPDIR" in script


def test_slurm_gpu_job_script_requests_gpus_and_runs_dask_cuda_workers():
    with _slurm_cluster("slurm-gpu.yaml") as cluster:
        script = cluster.job_script()
    assert "#SBATCH --gres=gpu:4" in script and "#SBATCH -p gpu" in script
    assert "#SBATCH --cpus-per-task=16" in script
    assert "-m dask_cuda.cli tcp://" in script  # python -m dask_cuda.cli = `dask cuda worker`
    assert "-m distributed.cli.dask_worker" not in script
    assert "--nthreads 2" in script
    assert "DASK_DISTRIBUTED__WORKER__LIFETIME__DURATION=220m" in script
    assert "module load cuda" in script


def test_kubernetes_spec_renders_the_daskcluster_resource():
    from lenscan.cluster.kubernetes import render_cluster_spec

    raw = _raw("kubernetes.yaml")
    assert raw["class"] == "lenscan.cluster.kubernetes.kube_cluster"
    kwargs = {k: v for k, v in raw["kwargs"].items() if k != "namespace"}
    resource = render_cluster_spec(**kwargs)  # dask-kubernetes' make_cluster_spec inside
    assert resource["apiVersion"] == "kubernetes.dask.org/v1"
    assert resource["kind"] == "DaskCluster" and resource["metadata"]["name"] == "lenscan-sweep"
    worker_pod = resource["spec"]["worker"]["spec"]
    scheduler_pod = resource["spec"]["scheduler"]["spec"]
    worker, scheduler = worker_pod["containers"][0], scheduler_pod["containers"][0]
    assert worker["image"] == scheduler["image"] and worker["image"].endswith(GPU_IMAGE)
    assert worker["args"][:3] == ["dask", "cuda", "worker"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["resources"]["requests"]["memory"] == "28Gi"
    assert "nvidia.com/gpu" not in json.dumps(scheduler["resources"])  # no GPU for the scheduler
    assert scheduler["args"][0] == "dask-scheduler"  # passed through by cluster/entrypoint.sh
    assert {"name": "OMP_NUM_THREADS", "value": "1"} in worker["env"]
    assert worker_pod["serviceAccountName"] == scheduler_pod["serviceAccountName"]
    assert worker_pod["serviceAccountName"] == "lenscan-reader"
    assert worker_pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert resource["spec"]["worker"]["replicas"] == 1 and resource["spec"]["idleTimeout"] == 600


def _construct(name: str, **extra: Any):
    """The spec's VM cluster, constructed (not started), and one worker VM with its cloud-init."""
    raw = _raw(name)
    cls = import_manager(raw["class"])

    async def build():
        cluster = cls(asynchronous=True, **raw["kwargs"], **extra)
        # GCPWorker reads the address the scheduler VM reports once it runs (a cloud step).
        cluster.scheduler_internal_ip, cluster.scheduler_port = "10.0.0.1", 8786
        worker = cluster.worker_class(scheduler="tls://10.0.0.1:8786", **cluster.worker_options)
        return cluster, worker, cluster.render_process_cloud_init(worker)

    return asyncio.run(build())


def _check_gpu_worker_cloud_init(cloud_init: str, worker) -> None:
    assert "docker run --net=host --gpus=all" in cloud_init
    assert GPU_IMAGE in cloud_init and 'OMP_NUM_THREADS="1"' in cloud_init
    assert "distributed.cli.dask_spec tls://10.0.0.1:8786" in worker.command
    assert '"cls": "dask_cuda.CUDAWorker"' in worker.command


def test_ec2_gpu_spec_builds_spot_gpu_workers():
    cluster, worker, cloud_init = _construct("ec2-gpu.yaml")
    assert cluster.gpu_instance is True  # else EC2Cluster would not pass --gpus=all
    assert worker.instance_type == "g5.xlarge" and worker.spot is True
    assert cluster.options["region"] == "us-east-2"
    assert cluster.options["iam_instance_profile"] == {"Name": "lenscan-survey-access"}
    _check_gpu_worker_cloud_init(cloud_init, worker)


def test_azure_gpu_spec_builds_spot_gpu_workers():
    # The subscription id is looked up with the `az` CLI unless given: a real account's step.
    cluster, worker, cloud_init = _construct(
        "azure-gpu.yaml", subscription_id="00000000-0000-0000-0000-000000000000"
    )
    assert cluster.gpu_instance is True
    assert worker.vm_size == "Standard_NC4as_T4_v3"
    assert cluster.options["extra_vm_options"]["priority"] == "Spot"
    assert cluster.options["location"] == "westeurope"
    _check_gpu_worker_cloud_init(cloud_init, worker)


def test_gcp_gpu_spec_builds_preemptible_gpu_workers():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    # GCPCluster builds its API client at construction: give it a throwaway service-account key
    # made here (never sent anywhere; nothing below calls the API).
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    throwaway = {
        "type": "service_account",
        "project_id": "your-project",
        "private_key_id": "0",
        "private_key": pem,
        "client_email": "test@your-project.iam.gserviceaccount.com",
        "client_id": "0",
        "token_uri": "https://oauth2.googleapis.com/token",
    }
    cluster, worker, cloud_init = _construct("gcp-gpu.yaml", service_account_credentials=throwaway)
    options = cluster.worker_options
    assert options["ngpus"] == 1 and options["gpu_type"] == "nvidia-tesla-t4"
    assert options["machine_type"] == "n1-standard-8" and options["gpu_instance"] is True
    assert cluster.options["preemptible"] is True
    assert cluster.scheduler_options["ngpus"] == 0
    _check_gpu_worker_cloud_init(cloud_init, worker)


@pytest.mark.parametrize("name", ["gateway.yaml", "coiled.yaml"])
def test_managed_service_specs_name_their_manager(name):
    spec = ClusterSpec.from_yaml(SPECS / name)
    assert spec.manager in ("dask_gateway.GatewayCluster", "coiled.Cluster")
    assert callable(import_manager(spec.manager))
    if spec.manager == "coiled.Cluster":  # its arguments are known: a typo is caught early
        bad = {**_raw(name), "kwargs": {**_raw(name)["kwargs"], "worker_vm_type": "g5"}}
        with pytest.raises(ValueError, match=r"cluster.kwargs: \['worker_vm_type'\]"):
            ClusterSpec.from_dict(bad)
