"""Load test of ``lenscan serve`` on loopback: requests/s and latency for batches of stamps.

Starts the real service (``lenscan serve`` in a subprocess on a free 127.0.0.1 port), then, for
each batch size, sends a bounded number of ``POST /score`` requests (``.npy`` bodies of random
stamps of the model's shape) from ``--concurrency`` concurrent clients, and prints requests/s,
stamps/s, the p50 / p99 latency and the service's stamps/s as a fraction of the CNN alone
(measured first, in this process, on normalised stamps in memory). The run stops early at
``--time-limit`` seconds per batch size. Nothing leaves the machine.

With ``--attack`` it instead sends hostile JSON bodies (60 MB of empty lists, deep nesting,
huge numbers) in parallel with legitimate one-stamp requests, and prints the p50 / p99 of
``GET /health`` meanwhile, the server's peak RSS and what each request got (``run_attack``).

Usage: python benchmarks/bench_serve.py [--model default] [--batches 1 64] [--requests 200]
       [--concurrency 8] [--time-limit 60] [--batch-window-ms 5] [--torch-threads N]
       python benchmarks/bench_serve.py --attack [--big-mb 60] [--rounds 2] [--time-limit 60]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence

import httpx
import numpy as np


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def start_server(args: Sequence[str], *, timeout_s: float = 120.0) -> Iterator[str]:
    """Run ``lenscan serve ARGS`` on a free loopback port; yield its base URL; stop it after.

    The server's output goes to a temporary log that is printed if it fails to start.
    """
    with serve_process(args, timeout_s=timeout_s) as (base, _proc):
        yield base


@contextlib.contextmanager
def serve_process(
    args: Sequence[str], *, timeout_s: float = 120.0
) -> Iterator[tuple[str, subprocess.Popen]]:
    """:func:`start_server` that also yields the server process (to read its memory)."""
    for _attempt in range(3):
        port = free_port()
        log = open(_log_path(port), "w+b")  # noqa: SIM115
        cmd = [
            sys.executable,
            "-m",
            "lenscan.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            *args,
        ]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            if _wait_ready(proc, base, timeout_s):
                yield base, proc
                return
            log.seek(0)
            text = log.read().decode(errors="replace")
            if "address already in use" not in text.lower():
                raise RuntimeError(f"lenscan serve did not start ({' '.join(cmd)}):\n{text}")
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            log.close()
            with contextlib.suppress(OSError):
                os.unlink(log.name)
    raise RuntimeError("lenscan serve found no free port in 3 attempts")


def _log_path(port: int) -> str:
    import tempfile

    return os.path.join(tempfile.gettempdir(), f"lenscan-serve-{os.getpid()}-{port}.log")


def _wait_ready(proc: subprocess.Popen, base: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            if httpx.get(f"{base}/health", timeout=2.0).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"lenscan serve at {base} not ready after {timeout_s:.0f} s")


def npy_bytes(array: np.ndarray) -> bytes:
    """The ``.npy`` file of ``array``."""
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


async def _load(base: str, body: bytes, n_requests: int, concurrency: int, limit_s: float):
    latencies: list[float] = []
    errors: list[str] = []
    sent = 0
    start = time.perf_counter()

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal sent
        while sent < n_requests and time.perf_counter() - start < limit_s:
            sent += 1
            t0 = time.perf_counter()
            r = await http.post(
                "/score", content=body, headers={"content-type": "application/octet-stream"}
            )
            latencies.append(time.perf_counter() - t0)
            if r.status_code != 200:
                errors.append(f"{r.status_code}: {r.text[:200]}")

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=120.0, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return latencies, errors, time.perf_counter() - start


def run_load(
    base: str,
    stamp_shape: Sequence[int],
    *,
    stamps_per_request: int,
    n_requests: int,
    concurrency: int = 8,
    time_limit_s: float = 60.0,
    seed: int = 0,
) -> dict[str, float]:
    """Send up to ``n_requests`` scoring requests of ``stamps_per_request`` random stamps.

    Returns
    -------
    dict
        ``requests``, ``errors``, ``seconds``, ``requests_per_s``, ``stamps_per_s``,
        ``p50_ms``, ``p99_ms``, and ``first_error`` (empty when none failed).
    """
    rng = np.random.default_rng(seed)
    stamps = rng.normal(100.0, 5.0, (stamps_per_request, *stamp_shape)).astype(np.float32)
    body = npy_bytes(stamps)
    latencies, errors, wall = asyncio.run(_load(base, body, n_requests, concurrency, time_limit_s))
    ms = np.array(latencies) * 1000.0
    return {
        "requests": len(latencies),
        "errors": len(errors),
        "seconds": wall,
        "requests_per_s": len(latencies) / wall,
        "stamps_per_s": len(latencies) * stamps_per_request / wall,
        "p50_ms": float(np.percentile(ms, 50)) if ms.size else float("nan"),
        "p99_ms": float(np.percentile(ms, 99)) if ms.size else float("nan"),
        "first_error": errors[0] if errors else "",
    }


def model_only_rate(model_ref: str, shape: Sequence[int], *, n_stamps: int = 2048) -> float:
    """Stamps/s of the CNN alone on normalised stamps in memory (this process, same threads)."""
    from lenscan.models import DEFAULT_MODEL, load_model

    model = load_model(DEFAULT_MODEL if model_ref == "default" else model_ref)
    rng = np.random.default_rng(1)
    stamps = model.normalise(rng.normal(100.0, 5.0, (n_stamps, *shape)).astype(np.float32))
    model.score(stamps[:256], batch_size=256)  # warm-up
    t0 = time.perf_counter()
    model.score(stamps, batch_size=256)
    return n_stamps / (time.perf_counter() - t0)


# ---------------------------------------------------------------------- the service under attack
def hostile_bodies(*, big_mb: float = 60.0) -> dict[str, bytes]:
    """JSON bodies that starved the service before its limits (issue 18), by name.

    ``empty-lists``: ``big_mb`` MB of ``[],`` (20 M Python lists from 60 MB); ``deep``: 200 000
    nested arrays; ``huge-ints``: 2 000 integers of 5 000 digits (over Python's 4 300-digit
    limit); ``huge-floats``: 100 000 ``1e999999``.
    """
    n_lists = int(big_mb * 1e6) // 3
    digits = b"9" * 5000
    return {
        "empty-lists": b'{"stamps": [' + b"[]," * (n_lists - 1) + b"[]]}",
        "deep": b'{"stamps": ' + b"[" * 200_000 + b"]" * 200_000 + b"}",
        "huge-ints": b'{"stamps": [[[[' + b",".join([digits] * 2000) + b"]]]]}",
        "huge-floats": b'{"stamps": [[[[' + b",".join([b"1e999999"] * 100_000) + b"]]]]}",
    }


def _rss_mb(pid: int) -> tuple[float, float]:
    """(RSS now, peak RSS VmHWM) in MB of process ``pid`` and its children, summed."""
    import psutil

    now = peak = 0.0
    proc = psutil.Process(pid)
    for p in (proc, *proc.children(recursive=True)):
        with contextlib.suppress(psutil.Error, OSError):
            now += p.memory_info().rss / 2**20
            with open(f"/proc/{p.pid}/status") as fh:
                hwm = [line for line in fh if line.startswith("VmHWM:")]
            peak += int(hwm[0].split()[1]) / 1024 if hwm else 0.0
    return now, peak


_PROBE = """
import json, select, sys, time
import httpx
base, every, until = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
latency, failures = [], 0
with httpx.Client(base_url=base, timeout=60.0) as http:
    while time.monotonic() < until and not select.select([sys.stdin], [], [], 0)[0]:
        t0 = time.perf_counter()
        try:
            ok = http.get("/health").status_code == 200
        except httpx.TransportError:
            ok = False
        latency.append(time.perf_counter() - t0)
        failures += not ok
        time.sleep(every)
