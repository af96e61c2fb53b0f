"""Storage cost against the fpack FITS, and the stamp read rate, of one DES-format tile (target 7).

Writes one DES-format tile (3 bands, SCI + MSK + WGT, sky-subtracted noise plus sources, a
piecewise-constant weight map, a sparse mask) as DES-like lossy ``.fits.fz`` (RICE_1,
quantize_level 16 with subtractive dithering, astropy's default level), then, in one run, ingests
it with ``lenscan.survey.ingest`` once per layout, each in a fresh child process (its peak RSS is
the ingest's), and reports for each: store bytes / FITS bytes, ingest seconds and peak RSS, and
the stamp read rate at DES density (800 stamps of 48 px per 10000^2 px; best of 3, page cache
warm, one process): ``read_model_stamps`` (image + mask, what the scan reads) and
``read_stamps`` (image only). Layouts:

* ``default``: what ``ingest`` does now (quantised at the source's step, 128 px chunks);
* ``lossless``: ``quantise=None`` (float32 raw image, the previous default layout);
* ``quantised-64``, ``lossless-64``: the same with 64 px chunks;
* ``baseline`` (with ``--baseline-src DIR``, a checkout of older lenscan code): that code's
  default ingest, for the peak-RSS comparison (it held the tile whole).

Usage: python benchmarks/bench_storage.py [--size 4096] [--baseline-src DIR] [--json OUT]
(``--size 10000`` is a DES-sized tile: a few minutes.)
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
from _common import write_des_like_tile

from lenscan.simulate.fits_export import write_catalog_file
from lenscan.survey import open_survey, read_model_stamps, read_stamps

BANDS = ("g", "r", "i")
STAMP = 48


def write_fits(folder: Path, size: int, seed: int) -> tuple[str, str]:
    """One DES-like lossy-compressed tile and its catalogue; return (tilename, catalogue)."""
    rng = np.random.default_rng(seed)
    # Depth varies in patches (the number of exposures), so the weight is piecewise constant.
    patches = rng.integers(6, 11, size=(8, 8)).astype(np.float32)
    block = -(-size // 8)
    n_exp = np.kron(patches, np.ones((block, block), np.float32))[:size, :size]
    name, rows = write_des_like_tile(
        str(folder), rng, size, BANDS, sigma=3.0 * np.sqrt(8.0 / n_exp), flagged_fraction=0.02
    )
    return name, write_catalog_file(str(folder / "catalog.parquet"), rows)


LAYOUTS = {
    "default": {},
    "lossless": {"quantise": None},
    "quantised-64": {"chunk_pix": 64},
    "lossless-64": {"quantise": None, "chunk_pix": 64},
}


def ingest_child(fits_dir: str, catalog: str, out: str, size: int, layout: str) -> None:
    """Run in a child process: ingest, print wall seconds and peak RSS (MB) as JSON."""
    from lenscan.survey.ingest import ingest

    options = LAYOUTS.get(layout, {})
    t0 = time.perf_counter()
    summary = ingest(fits_dir, out, catalog=catalog, client="sync", expected_shape_yx=(size, size),
                     **options)  # fmt: skip
    if not summary.ok:
        raise SystemExit(str(summary))
    rss = peak_rss_mb()
    print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss_mb": rss}))


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM, MB).

    Not ``getrusage``'s ``ru_maxrss``: on Linux that survives ``exec`` and so includes the
    parent's resident set at the fork (here: the benchmark holding the FITS planes).
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stage_seconds(url: Path, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Seconds of one image read by stage (fetch, decode, cut), on this thread only."""
    from lenscan.stamps import paste_stamps, stamp_origins
    from lenscan.survey import reader

    tile = open_survey(url).tile(open_survey(url).tile_ids[0])
    engine = reader._engine_for(tile.image)
    x0, y0 = stamp_origins(x, y, STAMP)
    plan = reader._StampPlan.make(x0, y0, STAMP, tile.shape_yx, engine.chunk_yx)
    touching = plan.chunks_of(plan.order)
    t0 = time.perf_counter()
    raw = engine._fetch(sorted(touching), [0, 1, 2])
    t1 = time.perf_counter()
    blocks = {rc: [engine._decode(p) if p is not None else engine.fill_plane for p in planes]
              for rc, planes in raw.items()}  # fmt: skip
    t2 = time.perf_counter()
    out = np.full((len(x), 3, STAMP, STAMP), np.nan, np.float32)
    cy, cx = engine.chunk_yx
    for (r, c), ks in touching.items():
        paste_stamps(out, blocks[(r, c)], x0[ks], y0[ks], origin_yx=(r * cy, c * cx),
                     full_shape_yx=tile.shape_yx, rows=ks)  # fmt: skip
    if engine.post_scale is not None:
        out *= np.float32(engine.post_scale)
    t3 = time.perf_counter()
    return {"fetch": t1 - t0, "decode": t2 - t1, "cut": t3 - t2, "chunks": len(touching)}


