"""``lenscan serve`` end to end: the real server (uvicorn in a subprocess) over loopback HTTP.

One server runs for the module, with a small randomly initialised model and a synthetic survey
that a real scan (LocalCluster) has scored: the tests upload stamps in every accepted format,
send every kind of bad request, check that concurrent requests share forward passes, and score
the scan's own sources by sky position and by catalogue id, which must give the scan's scores.
"""

from __future__ import annotations

import asyncio
import importlib.util
import io
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from astropy.io import fits

from lenscan.models import load_model
from lenscan.simulate import make_survey
from lenscan.stamps import normalise_stamps
from lenscan.sweep import read_scored, scan
from tests.helpers import TINY_STAMP_PIX, make_tiny_model

pytestmark = pytest.mark.timeout(300)
S = TINY_STAMP_PIX
UPLOAD_LIMIT = 2**20  # --max-upload-mb 1


def _load_bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_serve.py"
    spec = importlib.util.spec_from_file_location("bench_serve", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_serve"] = module
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def survey_url(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("survey") / "survey.zarr")
    make_survey(
        url, n_tiles=2, seed=5, tile_size_pix=512, lenses_per_tile=6, galaxies_per_arcmin2=60.0
    )
    return url


@pytest.fixture(scope="module")
def scanned(survey_url, model_path, cluster_client, tmp_path_factory):
    """The scan's scored rows (every source that passed the cut, threshold 0)."""
    out = str(tmp_path_factory.mktemp("scan") / "run")
    scan(
        survey_url, out=out, model=model_path, threshold=0.0, client=cluster_client, progress=False
    )
    return read_scored(out)


@pytest.fixture(scope="module")
def server(model_path, survey_url):
    args = [
        "--model",
        model_path,
        "--survey",
        survey_url,
        "--max-upload-mb",
        "1",
        "--max-stamps",
        "300",
        "--max-positions",
        "500",
        "--batch-window-ms",
        "50",
        "--torch-threads",
        "1",
    ]
    with bench.start_server(args) as base:
        yield base


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server, timeout=60.0) as client:
        yield client


def _stamps(n, seed=0, bands=3, size=S):
    rng = np.random.default_rng(seed)
    return rng.normal(100.0, 5.0, (n, bands, size, size)).astype(np.float32)


def _fits_bytes(array):
    buf = io.BytesIO()
    fits.PrimaryHDU(array).writeto(buf)
    return buf.getvalue()


def test_health_models_and_openapi(http, model_path, survey_url):
    health = http.get("/health").json()
    assert health["status"] == "ok"
    assert health["models"] == ["tiny"]
    assert health["survey"] == survey_url and health["n_tiles"] == 2
    model = load_model(model_path)
    [info] = http.get("/models").json()
    assert info["name"] == "tiny" and info["default"] is True
    assert info["sha256"] == model.sha256
    assert info["bands"] == ["g", "r", "i"] and info["stamp_size_pix"] == S
    assert info["pixel_scale_arcsec"] == pytest.approx(0.263)
    assert info["normalisation"] == {"method": "asinh_mad", "softening_sigma": 3.0}
    assert info["n_members"] == 2 and info["recommended_threshold"] == 0.5
    assert {"training", "metrics", "lenscan_version", "format_version"} <= set(info)
    schema = http.get("/openapi.json").json()
    assert {"/health", "/models", "/score", "/score/positions"} <= set(schema["paths"])
    body = schema["paths"]["/score"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data", "application/octet-stream"} <= set(body)


def test_every_upload_format_gives_the_models_own_scores(http, model_path):
    stamps = _stamps(5)
    model = load_model(model_path)
    expected = model.score(normalise_stamps(stamps, model.meta.normalisation)).numpy()
    npy = bench.npy_bytes(stamps)
    responses = {
        "npy": http.post(
            "/score", content=npy, headers={"content-type": "application/octet-stream"}
        ),
        "multipart": http.post("/score", files={"file": ("stamps.npy", npy)}),
        "fits": http.post(
            "/score", content=_fits_bytes(stamps), headers={"content-type": "application/fits"}
        ),
        "fits-multipart": http.post("/score", files={"file": ("s.fits", _fits_bytes(stamps))}),
        "json": http.post("/score", json={"stamps": stamps.tolist()}),
    }
    for kind, r in responses.items():
        assert r.status_code == 200, (kind, r.text)
        doc = r.json()
        assert doc["model"] == "tiny" and doc["n"] == 5 and doc["sha256"] == model.sha256
        np.testing.assert_allclose(doc["member_scores"], expected, atol=1e-6, err_msg=kind)
        np.testing.assert_allclose(doc["score"], expected.mean(axis=1), atol=1e-6)
        assert doc["above_threshold"] == (expected.mean(axis=1) >= 0.5).tolist()


def test_bands_are_picked_by_name_and_one_stamp_is_a_batch(http, model_path):
    stamps = _stamps(2, seed=1)
    model = load_model(model_path)
    expected = model.score(normalise_stamps(stamps, model.meta.normalisation)).numpy()
    # Upload in z, i, g, r order: the service picks g, r, i.
    extra = _stamps(2, seed=9, bands=1)
    upload = np.concatenate([extra, stamps[:, [2, 0, 1]]], axis=1)
    r = http.post("/score", params={"bands": "z,i,g,r"}, content=bench.npy_bytes(upload))
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["member_scores"], expected, atol=1e-6)
    form = http.post(
        "/score", files={"file": ("s.npy", bench.npy_bytes(upload))}, data={"bands": "z,i,g,r"}
    )
    assert form.status_code == 200, form.text
    np.testing.assert_allclose(form.json()["member_scores"], expected, atol=1e-6)
    r = http.post("/score", params={"bands": "z,i,g"}, content=bench.npy_bytes(upload))
    assert r.status_code == 422 and "names 3 bands" in r.json()["detail"]
    r = http.post("/score", params={"bands": "z,i,g,y"}, content=bench.npy_bytes(upload))
    assert r.status_code == 422 and "missing ['r']" in r.json()["detail"]
    one = http.post("/score", content=bench.npy_bytes(stamps[0]))
    assert one.status_code == 200 and one.json()["n"] == 1
    np.testing.assert_allclose(one.json()["member_scores"][0], expected[0], atol=1e-6)


