"""Requests and bytes per stamp from an object store: moto's S3 server on loopback (target 3).

Writes one 3-band float32 tile (128 px inner chunks in 2048 px shards, the default layout) to
``s3://`` on a moto server started here on 127.0.0.1, and reads the same DES-density stamps
(48 px) with

* ``lenscan``     ``read_stamps``: one ranged GET per touched shard index, one per run of
  touched inner chunks that lie back to back in a shard, concurrently;
* ``zarr/stamp``  zarr-python through its own ``FsspecStore``, one ``image[:, y0:y1, x0:x1]`` per
  stamp;

counting S3 ``GetObject`` calls and the bytes of their ranges on the s3fs client (botocore
events), and timing each. The last line gives the chunk GETs without and with adjacent
chunks merged, from the same plan (the reader merges them since issue 10).

Usage: python benchmarks/bench_object_store.py [--size 4096] [--stamps 300]
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import time

import boto3
import numpy as np
from _common import one_tile_store
from moto.server import ThreadedMotoServer

from lenscan.stamps import stamp_origins
from lenscan.survey import read_stamps

BANDS = ("g", "r", "i")
STAMP = 48
CHUNK, SHARD = 128, 2048


class Counter:
    """Counts GetObject calls and the bytes their Range headers ask for."""

    def __init__(self) -> None:
        self.requests = 0
        self.bytes = 0

    def __call__(self, params, **_kw) -> None:
        self.requests += 1
        rng = params.get("Range", "")
        if rng.startswith("bytes="):
            a, _, b = rng[6:].partition("-")
            if a and b:
                self.bytes += int(b) - int(a) + 1
            elif a == "" and b:
                self.bytes += int(b)


def coalesced_requests(x0, y0) -> tuple[int, int]:
    """(chunk GETs, GETs when runs of adjacent chunks in one shard row are merged), all bands."""
    chunks = set()
    for x, y in zip(x0, y0, strict=True):
        for r in range(y // CHUNK, (y + STAMP - 1) // CHUNK + 1):
            for c in range(x // CHUNK, (x + STAMP - 1) // CHUNK + 1):
                chunks.add((r, c))
    runs = 0
    per = SHARD // CHUNK
    for r, c in sorted(chunks):
        # Inner chunks are stored row-major in a shard: (r, c - 1) is the previous range.
        if not ((r, c - 1) in chunks and (c - 1) // per == c // per):
            runs += 1
    return len(chunks) * len(BANDS), runs * len(BANDS)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--stamps", type=int, default=300)
    p.add_argument("--quantise", type=float, default=None,
                   help="store the image quantised (write_tile(quantise=Q), as ingest stores "
                   "fpack-quantised DES files)")  # fmt: skip
    args = p.parse_args()
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    )
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
            Bucket="bench"
        )
        so = {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
        }
        url = "s3://bench/survey.zarr"
        rng = np.random.default_rng(0)
        image = rng.normal(0, 3, (len(BANDS), args.size, args.size)).astype(np.float32)
        tile = one_tile_store(url, image, BANDS, storage_options=so, crval=(0.0, 0.0),
                              chunk_pix=CHUNK, shard_pix=SHARD,
                              quantise=args.quantise)  # fmt: skip
        x = rng.uniform(STAMP, args.size - STAMP, args.stamps)
        y = rng.uniform(STAMP, args.size - STAMP, args.stamps)
        x0, y0 = (v.tolist() for v in stamp_origins(x, y, STAMP))
        read_stamps(tile, x[:2], y[:2], STAMP)  # connect the client
        fs = tile.image.store_path.store.fs
        rows = []
        for name, fn in (
            ("lenscan", lambda: read_stamps(tile, x, y, STAMP)),
            (
                "zarr/stamp",
                lambda: [
                    tile.image[:, b : b + STAMP, a : a + STAMP] for a, b in zip(x0, y0, strict=True)
                ],
            ),
        ):
            counter = Counter()
            fs.s3.meta.events.register("before-parameter-build.s3.GetObject", counter)
            t0 = time.perf_counter()
            fn()
            seconds = time.perf_counter() - t0
            fs.s3.meta.events.unregister("before-parameter-build.s3.GetObject", counter)
            rows.append((name, counter.requests, counter.bytes, seconds))
        plain, merged = coalesced_requests(x0, y0)
    finally:
        server.stop()
    stamp_bytes = len(BANDS) * STAMP * STAMP * 4
    n = args.stamps
    print(
        f"moto S3 on loopback, 3 x {args.size}^2 float32"
        f"{f' quantised (q={args.quantise:g})' if args.quantise else ''}, "
        f"{CHUNK} px chunks in {SHARD} px "
        f"shards, {n} stamps of {STAMP} px; load average "
        f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}"
    )
    print(
        f"{'reader':<12}{'GETs/stamp':>11}{'bytes/stamp':>13}{'/ stamp bytes':>14}{'stamps/s':>10}"
    )
    for name, req, nbytes, sec in rows:
        print(
            f"{name:<12}{req / n:>11.2f}{nbytes / n:>13.0f}{nbytes / n / stamp_bytes:>14.2f}"
            f"{n / sec:>10.0f}"
        )
    lens, zarr_row = rows[0], rows[1]
    print(
        f"lenscan / zarr: GETs {lens[1] / max(zarr_row[1], 1):.3f}, bytes "
        f"{lens[2] / max(zarr_row[2], 1):.3f}, stamps/s {zarr_row[3] / lens[3]:.1f}x"
    )
    print(
        f"chunk GETs per stamp {plain / n:.2f}; with adjacent chunks coalesced "
        f"{merged / n:.2f} ({merged / plain:.2f} of them)"
    )


if __name__ == "__main__":
    main()
