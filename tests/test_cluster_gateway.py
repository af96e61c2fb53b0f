"""A managed Dask service for real: a Dask Gateway server (``dask-gateway-server``, local backend,
its own TLS and proxy) on loopback, used through the shipped ``cluster/gateway.yaml`` with
``class: dask_gateway.GatewayCluster``. The scan's table equals a ``LocalCluster`` run's.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lenscan.config import ClusterSpec
from lenscan.simulate import make_survey
from lenscan.sweep import scan
from tests.helpers import make_tiny_model

pytestmark = pytest.mark.timeout(240)

SPEC = Path(__file__).resolve().parents[1] / "cluster" / "gateway.yaml"


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    """A running dask-gateway-server on 127.0.0.1; yields (api address, proxy address)."""
    pytest.importorskip("dask_gateway_server.backends.local", reason="needs dask-gateway-server")
    work = tmp_path_factory.mktemp("gateway")
    api, proxy, tcp = _free_ports(3)
    python = sys.executable
    (work / "gateway_config.py").write_text(
        "\n".join([
            'c.DaskGateway.backend_class = "dask_gateway_server.backends.local.UnsafeLocalBackend"',
            f'c.DaskGateway.address = "127.0.0.1:{api}"',
            f'c.Proxy.address = "127.0.0.1:{proxy}"',
            f'c.Proxy.tcp_address = "127.0.0.1:{tcp}"',
            f'c.LocalBackend.clusters_directory = "{work / "clusters"}"',
            f'c.ClusterConfig.scheduler_cmd = ["{python}", "-m", "distributed.cli.dask_scheduler"]',
            f'c.ClusterConfig.worker_cmd = ["{python}", "-m", "distributed.cli.dask_worker"]',
            "c.ClusterConfig.worker_cores = 1",
            'c.ClusterConfig.worker_memory = "1 G"',
            'c.ClusterConfig.environment = {"OMP_NUM_THREADS": "1"}',
        ])
    )  # fmt: skip
    log = (work / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "dask_gateway_server", "-f", "gateway_config.py"],
        cwd=work, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        end = time.monotonic() + 60
        while "Dask-Gateway server started" not in (work / "server.log").read_text():
            assert server.poll() is None, (work / "server.log").read_text()
            assert time.monotonic() < end, "dask-gateway-server did not start in 60 s"
            time.sleep(0.3)
        yield f"http://127.0.0.1:{api}", f"tls://127.0.0.1:{tcp}"
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def test_scan_through_a_dask_gateway_equals_local_cluster(gateway, tmp_path):
    address, proxy = gateway
    data = yaml.safe_load(SPEC.read_text())
    assert data["class"] == "dask_gateway.GatewayCluster"
    # This gateway offers no user options (image, worker sizes): keep the connection lines only.
    data["kwargs"] = {"address": address, "proxy_address": proxy, "auth": "basic"}
    data["adapt"] = {"minimum": 1, "maximum": 2}
    data["timeout_s"] = 120
    spec = ClusterSpec.from_dict(data)
    survey = str(tmp_path / "survey.zarr")
    make_survey(survey, n_tiles=2, seed=53, tile_size_pix=384, lenses_per_tile=4)
    model = make_tiny_model(tmp_path / "tiny")
    common = {"model": model, "threshold": 0.0, "formats": ["parquet"], "gallery_size": 0}
    via_gateway = scan(survey, out=str(tmp_path / "gw"), cluster=spec, progress=False, **common)
    local = scan(
        survey,
        out=str(tmp_path / "local"),
        cluster={"n_workers": 1, "threads_per_worker": 1},
        progress=False,
        **common,
    )
    assert len(local) > 0
    key = ("tile", "id", "score")
    assert sorted(zip(*(via_gateway[k] for k in key), strict=True)) == sorted(
        zip(*(local[k] for k in key), strict=True)
    )
    record = json.loads((tmp_path / "gw" / "run.json").read_text())["cluster"]
    assert record["class"] == "dask_gateway.GatewayCluster" and record["versions_match"] is True
    assert record["scheduler"].startswith("tls://") and record["n_workers"] >= 1
    assert record["dashboard"].startswith(address + "/clusters/")
