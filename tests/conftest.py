"""Shared pytest fixtures."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import torch

# Tests run beside Dask worker processes on small CI machines (2 cores): one torch thread per
# process avoids oversubscription, which made the simulator tests ~6x slower under load.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

#: Bucket created on the test S3 server.
S3_BUCKET = "lenscan-test"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def s3_server() -> Iterator[tuple[str, dict[str, Any]]]:
    """A real S3 API (moto's threaded server on 127.0.0.1) with the bucket ``lenscan-test``.

    Yields ``(endpoint_url, storage_options)``; pass the storage options to lenscan (s3fs) to
    reach the server, e.g. ``open_survey("s3://lenscan-test/x.zarr", storage_options=...)``.
    """
    server_mod = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("s3fs")
    # Credentials only for the local fake server; set in the environment too so any client
    # created without storage_options (e.g. by boto3) never looks for real ones.
    fake_env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in fake_env}
    os.environ.update(fake_env)
    # The server logs every request through werkzeug; keep test output readable.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = _free_port()
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint_url = f"http://127.0.0.1:{port}"
    try:
        client = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        client.create_bucket(Bucket=S3_BUCKET)
        storage_options = {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": endpoint_url, "region_name": "us-east-1"},
        }
        yield endpoint_url, storage_options
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3_url(s3_server: tuple[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """A fresh, empty ``s3://`` prefix on the test server and the storage options to reach it."""
    _, storage_options = s3_server
    return f"s3://{S3_BUCKET}/{uuid.uuid4().hex}", storage_options


def _tile_data(
    *,
    seed: int = 0,
    bands: tuple[str, ...] = ("g", "r", "i"),
    shape_yx: tuple[int, int] = (150, 200),
    n_sources: int = 25,
) -> dict[str, Any]:
    """Keyword arguments for ``SurveyStore.write_tile``: a random seeded tile with a TAN WCS."""
    import numpy as np
    from astropy.wcs import WCS

    rng = np.random.default_rng(seed)
    ny, nx = shape_yx
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [rng.uniform(0, 360), rng.uniform(-60, 10)]
    wcs.wcs.crpix = [nx / 2 + 0.5, ny / 2 + 0.5]
    wcs.wcs.cdelt = [-0.263 / 3600, 0.263 / 3600]
    image = rng.normal(100.0, 5.0, size=(len(bands), ny, nx)).astype(np.float32)
    x = rng.uniform(-0.5, nx - 0.5, n_sources)
    y = rng.uniform(-0.5, ny - 0.5, n_sources)
    ra, dec = wcs.wcs_pix2world(x, y, 0)
    catalog: dict[str, Any] = {
        "id": rng.permutation(10 * n_sources)[:n_sources].astype(np.int64) + 1,
        "ra": ra,
        "dec": dec,
        "x": x,
        "y": y,
    }
    for band in bands:
        catalog[f"mag_{band}"] = rng.uniform(18, 25, n_sources).astype(np.float32)
        catalog[f"magerr_{band}"] = rng.uniform(0.01, 0.3, n_sources).astype(np.float32)
    catalog["flags"] = rng.integers(0, 4, n_sources).astype(np.int32)
    catalog["extended_class"] = rng.choice([0, 1, 2, 3, -9], n_sources).astype(np.int16)
    return {
        "image": image,
        "wcs_header": wcs.to_header(),
        "catalog": catalog,
        "pixel_scale_arcsec": 0.263,
        "zero_point": 30.0,
        "weight": np.full(image.shape, 0.04, dtype=np.float32),
        "mask": (rng.random(image.shape) < 0.01).astype(np.uint8),
    }


@pytest.fixture
def make_tile_data():
    """Factory for random, seeded ``write_tile`` keyword arguments (see ``_tile_data``)."""
    return _tile_data


@pytest.fixture(scope="module")
def cluster_client():
    """A real Dask LocalCluster (2 worker processes, 1 thread each) and its client."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as c,
        Client(c) as client,
    ):
        yield client


@pytest.fixture(scope="session")
def slurm():
    """A real single-node SLURM on localhost (started here if none answers; see slurm_fixture).

    The daemons stay up after the session for the next one (a concurrent session may use them).
    """
    from tests.slurm_fixture import SlurmUnavailable, ensure_slurm

    try:
        running = ensure_slurm()
    except SlurmUnavailable as exc:
        pytest.skip(str(exc))
    saved = os.environ.get("SLURM_CONF")
    os.environ.update(running.env())  # sbatch/squeue called by dask-jobqueue find it
    try:
        yield running
    finally:
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved
