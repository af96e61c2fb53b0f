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
from astropy.wcs import WCS

from lenscan.simulate.fits_export import (
    catalog_to_des_columns,
    des_tilename,
    write_catalog_file,
    write_des_tile,
)
from lenscan.survey.ingest import ingest

BANDS = ("g", "r", "i")


def _write(folder: Path, n_tiles: int, size: int, *, compress: bool, lossless: bool) -> str:
    rng = np.random.default_rng(0)
    parts = []
    for k in range(n_tiles):
        w = WCS(naxis=2)
        w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        w.wcs.crval = [40.0 + 0.75 * k, -30.0]
        w.wcs.crpix = [(size + 1) / 2, (size + 1) / 2]
        w.wcs.cd = [[-0.263 / 3600, 0], [0, 0.263 / 3600]]
        name = des_tilename(*w.wcs.crval)
        image = rng.normal(0.0, 3.0, (len(BANDS), size, size)).astype(np.float32)
        n_src = size * size // 4000
        xs, ys = rng.integers(5, size - 5, n_src), rng.integers(5, size - 5, n_src)
        image[:, ys, xs] += rng.uniform(20, 2000, n_src).astype(np.float32)
        weight = np.full(image.shape, 1 / 9.0, dtype=np.float32)
        mask = np.zeros(image.shape, dtype=np.int16)
        write_des_tile(
            str(folder),
            name,
            bands=BANDS,
            image=image,
            weight=weight,
            mask=mask,
            wcs_header=w.to_header(),
            compress=compress,
            lossless=lossless,
        )
        ra, dec = w.wcs_pix2world(xs, ys, 0)
        cat = {"id": np.arange(n_src, dtype=np.int64) + k * 10**7, "ra": ra, "dec": dec}
        for b in BANDS:
            cat[f"mag_{b}"] = rng.uniform(18, 25, n_src).astype(np.float32)
            cat[f"magerr_{b}"] = np.full(n_src, 0.05, dtype=np.float32)
        parts.append(catalog_to_des_columns(cat, bands=BANDS, tilename=name))
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
