"""``lenscan serve`` under hostile load: bounded memory, /health answering, 503 when saturated.

Real servers (uvicorn subprocesses on 127.0.0.1, the tiny model): one with the default limits
attacked by the bodies of issue 18 in parallel with legitimate clients
(``benchmarks/bench_serve.py::run_attack``), one with tight limits to reach each bound on
purpose. The pure byte checks of :mod:`lenscan.serve.jsonbody` are tested without a server.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import psutil
import pytest

from tests.helpers import TINY_STAMP_PIX, make_tiny_model
from tests.test_serve import bench

pytestmark = pytest.mark.timeout(300)
S = TINY_STAMP_PIX


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


def _npy(n, seed=0, size=S):
    rng = np.random.default_rng(seed)
    return bench.npy_bytes(rng.normal(100.0, 5.0, (n, 3, size, size)).astype(np.float32))


def _json(n, seed=0):
    rng = np.random.default_rng(seed)
    return json.dumps({"stamps": rng.normal(100.0, 5.0, (n, 3, S, S)).tolist()}).encode()


def test_hostile_bodies_leave_health_answering_and_memory_bounded(model_path):
    """Issue 18: 60 MB of empty lists, deep nesting and huge numbers, sent in parallel with
    legitimate requests, neither stall /health nor grow the server, and get a 4xx each.

    Before the fix: /health p99 24-40 s (json.loads on the event loop), VmHWM +2.1 GB, and a 500
    for integers over Python's 4300-digit limit.
    """
    with bench.serve_process(["--model", model_path, "--torch-threads", "1"]) as (base, proc):
        r = bench.run_attack(
            base,
            proc.pid,
            (3, S, S),
            big_mb=60.0,
            big_npy_mb=8.0,  # legitimate work costs memory too: keep it small here
            rounds=2,
            legit_clients=4,
            legit_requests=20,
            time_limit_s=30.0,
        )
        assert proc.poll() is None, "the server died under attack"
    figures = {k: r[k] for k in r if k not in ("statuses", "broken")}
    grown, peak = r["rss_peak_mb"] - r["rss_before_mb"], r["hwm_mb"] - r["rss_before_mb"]
    # The goal is p99 < 100 ms (docs/service.md has the figures); a shared 2-core CI box gets
    # slack, still two orders of magnitude below the old stall.
    problems = [
        *r["broken"][:5],
        *([f"{r['probe_failures']} /health probes failed"] if r["probe_failures"] else []),
        *([f"/health p50 {r['health_p50_ms']:.0f} ms"] if r["health_p50_ms"] >= 100 else []),
        *([f"/health p99 {r['health_p99_ms']:.0f} ms"] if r["health_p99_ms"] >= 400 else []),
        *([f"RSS grew {grown:.0f} MB"] if grown >= 500 else []),
        *([f"VmHWM {peak:.0f} MB over the start"] if peak >= 600 else []),
    ]
    assert problems == [], (problems, figures, r["statuses"])
    seen = r["statuses"]
    assert seen["empty-lists"] == {"413": 2} and seen["empty-lists-streamed"] == {"413": 2}
    assert set(seen["deep"]) == {"400"} and set(seen["huge-ints"]) == {"400"}
    assert set(seen["huge-floats"]) == {"422"}
    for kind in ("legit-npy", "legit-json"):
        assert seen[kind].get("200", 0) >= 5, seen[kind]
    assert seen["big-npy"].get("200", 0) >= 1, seen["big-npy"]


@pytest.fixture(scope="module")
def tight(model_path):
    """A server whose bounds are small enough to reach: 2 requests / 1.5 MiB in flight, a
    JSON body of at most 4 stamps, 50 positions; every scoring request waits 3 s for its
    batch, so requests overlap."""
    args = [
        "--model",
        model_path,
        "--max-upload-mb",
        "1",
        "--max-inflight",
        "2",
        "--max-inflight-mb",
        "1.5",
        "--max-json-stamps",
        "4",
        "--max-positions",
        "50",
        "--batch-window-ms",
        "3000",
        "--torch-threads",
        "1",
    ]
    with bench.serve_process(args) as (base, proc):
        yield base, proc


async def _together(base, bodies, probe=False):
    """POST every body to /score at once (and time /health while they are held)."""
    async with httpx.AsyncClient(base_url=base, timeout=60.0) as http:
        posts = [http.post("/score", content=b) for b in bodies]

        async def health():  # poll until the scoring requests are held; the slowest answer
            clock, held, slowest = asyncio.get_running_loop().time, 0, 0.0
            deadline = clock() + 2.5
            while clock() < deadline and held < 2:
                t0 = clock()
                held = max(held, (await http.get("/health")).json()["in_flight"])
                slowest = max(slowest, clock() - t0)
                await asyncio.sleep(0.05)
            return held, slowest

        return await asyncio.gather(*posts, *([health()] if probe else []))


def test_saturated_service_answers_503_with_retry_after(tight):
    base, _ = tight
    before = httpx.get(f"{base}/health").json()["refused_busy"]
    *answers, (held, slowest) = asyncio.run(
        _together(base, [_npy(1, k) for k in range(6)], probe=True)
    )
    codes = sorted(r.status_code for r in answers)
    assert codes == [200, 200, 503, 503, 503, 503], [r.text[:100] for r in answers]
    for r in answers:
        if r.status_code == 503:
            assert r.headers["retry-after"] == "1" and "busy" in r.json()["detail"]
    assert held == 2 and slowest < 1.0  # /health is never queued behind scoring
    assert httpx.get(f"{base}/health").json()["refused_busy"] - before == 4
    # Bytes bound: two bodies of 0.9 MB do not fit in 1.5 MiB, whatever the request count.
    big = _npy(70, size=S)  # 70 x 3 x 32 x 32 float32 = 860 kB
    answers = asyncio.run(_together(base, [big, big]))
    assert sorted(r.status_code for r in answers) == [200, 503]


def test_json_bodies_are_bounded_by_the_stamp_count(tight):
    base, _ = tight
    ok = httpx.post(f"{base}/score", content=_json(4), headers={"content-type": "application/json"})
    assert ok.status_code == 200 and ok.json()["n"] == 4
    r = httpx.post(f"{base}/score", content=_json(5), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "JSON values" in r.json()["detail"]
    limit = 4 * 3 * S * S * 32 + 2**16  # stamps x bands x S^2 x bytes per number, + 64 KiB
    pad = b'{"stamps": [[[[1]]]], "model": "' + b"x" * limit + b'"}'
    r = httpx.post(f"{base}/score", content=pad, headers={"content-type": "application/json"})
    assert r.status_code == 413 and f"limit of {limit} bytes" in r.json()["detail"]
    # Streamed (no Content-Length): cut off at the same limit as it arrives.
    r = httpx.post(
        f"{base}/score",
        content=iter([pad[k : k + 65536] for k in range(0, len(pad), 65536)]),
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413 and f"limit of {limit} bytes" in r.json()["detail"]


def test_position_bodies_are_checked_before_they_are_parsed(tight):
    base, _ = tight
    flood = b'{"positions": [' + b"[]," * 20_000 + b"[]]}"
    r = httpx.post(
        f"{base}/score/positions", content=flood, headers={"content-type": "application/json"}
    )
    assert r.status_code == 413 and "JSON arrays" in r.json()["detail"]
    streamed = iter([flood[k : k + 8192] for k in range(0, len(flood), 8192)] * 2)
    r = httpx.post(
        f"{base}/score/positions", content=streamed, headers={"content-type": "application/json"}
    )
    assert r.status_code == 413 and "larger than the limit" in r.json()["detail"]
    r = httpx.post(f"{base}/score/positions", json={"positions": [["a"]] * 200})
    detail = r.json()["detail"]
    assert r.status_code == 422 and len(detail) == 21 and "more errors" in detail[-1]["msg"]


def test_a_dead_parser_process_costs_one_503(tight):
    base, proc = tight
    workers = [
        p
        for p in psutil.Process(proc.pid).children(recursive=True)
        if "spawn_main" in " ".join(p.cmdline())
    ]
    assert len(workers) == 1, [p.cmdline() for p in workers]
    workers[0].kill()
    workers[0].wait(10)
    headers = {"content-type": "application/json"}
    r = httpx.post(f"{base}/score", content=_json(1), headers=headers, timeout=60)
    assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
    r = httpx.post(f"{base}/score", content=_json(1), headers=headers, timeout=60)
    assert r.status_code == 200, r.text


def test_json_checks_look_at_bytes_only():
    from lenscan.serve.errors import InputError
    from lenscan.serve.jsonbody import check_body, parse_stamps_body, stamp_limits

    limits = stamp_limits(2, 3, 4, max_bytes=2**20)
    assert limits.max_numbers == 2 * 3 * 16
    assert limits.max_bytes == 2 * 3 * 16 * 32 + 2**16
    good = json.dumps({"stamps": np.ones((2, 3, 4, 4)).tolist(), "model": "m[,:{"}).encode()
    arr, model, bands = parse_stamps_body(good, limits)
    assert arr.shape == (2, 3, 4, 4) and model == "m[,:{" and bands is None
    cases = [
        (b'{"stamps": ' + b"[" * 7 + b"]" * 7 + b"}", 400, "nested too deeply (8 levels"),
        (b'{"stamps": [' + b"[]," * 2000 + b"[]]}", 413, "JSON arrays"),
        (b'{"stamps": [[[[' + b"0," * 2000 + b"0]]]]}", 413, "JSON values"),
        (b'{"stamps": [[[[' + b"9" * 5000 + b"]]]]}", 400, "not valid JSON"),
        (b"x" * (limits.max_bytes + 1), 413, "larger than the limit"),
    ]
    for body, status, words in cases:
        with pytest.raises(InputError) as info:
            parse_stamps_body(body, limits)
        assert info.value.status == status and words in info.value.message, body[:40]
    with pytest.raises(InputError):
        check_body(b"[" * 100, limits)
    # A refusal crosses the process boundary with its status.
    import pickle

    again = pickle.loads(pickle.dumps(InputError("no", 413)))
    assert (again.message, again.status) == ("no", 413)