print(json.dumps({"latency": latency, "failures": failures}))
"""


@contextlib.contextmanager
def _probe(base: str, every_s: float, max_s: float = 600.0) -> Iterator[dict]:
    """GET /health every ``every_s`` from a process of its own (so that the attacking client's
    own work does not delay it) until the block ends; fills the yielded dict on exit."""
    until = time.monotonic() + max_s
    cmd = [sys.executable, "-c", _PROBE, base, str(every_s), str(until)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    out: dict = {}
    try:
        yield out
    finally:
        stdout, _ = proc.communicate(input="stop\n", timeout=120)
        out.update(json.loads(stdout))


def _sample_rss(pid: int, stop, every_s: float, out: list[float]) -> None:
    while not stop.is_set():
        out.append(_rss_mb(pid)[0])
        stop.wait(every_s)


def _percentiles(latency: list[float], name: str, every_s: float) -> dict[str, float]:
    """p50, p99, max in ms, corrected for coordinated omission: a probe that waited L stands
    for the probes due every ``every_s`` meanwhile, which would have waited L - k * every_s
    (otherwise one 20 s stall would count as a single slow sample)."""
    if not latency:
        return {f"{name}_{k}_ms": float("nan") for k in ("p50", "p99", "max")}
    lat = np.array(latency)
    missed = [lat[lat > every_s] - k * every_s for k in range(1, int(lat.max() / every_s) + 1)]
    ms = np.concatenate([lat, *(m[m > 0] for m in missed)]) * 1000.0
    return {
        f"{name}_p50_ms": float(np.percentile(ms, 50)),
        f"{name}_p99_ms": float(np.percentile(ms, 99)),
        f"{name}_max_ms": float(ms.max()),
    }


def _verdict(kind: str, r: httpx.Response | None, legit: bool) -> tuple[str, str | None]:
    """The status seen (or ``closed``), and why it breaks the service's promises (None: fine)."""
    if r is None:  # the server answered early and closed while the body was still going out
        return "closed", ("a legitimate request lost its connection" if legit else None)
    code = r.status_code
    if code == 503:
        return "503", (None if r.headers.get("retry-after") else f"{kind}: 503 without Retry-After")
    if code >= 500 or (legit and code != 200) or (not legit and code < 400):
        return str(code), f"{kind}: {code} {r.text[:160]}"
    return str(code), None