@pytest.mark.parametrize(
    ("make_body", "status", "words"),
    [
        (lambda: bench.npy_bytes(_stamps(2, bands=2)), 422, "3 bands ['g', 'r', 'i']"),
        (lambda: bench.npy_bytes(_stamps(2, size=S + 4)), 422, f"{S} x {S} px"),
        (
            lambda: bench.npy_bytes(np.where(_stamps(2) > 108, np.nan, _stamps(2))),
            422,
            "non-finite",
        ),
        (lambda: bench.npy_bytes(np.full((2, 3, S, S), np.inf)), 422, "non-finite"),
        (lambda: bench.npy_bytes(np.ones((301, 3, S, S), np.uint8)), 413, "at most"),
        (lambda: bench.npy_bytes(np.zeros((0, 3, S, S), np.float32)), 422, "no stamps"),
        (lambda: bench.npy_bytes(np.array(["a", "b"])), 422, "real numbers"),
        (lambda: b"not a file at all", 400, "neither a .npy file"),
        (lambda: bench.npy_bytes(_stamps(2))[:200], 400, "not a readable .npy"),
        (lambda: _fits_bytes(_stamps(2))[:4000], 400, "truncated"),
        (lambda: b"SIMPLE  =" + b"x" * 3000, 400, "not a readable FITS"),
        (lambda: b"x" * (UPLOAD_LIMIT + 1), 413, "larger than the limit"),
    ],
)
def test_bad_uploads_get_a_4xx_with_a_message(http, make_body, status, words):
    r = http.post("/score", content=make_body())
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]