def run_ingest(args: argparse.Namespace, fits_dir: Path, catalog: str, out: Path, layout: str,
               pythonpath: str | None = None) -> dict:  # fmt: skip
    """Ingest in a fresh child process (its own peak RSS); return its JSON line."""
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    cmd = [sys.executable, __file__, "--_ingest-child", str(fits_dir), catalog, str(out),
           str(args.size), layout]  # fmt: skip
    child = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(child.stdout.strip().splitlines()[-1])


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def read_rates(url: Path, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Best-of-3 stamps/s of read_model_stamps (image + mask) and read_stamps (image)."""
    tile = open_survey(url).tile(open_survey(url).tile_ids[0])
    rates = []
    for read in (
        lambda: read_model_stamps(tile, x, y, STAMP, bands=BANDS),
        lambda: read_stamps(tile, x, y, STAMP),
    ):
        read()  # warm the page cache
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            read()
            times.append(time.perf_counter() - t0)
        rates.append(len(x) / min(times))
    return rates[0], rates[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--stamps-per-des-tile", type=int, default=800)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--baseline-src", default=None, help="PYTHONPATH of older lenscan code")
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    p.add_argument("--json", type=Path)
    p.add_argument("--_ingest-child", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._ingest_child:
        fits_dir, catalog, out, size, layout = args._ingest_child
        ingest_child(fits_dir, catalog, out, int(size), layout)
        return
    root = Path(tempfile.mkdtemp(prefix="lenscan-bench-storage-"))
    try:
        t0 = time.perf_counter()
        fits_dir = root / "fits"
        fits_dir.mkdir()
        _, catalog = write_fits(fits_dir, args.size, args.seed)
        fits_bytes = sum(f.stat().st_size for f in fits_dir.glob("*.fits.fz"))
        print(f"FITS written in {time.perf_counter() - t0:.0f} s", flush=True)
        n = max(200, round(args.stamps_per_des_tile * args.size**2 / 1e8))
        rng = np.random.default_rng(args.seed + 1)
        x, y = rng.uniform(0, args.size - 1, n), rng.uniform(0, args.size - 1, n)
        layouts = list(args.layouts) + (["baseline"] if args.baseline_src else [])
        rows = []
        for layout in layouts:
            out = root / f"{layout}.zarr"
            stats = run_ingest(args, fits_dir, catalog, out, layout,
                               args.baseline_src if layout == "baseline" else None)  # fmt: skip
            model_rate, image_rate = read_rates(out, x, y)
            stages = stage_seconds(out, x, y)
            step = open_survey(out).tile(open_survey(out).tile_ids[0]).attrs.get("quantise_step")
            rows.append({"layout": layout, "store_over_fits": dir_bytes(out / "tiles") / fits_bytes,
                         "quantise_step": step, "model_stamps_per_s": model_rate,
                         "image_stamps_per_s": image_rate, "stages": stages, **stats})  # fmt: skip
            print(rows[-1], flush=True)
            shutil.rmtree(out)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report(args, fits_bytes, n, rows)


def report(args: argparse.Namespace, fits_bytes: int, n: int, rows: list[dict]) -> None:
    """Print the table (and write it as JSON)."""
    print(
        f"one DES-format tile, 3 x {args.size}^2 px; fpack FITS (RICE_1, q=16): "
        f"{fits_bytes / 1e6:.1f} MB; {n} stamps of {STAMP} px; load average "
        f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}"
    )
    head = ("layout", "store/FITS", "step", "ingest s", "peak RSS MB", "model st/s", "image st/s")
    print("".join(f"{h:>14}" for h in head))
    for r in rows:
        step = f"{r['quantise_step']:g}" if r["quantise_step"] else "-"
        print(f"{r['layout']:>14}{r['store_over_fits']:>14.2f}{step:>14}{r['seconds']:>14.1f}"
              f"{r['peak_rss_mb']:>14.0f}{r['model_stamps_per_s']:>14.0f}"
              f"{r['image_stamps_per_s']:>14.0f}")  # fmt: skip
    print("one image read by stage, one thread (s): " + "; ".join(
        f"{r['layout']}: " + ", ".join(f"{k} {v:.3f}" for k, v in r["stages"].items()
                                       if k != "chunks") for r in rows))  # fmt: skip
    print("target 7: store / FITS <= 1.5 with the read rate kept (target 2: 2,500 stamps/s/core)")
    if args.json:
        args.json.write_text(json.dumps({"fits_bytes": fits_bytes, "layouts": rows}, indent=1))


if __name__ == "__main__":
    main()
