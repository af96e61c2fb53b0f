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

#: Bucket created on the test S3 server (and on the GCS emulator; Azure: a container).
S3_BUCKET = "lenscan-test"
GCS_BUCKET = AZURE_CONTAINER = S3_BUCKET


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(autouse=True)
def _isolate_cli_logging() -> Iterator[None]:
    """Undo what ``lenscan.cli.main`` sets for its whole process when a test calls it in-process.

    The command quiets Dask through ``DASK_LOGGING__DISTRIBUTED`` (inherited by the workers it
    starts); left set, later tests' SLURM jobs and workers would log nothing at INFO.
    """
    import dask.config

    saved_env = os.environ.get("DASK_LOGGING__DISTRIBUTED")
    saved_config = dask.config.get("logging.distributed", default=None)
    saved_levels = {n: logging.getLogger(n).level for n in ("distributed", "lenscan")}
    yield
    if saved_env is None:
        os.environ.pop("DASK_LOGGING__DISTRIBUTED", None)
    else:
        os.environ["DASK_LOGGING__DISTRIBUTED"] = saved_env
    if saved_config is not None:
        dask.config.set({"logging.distributed": saved_config})
    for name, level in saved_levels.items():
        logging.getLogger(name).setLevel(level)


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


def _restore_env(saved: dict[str, str | None]) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _gcs_emulator_serves_suffix_ranges(server_mod: Any) -> None:
    """Teach gcp-storage-emulator the suffix byte ranges (``bytes=-N``) that GCS serves.

    The emulator answers them with the whole object; zarr reads a shard's index that way.
    """
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    def download(request, response, storage, *args, **kwargs):
        rng = (request.get_header("range", None) or "").strip()
        if rng.startswith("bytes=-"):
            try:
                obj = storage.get_file_obj(
                    request.params["bucket_name"], request.params["object_id"]
                )
            except NotFound:
                obj = None  # the emulator's own handler answers 404
            if obj is not None:
                start = max(0, int(obj["size"]) - int(rng[len("bytes=-") :]))
                plain = request.get_header
                request.get_header = lambda k, d=None: (
                    f"bytes={start}-" if k.lower() == "range" else plain(k, d)
                )
        return objects.download(request, response, storage, *args, **kwargs)

    for _, handlers in server_mod.HANDLERS:
        for method, handler in list(handlers.items()):
            if handler is objects.download:
                handlers[method] = download


def _gcs_emulator_accepts_a_burst(server_mod: Any) -> None:
    """Give the emulator's listening socket a backlog of 128 (``http.server``'s default is 5).

    A burst of concurrent requests (``fs.put`` of a store, a sweep's workers) overflowed it, and
    each dropped connection waited for a SYN retry (1 s, then 3 s ...): putting a 169-file
    survey took 60 s instead of under one.
    """
    import http.server
    from functools import partial

    class Backlogged(http.server.HTTPServer):
        request_queue_size = 128

    class APIThread(server_mod.APIThread):
        def run(self) -> None:
            handler = partial(server_mod.RequestHandler, self._storage)
            self._httpd = Backlogged((self._host, self._port), handler)
            self.is_running.set()
            self._httpd.serve_forever()

    if not getattr(server_mod.APIThread, "backlogged", False):
        APIThread.backlogged = True  # type: ignore[attr-defined]
        server_mod.APIThread = APIThread


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[tuple[str, dict[str, Any]]]:
    """A GCS JSON API on 127.0.0.1 (gcp-storage-emulator, in memory), bucket ``lenscan-test``.

    Yields ``(endpoint_url, storage_options)``. The endpoint reaches gcsfs, here and in worker
    processes, through ``STORAGE_EMULATOR_HOST`` in the environment.
    """
    server_mod = pytest.importorskip("gcp_storage_emulator.server")
    port = _free_port()
    env = {
        "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}",
        # gcsfs asks a gRPC control plane for each bucket's layout by default (60 s timeout
        # per call against an emulator that has none).
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    pytest.importorskip("gcsfs")
    _gcs_emulator_serves_suffix_ranges(server_mod)
    _gcs_emulator_accepts_a_burst(server_mod)
    logging.getLogger("gcp_storage_emulator").setLevel(logging.ERROR)
    server = server_mod.create_server("127.0.0.1", port, in_memory=True, default_bucket=GCS_BUCKET)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}", {"token": "anon"}
    finally:
        server.stop()
        _restore_env(saved)


#: Azurite's well-known development account (the same on every machine; not a secret).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


@pytest.fixture(scope="session")
def azure_server(tmp_path_factory) -> Iterator[tuple[str, dict[str, Any]]]:
    """Azure Blob storage on 127.0.0.1 (azurite, from npm), container ``lenscan-test``.

    Yields ``(blob_endpoint, storage_options)``. The account key reaches adlfs, here and in
    worker processes, only through ``AZURE_STORAGE_CONNECTION_STRING`` in the environment.
    """
    import shutil
    import subprocess
    import time

    pytest.importorskip("adlfs")
    azurite = shutil.which("azurite-blob")
    if azurite is None:
        pytest.skip("azurite-blob not found (npm install -g azurite; .ci/run installs it)")
    port = _free_port()
    proc = subprocess.Popen(
        [azurite, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location",
         str(tmp_path_factory.mktemp("azurite")), "--silent", "--skipApiVersionCheck", "--loose"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"azurite did not start on port {port}")
            time.sleep(0.1)
    endpoint = f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}"
    saved = {"AZURE_STORAGE_CONNECTION_STRING": os.environ.get("AZURE_STORAGE_CONNECTION_STRING")}
    os.environ["AZURE_STORAGE_CONNECTION_STRING"] = (
        f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};"
        f"AccountKey={AZURITE_KEY};BlobEndpoint={endpoint};"
    )
    try:
        import fsspec

        fsspec.filesystem("az").mkdir(AZURE_CONTAINER)
        yield endpoint, {}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        _restore_env(saved)
