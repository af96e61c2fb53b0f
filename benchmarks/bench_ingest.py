"""Benchmark FITS ingest: MB/s of FITS read and tiles/minute, for .fits and .fits.fz tiles.

Writes K DES-style tiles (3 bands, SCI + MSK + WGT, sky noise plus a sprinkle of sources) as
plain ``.fits``, lossless ``.fits.fz`` (GZIP_2, unquantised) and DES-like lossy ``.fits.fz``
(RICE_1, quantize_level 16, as real DES DR2 files), ingests each into a fresh local store and
prints a table. Run::

    python benchmarks/bench_ingest.py                    # 4 tiles x 3 bands x 4096^2
    python benchmarks/bench_ingest.py --tiles 2 --size 2048 --workers 2

``MB/s`` is the size of the FITS files on disk divided by the ingest wall time (so compressed
files show fewer MB/s for the same pixels); ``Mpix/s`` counts decoded pixels of all planes.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import write_des_like_tile

from lenscan.simulate.fits_export import write_catalog_file
from lenscan.survey.ingest import ingest

BANDS = ("g", "r", "i")


def _write(folder: Path, n_tiles: int, size: int, *, compress: bool, lossless: bool) -> str:
    rng = np.random.default_rng(0)
    parts = [
        write_des_like_tile(str(folder), rng, size, BANDS, crval=(40.0 + 0.75 * k, -30.0),
                            compress=compress, lossless=lossless, id_offset=k * 10**7)[1]
        for k in range(n_tiles)
    ]  # fmt: skip
    rows = {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}
    return write_catalog_file(str(folder / "catalog.parquet"), rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", type=int, default=4)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes")
    ap.add_argument("--sync", action="store_true", help="ingest in this process, tile by tile")
    args = ap.parse_args()
    client = "sync" if args.sync else None
    if not args.sync:
        from distributed import Client, LocalCluster

        cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, dashboard_address=":0")
        client = Client(cluster)
    variants = [
        ("fits", False, True),
        ("fits.fz lossless", True, True),
        ("fits.fz DES lossy", True, False),
    ]
    mpix = args.tiles * len(BANDS) * args.size**2 * 3 / 1e6  # SCI + WGT + MSK planes
    print(
        f"{args.tiles} tiles x {len(BANDS)} bands x {args.size}^2 "
        f"({'sync' if args.sync else f'{args.workers} workers'})"
    )
    print(
        f"{'format':<20}{'MB on disk':>11}{'write s':>9}{'ingest s':>9}{'MB/s':>8}"
        f"{'Mpix/s':>8}{'tiles/min':>10}"
    )
    root = Path(tempfile.mkdtemp(prefix="bench_ingest_"))
    try:
        for label, compress, lossless in variants:
            src = root / label.replace(" ", "_")
            t0 = time.perf_counter()
            cat = _write(src, args.tiles, args.size, compress=compress, lossless=lossless)
            t_write = time.perf_counter() - t0
            summary = ingest(
                src,
                root / f"{src.name}.zarr",
                catalog=cat,
                client=client,
                expected_shape_yx=(args.size, args.size),
            )
            if not summary.ok:
                raise SystemExit(str(summary))
            mb = summary.bytes_read / 1e6
            s = summary.seconds
            print(
                f"{label:<20}{mb:>11.0f}{t_write:>9.1f}{s:>9.1f}{mb / s:>8.1f}"
                f"{mpix / s:>8.1f}{args.tiles / s * 60:>10.1f}"
            )
            shutil.rmtree(src)
            shutil.rmtree(root / f"{src.name}.zarr")
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if not args.sync:
            client.close()
            cluster.close()


if __name__ == "__main__":
    main()
