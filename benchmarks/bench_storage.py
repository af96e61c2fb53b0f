"""Storage cost against the fpack FITS, and the stamp read rate, of one DES-format tile (target 7).

Writes one DES-format tile (3 bands, SCI + MSK + WGT, sky-subtracted noise plus sources, a
smooth weight map, a sparse mask) as DES-like lossy ``.fits.fz`` (RICE_1, quantize_level 16 with
subtractive dithering, as real DES DR2 files), then, in one run:

* ingests it with ``lenscan.survey.ingest`` in a fresh child process and reports the child's
  peak RSS (the ingest holds one tile's planes in memory);
* writes the FITS pixels into a store once per layout (image codec x weight/mask codec) and
  reports store bytes / FITS bytes and ``read_stamps`` stamps/s (image + weight, as the scan
  reads them; best of 3, page cache warm) at DES density (800 stamps per 10000^2 px);
  the layouts: image raw float32 / zstd float32 / quantised like fpack (``quantise=16``:
  int32 steps of <= sigma / 16 + zstd), weight and mask raw or zstd.

Usage: python benchmarks/bench_storage.py [--size 4096] [--stamps-per-des-tile 800]
(``--size 10000`` is a DES-sized tile: ~2.5 GB of memory and a few minutes.)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import placeholder_catalog
from astropy.io import fits
from astropy.wcs import WCS

from lenscan.simulate.fits_export import (
    catalog_to_des_columns,
    des_tilename,
    write_catalog_file,
    write_des_tile,
)
from lenscan.survey import create_survey, open_survey, read_stamps

BANDS = ("g", "r", "i")
STAMP = 48


def write_fits(folder: Path, size: int, seed: int) -> tuple[str, str]:
    """One DES-like lossy-compressed tile and its catalogue; return (tilename, catalogue)."""
    rng = np.random.default_rng(seed)
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [40.0, -30.0]
    w.wcs.crpix = [(size + 1) / 2, (size + 1) / 2]
    w.wcs.cd = [[-0.263 / 3600, 0], [0, 0.263 / 3600]]
    name = des_tilename(*w.wcs.crval)
    # Depth varies in patches (the number of exposures), so the weight is piecewise constant.
    patches = rng.integers(6, 11, size=(8, 8)).astype(np.float32)
    block = -(-size // 8)
    n_exp = np.kron(patches, np.ones((block, block), np.float32))[:size, :size]
    sigma = 3.0 * np.sqrt(8.0 / n_exp)
    image = np.empty((len(BANDS), size, size), np.float32)
    for b in range(len(BANDS)):
        image[b] = rng.standard_normal((size, size), dtype=np.float32) * sigma
    n_src = size * size // 4000
    xs, ys = rng.integers(5, size - 5, n_src), rng.integers(5, size - 5, n_src)
    image[:, ys, xs] += rng.uniform(20, 2000, n_src).astype(np.float32)
    weight = np.broadcast_to((1 / sigma**2).astype(np.float32), image.shape).copy()
    mask = np.zeros(image.shape, dtype=np.int16)
    mask[:, ys[: n_src // 50], xs[: n_src // 50]] = 4  # a few flagged pixels
    write_des_tile(
        str(folder),
        name,
        bands=BANDS,
        image=image,
        weight=weight,
        mask=mask,
        wcs_header=w.to_header(),
        compress=True,
        lossless=False,
    )
    ra, dec = w.wcs_pix2world(xs, ys, 0)
    cat = {"id": np.arange(n_src, dtype=np.int64), "ra": ra, "dec": dec}
    for b in BANDS:
        cat[f"mag_{b}"] = rng.uniform(18, 25, n_src).astype(np.float32)
        cat[f"magerr_{b}"] = np.full(n_src, 0.05, dtype=np.float32)
    rows = catalog_to_des_columns(cat, bands=BANDS, tilename=name)
    return name, write_catalog_file(str(folder / "catalog.parquet"), rows)


def ingest_child(fits_dir: str, catalog: str, out: str, size: int) -> None:
    """Run in a child process: ingest, print wall seconds and peak RSS (MB) as JSON."""
    from lenscan.survey.ingest import ingest

    t0 = time.perf_counter()
    summary = ingest(fits_dir, out, catalog=catalog, client="sync", expected_shape_yx=(size, size))
    if not summary.ok:
        raise SystemExit(str(summary))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss_mb": rss}))


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def read_planes(fits_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, fits.Header]:
    sci, wgt, msk, header = [], [], [], None
    for band in BANDS:
        (path,) = sorted(fits_dir.glob(f"*_{band}.fits.fz"))
        with fits.open(path) as hdul:
            sci.append(hdul["SCI"].data.astype(np.float32))
            wgt.append(hdul["WGT"].data.astype(np.float32))
            msk.append(hdul["MSK"].data.astype(np.int32))
            header = header or WCS(hdul["SCI"].header).to_header()
    return np.stack(sci), np.stack(wgt), np.stack(msk), header


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--stamps-per-des-tile", type=int, default=800)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    p.add_argument("--_ingest-child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._ingest_child:
        fits_dir, catalog, out, size = args._ingest_child
        ingest_child(fits_dir, catalog, out, int(size))
        return

    root = Path(tempfile.mkdtemp(prefix="lenscan-bench-storage-"))
    try:
        fits_dir = root / "fits"
        fits_dir.mkdir()
        _, catalog = write_fits(fits_dir, args.size, args.seed)
        fits_bytes = sum(f.stat().st_size for f in fits_dir.glob("*.fits.fz"))
        child = subprocess.run(
            [
                sys.executable,
                __file__,
                "--_ingest-child",
                str(fits_dir),
                catalog,
                str(root / "ingested.zarr"),
                str(args.size),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        ingest_stats = json.loads(child.stdout.strip().splitlines()[-1])
        ingest_ratio = dir_bytes(root / "ingested.zarr" / "tiles") / fits_bytes

        image, weight, mask, header = read_planes(fits_dir)
        n = max(200, round(args.stamps_per_des_tile * args.size**2 / 1e8))
        rng = np.random.default_rng(args.seed + 1)
        x, y = rng.uniform(0, args.size - 1, n), rng.uniform(0, args.size - 1, n)
        cat = placeholder_catalog(BANDS)
        rows = []
        layouts = [
            ("none", "none", None),
            ("none", "zstd", None),
            ("zstd", "zstd", None),
            ("none", "zstd", 16.0),
        ]
        for codec, aux, quantise in layouts:
            url = root / f"{codec}-{aux}-{quantise}.zarr"
            survey = create_survey(url, name="bench", bands=BANDS)
            survey.write_tile(
                "t",
                image=image,
                weight=weight,
                mask=mask,
                wcs_header=header,
                catalog=cat,
                pixel_scale_arcsec=0.263,
                zero_point=30.0,
                codec=codec,
                aux_codec=aux,
                quantise=quantise,
            )
            tile = open_survey(url).tile("t")
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                read_stamps(tile, x, y, STAMP)
                read_stamps(tile, x, y, STAMP, array="weight")
                times.append(time.perf_counter() - t0)
            image_label = f"quantised q={quantise:g}" if quantise else codec
            rows.append(
                (
                    f"image {image_label}, weight/mask {aux}",
                    dir_bytes(url / "tiles") / fits_bytes,
                    n / min(times),
                )
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(
        f"one DES-format tile, 3 x {args.size}^2 px; fpack FITS (RICE_1, q=16): "
        f"{fits_bytes / 1e6:.1f} MB; {n} stamps of {STAMP} px; load average "
        f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}"
    )
    print(
        f"ingest (default layout): {ingest_stats['seconds']:.1f} s, peak RSS "
        f"{ingest_stats['peak_rss_mb']:.0f} MB, store / FITS = {ingest_ratio:.2f}"
    )
    print(f"{'layout':<34}{'store/FITS':>11}{'stamps/s':>10}")
    for label, ratio, rate in rows:
        print(f"{label:<34}{ratio:>11.2f}{rate:>10.0f}")
    print("target 7: store / FITS <= 1.5 with the read rate kept")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "fits_bytes": fits_bytes,
                    "ingest": ingest_stats,
                    "ingest_ratio": ingest_ratio,
                    "layouts": rows,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