async def _attack(
    base: str,
    legit_big: bytes,
    bodies: dict[str, bytes],
    legit: dict[str, tuple[bytes, str]],
    *,
    rounds: int,
    legit_clients: int,
    legit_requests: int,
    limit_s: float,
) -> dict:
    statuses: dict[str, dict[str, int]] = {}
    broken: list[str] = []
    start = time.perf_counter()

    async def send(http: httpx.AsyncClient, kind: str, content, ctype: str, legit: bool) -> None:
        try:
            r = await http.post("/score", content=content, headers={"content-type": ctype})
        except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError):
            r = None
        seen, why = _verdict(kind, r, legit)
        statuses.setdefault(kind, {}).setdefault(seen, 0)
        statuses[kind][seen] += 1
        if why:
            broken.append(why)

    async def chunks(data: bytes):
        for k in range(0, len(data), 2**20):
            yield data[k : k + 2**20]

    async def big(http: httpx.AsyncClient) -> None:  # one huge body at a time
        for _ in range(rounds):
            if time.perf_counter() - start > limit_s:
                return
            body = bodies["empty-lists"]
            await send(http, "empty-lists", body, "application/json", False)
            await send(http, "empty-lists-streamed", chunks(body), "application/json", False)
            await send(http, "big-npy", legit_big, "application/octet-stream", True)

    async def small(http: httpx.AsyncClient) -> None:
        for _ in range(rounds):
            for kind in ("deep", "huge-ints", "huge-floats"):
                if time.perf_counter() - start > limit_s:
                    return
                await send(http, kind, bodies[kind], "application/json", False)

    async def client(http: httpx.AsyncClient) -> None:
        for k in range(legit_requests):
            if time.perf_counter() - start > limit_s:
                return
            kind = list(legit)[k % len(legit)]
            body, ctype = legit[kind]
            await send(http, kind, body, ctype, True)

    limits = httpx.Limits(max_connections=legit_clients + 4)
    async with httpx.AsyncClient(base_url=base, timeout=120.0, limits=limits) as http:
        await asyncio.gather(
            big(http), small(http), small(http), *(client(http) for _ in range(legit_clients))
        )
    return {"statuses": statuses, "broken": broken, "seconds": time.perf_counter() - start}