def test_more_bad_requests_and_the_service_keeps_serving(http):
    def streamed():  # no Content-Length: the limit applies while the body streams in
        for _ in range(12):
            yield b"y" * 100_000

    assert http.post("/score", content=streamed()).status_code == 413
    header = b"{'descr': '<f8', 'fortran_order': False, 'shape': (100000, 3, 32, 32), }"
    huge = (b"\x93NUMPY\x01\x00v\x00" + header).ljust(127, b" ") + b"\n"
    r = http.post("/score", content=huge)
    assert r.status_code == 413 and "declares an array" in r.json()["detail"]
    r = http.post("/score", json={"stamps": [[[1, 2], [3]]]})
    assert r.status_code == 422 and "equal lengths" in r.json()["detail"]
    r = http.post("/score", json={"stamps": [], "colour": 1})
    assert r.status_code == 422 and "unknown JSON fields ['colour']" in r.json()["detail"]
    r = http.post("/score", content=b"{", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["detail"]
    deep = b'{"stamps": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = http.post("/score", content=deep, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "nested too deeply" in r.json()["detail"]
    r = http.post("/score", json={"stamps": [[[[[1.0]]]]]})
    assert r.status_code == 422 and "5 dimensions" in r.json()["detail"]
    r = http.post("/score", json={"stamps": [[[[[[[[1.0]]]]]]]]})
    assert r.status_code == 400 and "nested too deeply (9 levels" in r.json()["detail"]
    r = http.post("/score", content=b"abc", headers={"content-type": "text/plain"})
    assert r.status_code == 415
    r = http.post("/score", files={"other": ("x.npy", b"123")})
    assert r.status_code == 400 and 'field named "file"' in r.json()["detail"]
    r = http.post("/score", params={"model": "nope"}, content=bench.npy_bytes(_stamps(1)))
    assert r.status_code == 404 and "serves ['tiny']" in r.json()["detail"]
    r = http.post("/score/positions", json={"positions": [[10.0, 10.0]]})
    assert r.status_code == 422 and "outside every tile" in r.json()["detail"]
    r = http.post("/score/positions", json={"ids": [-12345]})
    assert r.status_code == 422 and "[-12345] are not in the catalogue" in r.json()["detail"]
    r = http.post("/score/positions", json={"positions": [[40.0, -30.0]], "ids": [1]})
    assert r.status_code == 422 and "either" in r.json()["detail"]
    r = http.post("/score/positions", json={"positions": [[40.0, 95.0]]})
    assert r.status_code == 422  # dec beyond the pole: refused by the schema
    r = http.post("/score/positions", json={"positions": [[40.0, -30.0]] * 501})
    assert r.status_code == 413 and "at most 500" in r.json()["detail"]
    r = http.post("/score/positions", json={"ids": [1], "tile": "nowhere"})
    assert r.status_code == 422 and "'nowhere' is not a complete tile" in r.json()["detail"]
    assert http.get("/health").json()["status"] == "ok"
    assert http.post("/score", content=bench.npy_bytes(_stamps(1))).status_code == 200


def test_concurrent_requests_share_forward_passes(server, model_path):
    stamps = _stamps(16, seed=3)
    model = load_model(model_path)
    expected = model.score(normalise_stamps(stamps, model.meta.normalisation)).numpy()
    before = httpx.get(f"{server}/health").json()

    async def all_at_once():
        async with httpx.AsyncClient(base_url=server, timeout=60.0) as client:
            return await asyncio.gather(
                *(client.post("/score", content=bench.npy_bytes(stamps[k])) for k in range(16))
            )

    responses = asyncio.run(all_at_once())
    after = httpx.get(f"{server}/health").json()
    for k, r in enumerate(responses):
        assert r.status_code == 200
        np.testing.assert_allclose(r.json()["member_scores"][0], expected[k], atol=1e-6)
    assert after["requests_scored"] - before["requests_scored"] == 16
    assert after["batches"] - before["batches"] < 16  # several requests per forward pass


def _sample(scanned, n=40):
    """Scan rows to re-score: every edge stamp (up to 10) and the rest at random."""
    rng = np.random.default_rng(0)
    edge = np.flatnonzero(scanned["edge"])[:10]
    rest = rng.choice(np.flatnonzero(~scanned["edge"]), n - edge.size, replace=False)
    return scanned[np.concatenate([edge, rest])]


def _check_against_scan(results, scanned_rows, by_key):
    members = [c for c in scanned_rows.colnames if c.startswith("score_m")]
    for res in results:
        row = by_key(res)
        assert res["edge"] == bool(row["edge"])
        assert res["x"] == pytest.approx(row["x"], abs=1e-6)
        assert res["y"] == pytest.approx(row["y"], abs=1e-6)
        assert res["score"] == pytest.approx(float(row["score"]), abs=1e-5)
        assert res["member_scores"] == pytest.approx([float(row[m]) for m in members], abs=1e-5)


def test_positions_and_ids_give_the_scans_scores(http, scanned):
    rows = _sample(scanned)
    assert rows["edge"].any() and len(rows) == 40
    index = {(str(r["tile"]), int(r["id"])): r for r in scanned}
    by_pos = {(str(r["tile"]), float(r["ra"]), float(r["dec"])): r for r in scanned}

    pairs = [[float(a), float(d)] for a, d in zip(rows["ra"], rows["dec"], strict=True)]
    r = http.post("/score/positions", json={"positions": pairs})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 40
    _check_against_scan(results, rows, lambda res: by_pos[(res["tile"], res["ra"], res["dec"])])

    r = http.post("/score/positions", json={"ids": [int(i) for i in rows["id"]]})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [res["id"] for res in results] == [int(i) for i in rows["id"]]
    _check_against_scan(results, rows, lambda res: index[(res["tile"], res["id"])])

    # Restricted to one tile's catalogue, every id is cut from that tile.
    tile = str(rows["tile"][0])
    ids = [int(i) for i in scanned["id"][scanned["tile"] == tile][:5]]
    r = http.post("/score/positions", json={"ids": ids, "tile": tile})
    assert r.status_code == 200, r.text
    assert {res["tile"] for res in r.json()["results"]} == {tile}
    _check_against_scan(r.json()["results"], rows, lambda res: index[(res["tile"], res["id"])])


def test_load_test_runs_bounded_on_loopback(server):
    for n, count in ((1, 16), (64, 4)):
        figures = bench.run_load(
            server,
            (3, S, S),
            stamps_per_request=n,
            n_requests=count,
            concurrency=4,
            time_limit_s=60.0,
        )
        assert figures["errors"] == 0, figures["first_error"]
        assert figures["requests"] == count
        assert 0 < figures["p50_ms"] <= figures["p99_ms"]
        assert figures["stamps_per_s"] == pytest.approx(figures["requests_per_s"] * n)


def test_container_entrypoint_serves_behind_a_root_path(model_path, survey_url):
    """cluster/serve-entrypoint.sh, run as the image runs it (settings from the environment)."""
    script = Path(__file__).resolve().parents[1] / "cluster" / "serve-entrypoint.sh"
    port = bench.free_port()
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "LENSCAN_MODELS": f"{model_path} lenscan-des-v1",
        "LENSCAN_SURVEY": survey_url,
        "LENSCAN_STORAGE_OPTIONS": "{}",
        "LENSCAN_ROOT_PATH": "/lenscan",
        "LENSCAN_MAX_UPLOAD_MB": "2",
        "LENSCAN_MAX_STAMPS": "3",  # every limit of `lenscan serve` has its variable
    }
    proc = subprocess.Popen(["sh", str(script), "--log-level", "warning"], env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        assert bench._wait_ready(proc, base, 120.0), "the entrypoint's server did not start"
        health = httpx.get(f"{base}/health").json()
        assert health["models"] == ["tiny", "lenscan-des-v1"] and health["n_tiles"] == 2
        # Behind a proxy that strips /lenscan, the schema advertises the public prefix.
        schema = httpx.get(f"{base}/openapi.json").json()
        assert schema["servers"] == [{"url": "/lenscan"}]
        r = httpx.post(
            f"{base}/score",
            params={"model": "lenscan-des-v1"},
            content=bench.npy_bytes(_stamps(2, size=48)),
        )
        assert r.status_code == 200 and r.json()["model"] == "lenscan-des-v1"
        assert httpx.post(f"{base}/score", content=b"x" * (2 * 2**20 + 1)).status_code == 413
        r = httpx.post(f"{base}/score", content=bench.npy_bytes(_stamps(4, size=48)))
        assert r.status_code == 413 and "send fewer stamps per request" in r.text  # 4 > 3
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--survey", "{tmp}/nowhere.zarr"], "nowhere.zarr is not a lenscan survey"),
        (["--model", "{wide}", "--survey", "{survey}"], "trained at 0.5 arcsec/pixel"),
        (["--model", "no-such-model"], "no model named 'no-such-model'"),
        (["--max-upload-mb", "0"], "--max-upload-mb must be > 0"),
        (["--max-upload-mb", "8", "--max-inflight-mb", "4"], "must be at least max_upload_bytes"),
        (["--max-json-stamps", "0"], "max_json_stamps must be a positive integer"),
        (["--storage-options", "{{not json"], "--storage-options is not valid JSON"),
    ],
)
def test_serve_refuses_bad_settings_before_it_starts(extra, words, survey_url, tmp_path, capsys):
    from lenscan.cli import main

    wide = make_tiny_model(tmp_path / "wide", pixel_scale=0.5)
    args = [a.format(tmp=tmp_path, wide=wide, survey=survey_url) for a in extra]
    assert main(["serve", "--port", str(bench.free_port()), *args]) == 2
    assert words in capsys.readouterr().err
