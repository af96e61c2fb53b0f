"""The data path per core at DES density, side by side with zarr-python and tensorstore (target 2).

Writes one 3-band float32 tile of sky noise per layout (inner chunk side x shard side, raw or
zstd) to a local store and reads the same DES-density stamps (800 per 10000^2 px, 48 px) with

* ``lenscan``    ``read_stamps`` (the direct byte-range engine, each touched chunk read once),
* ``zarr/stamp`` zarr-python, one ``image[:, y0:y1, x0:x1]`` call per stamp,
* ``tensorstore`` the ``zarr3`` driver, one read per stamp, all issued at once (if installed:
  ``pip install -e '.[bench]'``),

pinned to one core (``os.sched_setaffinity``), so stamps/s is a per-core figure. ``warm`` reads
with the store in the page cache (best of 3); ``cold`` first drops the store's files from the
page cache with ``posix_fadvise(DONTNEED)`` (only this benchmark's files). ``bytes/stamp`` is
what lenscan reads (touched inner chunks plus shard indexes) over the stamp bytes.

Usage: python benchmarks/bench_data_path.py [--size 8192] [--layouts 32:2048,64:2048,128:2048]
       [--cores 0] [--json FILE]
(a layout ``CHUNK:SHARD:q16`` is a quantised image, which tensorstore cannot read; bytes/stamp
counts decoded bytes.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import one_tile_store

from lenscan.stamps import stamp_origins
from lenscan.survey import open_survey, read_stamps

BANDS = ("g", "r", "i")
STAMP = 48


def build(path: Path, image: np.ndarray, chunk: int, shard: int, codec: str) -> None:
    """One tile; ``codec`` "none", "zstd" or "q16" (quantised at sigma / 16, as ingest stores
    fpack-quantised DES files)."""
    layout = {"quantise": 16.0} if codec == "q16" else {"codec": codec}
    one_tile_store(str(path), image, BANDS, chunk_pix=chunk, shard_pix=shard, **layout)


def drop_cache(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def per_stamp(tile, x0, y0) -> None:
    for k in range(len(x0)):
        tile.image[:, y0[k] : y0[k] + STAMP, x0[k] : x0[k] + STAMP]


def tensorstore_reader(path: Path):
    try:
        import tensorstore as ts
    except ImportError:
        return None
    try:
        arr = ts.open(
            {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path / "tiles/t/image")}},
            read=True,
        ).result()
    except ValueError:  # a codec tensorstore lacks (numcodecs.fixedscaleoffset: quantised)
        return None

    def read(x0, y0) -> None:
        futs = [arr[:, y : y + STAMP, x : x + STAMP].read() for x, y in zip(x0, y0, strict=True)]
        for f in futs:
            f.result()

    return read


def bytes_ratio(tile, x0, y0, chunk: int, shard: int) -> float:
    """Bytes lenscan reads (touched chunks + one index per touched shard) / stamp bytes."""
    chunks, shards = set(), set()
    for x, y in zip(x0, y0, strict=True):
        for r in range(y // chunk, (y + STAMP - 1) // chunk + 1):
            for c in range(x // chunk, (x + STAMP - 1) // chunk + 1):
                chunks.add((r, c))
                shards.add((r * chunk // shard, c * chunk // shard))
    per_index = 16 * (shard // chunk) ** 2 + 4
    read = len(BANDS) * (len(chunks) * chunk * chunk * 4 + len(shards) * per_index)
    return read / (len(x0) * len(BANDS) * STAMP * STAMP * 4)


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def scan_read(root: Path, image: np.ndarray, x: np.ndarray, y: np.ndarray) -> dict:
    """``read_model_stamps`` (image + what masks it) of a tile with a weight and no mask: through
    its ``zero_weight`` plane, and through the float weights (the tile with ``zero_weight`` left
    out of its ``arrays``, as stores written before it read). 128 px chunks, 2048 px shards."""
    import json as _json

    from lenscan.survey import read_model_stamps

    weight = np.full(image.shape, 1 / 9.0, np.float32)
    weight[:, : image.shape[1] // 8, : image.shape[2] // 8] = 0.0  # a corner without data
    path = root / "scan-read.zarr"
    one_tile_store(str(path), image, BANDS, chunk_pix=128, shard_pix=2048, weight=weight)
    out = {}
    for plane in ("zero_weight", "weight"):
        if plane == "weight":
            meta_path = path / "tiles/t/zarr.json"
            meta = _json.loads(meta_path.read_text())
            meta["attributes"]["lenscan_tile"]["arrays"].remove("zero_weight")
            meta_path.write_text(_json.dumps(meta))
        tile = open_survey(path).tile("t")
        fn = lambda t=tile: read_model_stamps(t, x, y, STAMP, bands=BANDS)  # noqa: E731
        drop_cache(path)
        cold = timed(fn, 1)
        out[plane] = (len(x) / cold, len(x) / timed(fn, 3))
    shutil.rmtree(path)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", type=int, default=8192)
    p.add_argument("--layouts", default="32:2048,64:2048,128:2048,128:2048:zstd")
    p.add_argument("--cores", default="0", help="CPU ids to pin to (comma separated)")
    p.add_argument("--stamps-per-des-tile", type=int, default=800)
    p.add_argument("--json", type=Path)
    p.add_argument(
        "--scan-read",
        action="store_true",
        help="also time read_model_stamps through zero_weight vs the float weights",
    )
    args = p.parse_args()
    cores = {int(c) for c in args.cores.split(",")}
    os.sched_setaffinity(0, cores)
    rng = np.random.default_rng(0)
    image = rng.normal(0.0, 3.0, size=(len(BANDS), args.size, args.size)).astype(np.float32)
    n = max(200, round(args.stamps_per_des_tile * args.size**2 / 1e8))
    x = rng.uniform(STAMP, args.size - STAMP, n)
    y = rng.uniform(STAMP, args.size - STAMP, n)
    x0, y0 = (v.tolist() for v in stamp_origins(x, y, STAMP))
    rows = []
    root = Path(tempfile.mkdtemp(prefix="lenscan-bench-datapath-"))
    try:
        for spec in args.layouts.split(","):
            chunk, shard, *rest = spec.split(":")
            chunk, shard, codec = int(chunk), int(shard), rest[0] if rest else "none"
            path = root / f"{spec.replace(':', '-')}.zarr"
            build(path, image, chunk, shard, codec)
            tile = open_survey(path).tile("t")
            readers = {
                "lenscan": lambda t=tile: read_stamps(t, x, y, STAMP),
                "zarr/stamp": lambda t=tile: per_stamp(t, x0, y0),
            }
            ts_read = tensorstore_reader(path)
            if ts_read is not None:
                readers["tensorstore"] = lambda r=ts_read: r(x0, y0)
            rates = {}
            for name, fn in readers.items():
                drop_cache(path)
                cold = timed(fn, 1)
                warm = timed(fn, 3)
                rates[name] = (n / cold, n / warm)
            ratio = bytes_ratio(tile, x0, y0, chunk, shard)
            rows.append((spec, ratio, rates))
            shutil.rmtree(path)
        scan = scan_read(root, image, x, y) if args.scan_read else None
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(
        f"3 x {args.size}^2 float32, {n} stamps of {STAMP} px (DES density), pinned to cores "
        f"{sorted(cores)}; load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}"
    )
    names = list(dict.fromkeys(nm for row in rows for nm in row[2]))
    head = f"{'layout':<18}{'bytes/stamp':>12}" + "".join(
        f"{name + ' cold':>18}{name + ' warm':>18}" for name in names
    )
    print(head)
    for spec, ratio, rates in rows:
        cells = "".join(
            f"{rates[nm][0]:>18.0f}{rates[nm][1]:>18.0f}" if nm in rates else f"{'-':>18}" * 2
            for nm in names
        )
        print(f"{spec:<18}{ratio:>12.2f}{cells}")
    if "tensorstore" in names:
        for spec, _, rates in rows:
            if "tensorstore" not in rates:
                continue  # a quantised layout: tensorstore lacks numcodecs.fixedscaleoffset
            print(
                f"{spec}: lenscan / tensorstore warm = "
                f"{rates['lenscan'][1] / rates['tensorstore'][1]:.2f}, cold = "
                f"{rates['lenscan'][0] / rates['tensorstore'][0]:.2f}"
            )
    if scan:
        print("read_model_stamps, weight-only tile (stamps/s cold / warm): " + "; ".join(
            f"via {plane} {c:.0f} / {w:.0f}" for plane, (c, w) in scan.items()))  # fmt: skip
    print("target 2: >= 40,000 stamps/s per 16-core node (2,500 per core), bytes/stamp <= 3")
    if args.json:
        args.json.write_text(json.dumps({"n": n, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