def run_attack(
    base: str,
    pid: int,
    stamp_shape: Sequence[int],
    *,
    big_mb: float = 60.0,
    big_npy_mb: float | None = None,
    rounds: int = 2,
    legit_clients: int = 4,
    legit_requests: int = 40,
    time_limit_s: float = 60.0,
    probe_every_s: float = 0.02,
    quiet_s: float = 3.0,
) -> dict:
    """Hostile bodies in parallel with legitimate requests, while a probe times ``/health``.

    Sends, concurrently: ``rounds`` x (``big_mb`` MB of empty lists with a Content-Length,
    then the same streamed in 1 MiB chunks, then a legitimate ``.npy`` of up to ``big_npy_mb``
    MB (default ``big_mb``) and 4096 stamps), one body at a time; two clients cycling
    ``rounds`` x the ``deep``, ``huge-ints`` and ``huge-floats`` bodies; ``legit_clients``
    clients each sending ``legit_requests`` one-stamp requests (.npy and JSON, in turn). No
    request starts after ``time_limit_s``. Meanwhile a process of its own GETs ``/health``
    every ``probe_every_s`` (and for ``quiet_s`` before the attack, the machine's own noise),
    and a thread samples the RSS of server process ``pid`` and its children.

    Returns
    -------
    dict
        ``health_p50_ms``, ``health_p99_ms``, ``health_max_ms`` (under attack; percentiles
        corrected for coordinated omission),
        ``quiet_p50_ms``, ``quiet_p99_ms``, ``quiet_max_ms`` (before it), ``probes``,
        ``probe_failures``; ``rss_before_mb``, ``rss_peak_mb`` (sampled, server and children),
        ``hwm_mb`` (their VmHWM at the end); ``statuses`` (kind -> status -> count; ``closed``:
        the server answered early and closed the connection); ``broken`` (answers that break
        the promises: a 5xx other than 503, a 503 without Retry-After, a legitimate request
        refused other than by 503, a hostile one accepted); ``seconds``.
    """
    import threading

    rng = np.random.default_rng(0)
    one = rng.normal(100.0, 5.0, (1, *stamp_shape)).astype(np.float32)
    legit = {
        "legit-npy": (npy_bytes(one), "application/octet-stream"),
        "legit-json": (json.dumps({"stamps": one.tolist()}).encode(), "application/json"),
    }
    bodies = hostile_bodies(big_mb=big_mb)
    # A legitimate .npy upload of up to big_npy_mb MB (at most 4096 stamps, the default limit).
    npy_mb = big_mb if big_npy_mb is None else big_npy_mb
    n_big = min(4096, int(npy_mb * 1e6) // (4 * int(np.prod(stamp_shape))))
    big = rng.normal(100.0, 5.0, (n_big, *stamp_shape)).astype(np.float32)
    before = _rss_mb(pid)[0]
    with _probe(base, probe_every_s) as quiet:  # the machine's own noise, no attack
        time.sleep(quiet_s)
    rss: list[float] = []
    stop = threading.Event()
    sampler = threading.Thread(target=_sample_rss, args=(pid, stop, 0.05, rss))
    sampler.start()
    try:
        with _probe(base, probe_every_s) as probe:
            out = asyncio.run(
                _attack(
                    base,
                    npy_bytes(big),
                    bodies,
                    legit,
                    rounds=rounds,
                    legit_clients=legit_clients,
                    legit_requests=legit_requests,
                    limit_s=time_limit_s,
                )
            )
    finally:
        stop.set()
        sampler.join()
    return {
        **out,
        **_percentiles(probe["latency"], "health", probe_every_s),
        **_percentiles(quiet["latency"], "quiet", probe_every_s),
        "probes": len(probe["latency"]),
        "probe_failures": probe["failures"] + quiet["failures"],
        "rss_before_mb": before,
        "rss_peak_mb": max(rss, default=before),
        "hwm_mb": _rss_mb(pid)[1],
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--time-limit", type=float, default=60.0)
    p.add_argument("--batch-window-ms", type=float, default=5.0)
    p.add_argument("--torch-threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--attack",
        action="store_true",
        help="instead: hostile bodies in parallel with legitimate requests, /health timed",
    )
    p.add_argument("--big-mb", type=float, default=60.0, help="size of the empty-lists body")
    p.add_argument("--rounds", type=int, default=2, help="rounds of hostile bodies")
    args = p.parse_args(argv)
    if args.attack:
        return attack_main(args)
    serve_args = [
        "--model",
        args.model,
        "--batch-window-ms",
        str(args.batch_window_ms),
        "--device",
        args.device,
    ]
    if args.torch_threads:
        serve_args += ["--torch-threads", str(args.torch_threads)]
    with start_server(serve_args) as base:
        info = httpx.get(f"{base}/models").json()[0]
        shape = (len(info["bands"]), info["stamp_size_pix"], info["stamp_size_pix"])
        print(
            f"model {info['name']} ({info['sha256'][:12]}), stamps {shape}, "
            f"{args.concurrency} concurrent clients, loopback, {os.cpu_count()} CPUs"
        )
        if args.torch_threads:
            import torch

            torch.set_num_threads(args.torch_threads)
        alone = model_only_rate(args.model, shape)
        print(f"CNN alone, in this process on stamps in memory: {alone:.0f} stamps/s")
        print(
            f"{'stamps/req':>10} {'requests':>8} {'req/s':>8} {'stamps/s':>9} "
            f"{'p50 ms':>8} {'p99 ms':>8} {'errors':>6} {'vs CNN':>6}"
        )
        for n in args.batches:
            run_load(
                base,
                shape,
                stamps_per_request=n,
                n_requests=min(10, args.requests),
                concurrency=args.concurrency,
                time_limit_s=args.time_limit,
            )  # warm-up
            before = httpx.get(f"{base}/health").json()
            r = run_load(
                base,
                shape,
                stamps_per_request=n,
                n_requests=args.requests,
                concurrency=args.concurrency,
                time_limit_s=args.time_limit,
            )
            after = httpx.get(f"{base}/health").json()
            batches = after["batches"] - before["batches"]
            print(
                f"{n:>10} {r['requests']:>8} {r['requests_per_s']:>8.1f} "
                f"{r['stamps_per_s']:>9.0f} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} "
                f"{r['errors']:>6} {r['stamps_per_s'] / alone:>6.2f}   ({batches} forward batches)"
            )
            if r["errors"]:
                print(f"  first error: {r['first_error']}")
    return 0


def attack_main(args: argparse.Namespace) -> int:
    """``--attack``: print /health latency under attack, peak memory, and what was answered."""
    serve_args = ["--model", args.model, "--device", args.device]
    if args.torch_threads:
        serve_args += ["--torch-threads", str(args.torch_threads)]
    with serve_process(serve_args) as (base, proc):
        info = httpx.get(f"{base}/models").json()[0]
        shape = (len(info["bands"]), info["stamp_size_pix"], info["stamp_size_pix"])
        r = run_attack(
            base,
            proc.pid,
            shape,
            big_mb=args.big_mb,
            rounds=args.rounds,
            time_limit_s=args.time_limit,
        )
    print(
        f"model {info['name']}, stamps {shape}, loopback, {os.cpu_count()} CPUs, "
        f"{r['seconds']:.1f} s of attack, {r['probes']} probes of /health"
    )
    print(
        f"/health under attack: p50 {r['health_p50_ms']:.1f} ms, p99 {r['health_p99_ms']:.1f} ms, "
        f"max {r['health_max_ms']:.1f} ms, {r['probe_failures']} failed"
    )
    print(
        f"/health before it (this machine's noise): p50 {r['quiet_p50_ms']:.1f} ms, "
        f"p99 {r['quiet_p99_ms']:.1f} ms, max {r['quiet_max_ms']:.1f} ms"
    )
    print(
        f"server RSS (with its children): {r['rss_before_mb']:.0f} MB before, "
        f"{r['rss_peak_mb']:.0f} MB peak sampled, VmHWM {r['hwm_mb']:.0f} MB"
    )
    for kind, seen in r["statuses"].items():
        print(f"  {kind:>22}: " + ", ".join(f"{k} x{v}" for k, v in sorted(seen.items())))
    for why in r["broken"][:10]:
        print(f"  broken: {why}")
    return 1 if r["broken"] else 0


if __name__ == "__main__":
    sys.exit(main())
