"""Benchmark: bulk stamp reading (lenscan.survey.read_stamps) vs one zarr call per stamp.

Builds a synthetic 3 x 4096 x 4096 float32 tile in a local store (uncompressed, 128 px inner
chunks in 2048 px shards, the lenscan defaults) and reads ~200 random stamps of 64 and 100 px:

* ``read_stamps``: lenscan's bulk reader (each touched chunk read once, concurrently);
* ``read_stamps[zarr]``: the same plan served by zarr's async array API (the fallback engine);
* ``zarr per stamp``: ``tile.image[:, y0:y1, x0:x1]`` once per stamp.

Run: ``python benchmarks/bench_read_stamps.py [--n-stamps 200] [--repeats 3] [--store DIR]``
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from astropy.wcs import WCS

from lenscan.stamps import stamp_origins
from lenscan.survey import create_survey, open_survey, read_stamps
from lenscan.survey import reader as _reader

BANDS = ("g", "r", "i")


def build_tile(path: Path, *, size_pix: int, seed: int) -> None:
    """Write a synthetic tile of sky noise (plus its catalogue) to a local store at ``path``."""
    rng = np.random.default_rng(seed)
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [30.0, -30.0]
    wcs.wcs.crpix = [size_pix / 2, size_pix / 2]
    wcs.wcs.cdelt = [-0.263 / 3600, 0.263 / 3600]
    image = rng.normal(100.0, 10.0, size=(len(BANDS), size_pix, size_pix)).astype(np.float32)
    n = 10
    catalog = {
        "id": np.arange(n, dtype=np.int64),
        "ra": np.full(n, 30.0),
        "dec": np.full(n, -30.0),
        "x": np.full(n, 10.0),
        "y": np.full(n, 10.0),
        "flags": np.zeros(n, np.int32),
        "extended_class": np.full(n, 2, np.int16),
    }
    for band in BANDS:
        catalog[f"mag_{band}"] = np.full(n, 22.0, np.float32)
        catalog[f"magerr_{band}"] = np.full(n, 0.1, np.float32)
    survey = create_survey(path, name="bench", bands=BANDS, overwrite=True)
    survey.write_tile(
        "bench",
        image=image,
        wcs_header=wcs.to_header(),
        catalog=catalog,
        pixel_scale_arcsec=0.263,
        zero_point=30.0,
        chunk_pix=128,
        shard_pix=2048,
    )


def per_stamp(tile, x: np.ndarray, y: np.ndarray, size: int) -> np.ndarray:
    """The naive reader: one zarr call per stamp (in-tile part only; NaN padding elsewhere)."""
    ny, nx = tile.shape_yx
    x0, y0 = stamp_origins(x, y, size)
    out = np.full((len(x), len(tile.bands), size, size), np.nan, dtype=np.float32)
    for k in range(len(x)):
        ya, yb = max(y0[k], 0), min(y0[k] + size, ny)
        xa, xb = max(x0[k], 0), min(x0[k] + size, nx)
        if ya < yb and xa < xb:
            out[k, :, ya - y0[k] : yb - y0[k], xa - x0[k] : xb - x0[k]] = tile.image[
                :, ya:yb, xa:xb
            ]
    return out


def best_time(fn, repeats: int) -> float:
    """Best wall time of ``repeats`` calls (seconds)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-stamps", type=int, default=200)
    parser.add_argument("--tile-pix", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--store", type=Path, default=None, help="reuse/keep the store here")
    args = parser.parse_args()

    tmp = None
    if args.store is None:
        tmp = Path(tempfile.mkdtemp(prefix="lenscan-bench-"))
        store_path = tmp / "survey.zarr"
    else:
        store_path = args.store
    try:
        if not (store_path / "zarr.json").exists():
            t0 = time.perf_counter()
            build_tile(store_path, size_pix=args.tile_pix, seed=args.seed)
            print(f"built {store_path} in {time.perf_counter() - t0:.1f} s")
        tile = open_survey(store_path).tile("bench")
        rng = np.random.default_rng(args.seed + 1)
        print(
            f"tile {len(tile.bands)} x {tile.shape_yx[0]} x {tile.shape_yx[1]}, chunks "
            f"{tile.image.chunks}, shards {tile.image.shards}, {args.n_stamps} random stamps, "
            f"best of {args.repeats}"
        )
        header = (
            f"{'stamp px':>8} {'read_stamps /s':>15} {'[zarr engine] /s':>17} "
            f"{'zarr per stamp /s':>18} {'ratio':>7}"
        )
        print(header)
        print("-" * len(header))
        for size in (64, 100):
            ny, nx = tile.shape_yx
            x = rng.uniform(0, nx - 1, args.n_stamps)
            y = rng.uniform(0, ny - 1, args.n_stamps)
            bulk, _ = read_stamps(tile, x, y, size)
            np.testing.assert_array_equal(bulk, per_stamp(tile, x, y, size))
            t_bulk = best_time(lambda: read_stamps(tile, x, y, size), args.repeats)  # noqa: B023
            t_naive = best_time(lambda: per_stamp(tile, x, y, size), args.repeats)  # noqa: B023
            direct = _reader._DirectEngine.from_array
            try:
                # Force the generic engine to show what the direct byte-range engine buys.
                _reader._DirectEngine.from_array = staticmethod(lambda arr: None)  # type: ignore[method-assign]
                t_zarr = best_time(lambda: read_stamps(tile, x, y, size), args.repeats)  # noqa: B023
            finally:
                _reader._DirectEngine.from_array = direct  # type: ignore[method-assign]
            n = args.n_stamps
            print(
                f"{size:>8} {n / t_bulk:>15.0f} {n / t_zarr:>17.0f} {n / t_naive:>18.0f} "
                f"{t_naive / t_bulk:>6.1f}x"
            )
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
