"""Load test of ``lenscan serve`` on loopback: requests/s and latency for batches of stamps.

Starts the real service (``lenscan serve`` in a subprocess on a free 127.0.0.1 port), then, for
each batch size, sends a bounded number of ``POST /score`` requests (``.npy`` bodies of random
stamps of the model's shape) from ``--concurrency`` concurrent clients, and prints requests/s,
stamps/s, the p50 / p99 latency and the service's stamps/s as a fraction of the CNN alone
(measured first, in this process, on normalised stamps in memory). The run stops early at
``--time-limit`` seconds per batch size. Nothing leaves the machine.

Usage: python benchmarks/bench_serve.py [--model default] [--batches 1 64] [--requests 200]
       [--concurrency 8] [--time-limit 60] [--batch-window-ms 5] [--torch-threads N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
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
                yield base
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
    args = p.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
