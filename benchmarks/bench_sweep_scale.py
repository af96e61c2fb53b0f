"""Does a sweep stay flat as the survey grows? Sweeps of many tiny tiles, side by side.

For each survey size (tiles of 64 x 64 px, 3 bands, 3 sources, each tile at its own sky
position) the scan runs on one LocalCluster started in a separate process, so that this process
is the client alone. Each size runs in a fresh client process. Printed per size:

  plan s/tile     ``plan_scan`` (tile index, resume state) per tile
  wall s/tile     ``lenscan.scan`` end to end per tile
  client MiB      peak RSS of the client process
  worker MiB      peak RSS of the largest worker
  sched tasks     most tasks the scheduler held at once

and the ratios to the smallest size. Targets (issue 8): client peak RSS at the largest size
within 1.5x of the smallest; wall time per tile flat within 1.5x.

Usage: python benchmarks/bench_sweep_scale.py [--sizes 1000 5000 20000] [--workers 2]
       [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import psutil

TILE_PIX = 64
SPACING_DEG = 0.01  # 36": tiles of 17" never overlap


def build_store(url: str, n_tiles: int) -> None:
    """Write one tile with ``write_tile``, then clone it with its own WCS, positions and id."""
    from astropy.io import fits
    from astropy.wcs import WCS
    from numcodecs.zstd import Zstd

    from lenscan.survey import create_survey

    survey = create_survey(url, name="tiny", bands=["g", "r", "i"], overwrite=True)
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [10.0, -30.0]
    wcs.wcs.crpix = [TILE_PIX / 2 + 0.5, TILE_PIX / 2 + 0.5]
    wcs.wcs.cdelt = [-0.263 / 3600, 0.263 / 3600]
    rng = np.random.default_rng(0)
    image = rng.normal(100.0, 5.0, (3, TILE_PIX, TILE_PIX)).astype(np.float32)
    x = np.array([20.0, 31.5, 44.0])
    y = np.array([25.0, 31.5, 40.0])
    ra, dec = wcs.wcs_pix2world(x, y, 0)
    # One red galaxy inside the des-jacobs19 box, two outside it.
    mags = {"g": [22.5, 21.0, 20.5], "r": [21.3, 20.8, 20.3], "i": [20.5, 20.6, 20.1]}
    catalog = {"id": np.arange(1, 4, dtype=np.int64), "ra": ra, "dec": dec, "x": x, "y": y}
    catalog.update(flags=np.zeros(3, np.int32), extended_class=np.full(3, 3, np.int16))
    for b, m in mags.items():
        catalog[f"mag_{b}"] = np.asarray(m, np.float32)
        catalog[f"magerr_{b}"] = np.full(3, 0.05, np.float32)
    template = "T0000000"
    survey.write_tile(template, image=image, wcs_header=wcs.to_header(), catalog=catalog,
                      pixel_scale_arcsec=0.263, zero_point=30.0)  # fmt: skip
    root = Path(url)
    meta = json.loads((root / "tiles" / template / "zarr.json").read_text())
    header = fits.Header.fromstring(meta["attributes"]["lenscan_tile"]["wcs_header"], sep="\n")
    zstd = Zstd(level=0)
    side = int(np.ceil(np.sqrt(n_tiles)))
    for k in range(1, n_tiles):
        tile_id = f"T{k:07d}"
        dst = root / "tiles" / tile_id
        shutil.copytree(root / "tiles" / template, dst)
        dra, ddec = (k % side) * SPACING_DEG, (k // side) * SPACING_DEG
        header["CRVAL1"], header["CRVAL2"] = 10.0 + dra, -30.0 + ddec
        attrs = dict(meta["attributes"]["lenscan_tile"])
        attrs["wcs_header"] = header.tostring(sep="\n", endcard=False, padding=False)
        attrs["write_id"] = uuid.uuid4().hex
        (dst / "zarr.json").write_text(json.dumps({**meta, "attributes": {"lenscan_tile": attrs}}))
        for col, shift in (("ra", dra), ("dec", ddec)):
            values = np.asarray(catalog[col], "<f8") + shift
            (dst / "catalog" / col / "c" / "0").write_bytes(zstd.encode(values.tobytes()))
        entry = {"tile": tile_id, "write_id": attrs["write_id"], "n_sources": 3,
                 "ny": TILE_PIX, "nx": TILE_PIX, "pixel_scale_arcsec": 0.263}  # fmt: skip
        (root / "index" / "tiles" / f"{tile_id}.json").write_text(json.dumps(entry))
    from lenscan.survey import open_survey

    open_survey(url, mode="a").consolidate_index()


def start_cluster(n_workers: int) -> tuple[subprocess.Popen, str]:
    code = (
        "import sys, time\n"
        "from distributed import LocalCluster\n"
        f"c = LocalCluster(n_workers={n_workers}, threads_per_worker=1, processes=True,"
        " dashboard_address=None)\n"
        "print(c.scheduler_address, flush=True)\n"
        "sys.stdin.read()\n"
        "c.close()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    return proc, proc.stdout.readline().strip()


class Sampler(threading.Thread):
    """Samples client RSS, worker RSS and the scheduler's task count twice a second."""

    def __init__(self, client) -> None:
        super().__init__(daemon=True)
        self.client, self.stop = client, threading.Event()
        self.client_rss = self.worker_rss = 0
        self.tasks = 0

    def run(self) -> None:
        me = psutil.Process()
        while not self.stop.is_set():
            self.client_rss = max(self.client_rss, me.memory_info().rss)
            try:
                rss = self.client.run(lambda: psutil.Process().memory_info().rss)
                self.worker_rss = max(self.worker_rss, *rss.values())
                n = self.client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks))
                self.tasks = max(self.tasks, n)
            except Exception:  # a sample lost while the cluster is busy: take the next one
                pass
            self.stop.wait(0.5)


def one_size(args: argparse.Namespace) -> dict:
    from distributed import Client

    from lenscan.config import ScanConfig
    from lenscan.sweep import scan
    from lenscan.sweep.plan import plan_scan

    n = args.one
    url = str(Path(args.work) / f"survey-{n}.zarr")
    if not Path(url, "index", "tiles.parquet").exists():
        t0 = time.perf_counter()
        build_store(url, n)
        print(f"  built {n} tiles in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    out = str(Path(args.work) / f"out-{n}")
    shutil.rmtree(out, ignore_errors=True)
    config = ScanConfig(survey_url=url, out=out, gallery_size=0, formats=["parquet"])
    t0 = time.perf_counter()
    plan_scan(config)
    plan_seconds = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    cluster, address = start_cluster(args.workers)
    try:
        with Client(address) as client:
            sampler = Sampler(client)
            sampler.start()
            t0 = time.perf_counter()
            table = scan(config=config, client=client, progress=False)
            wall = time.perf_counter() - t0
            sampler.stop.set()
            sampler.join()
    finally:
        cluster.stdin.close()
        cluster.wait(timeout=60)
    s = table.meta["summary"]
    assert s["tiles_scanned"] == n and s["tiles_failed"] == 0, s
    return {
        "tiles": n,
        "plan_s_per_tile": plan_seconds / n,
        "wall_s_per_tile": wall / n,
        "client_mib": sampler.client_rss / 2**20,
        "worker_mib": sampler.worker_rss / 2**20,
        "sched_tasks": sampler.tasks,
        "scored": s["scored_total"],
        "candidates": len(table),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--work", default=None, help="folder for the stores (default: a temp dir)")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one_size(args)))
        return
    work = args.work or tempfile.mkdtemp(prefix="lenscan-sweep-scale-")
    rows = []
    for n in sorted(args.sizes):
        cmd = [sys.executable, __file__, "--one", str(n), "--workers", str(args.workers),
               "--work", work]  # fmt: skip
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"  {n} tiles done", file=sys.stderr)
    base = rows[0]
    print(f"{'tiles':>7} {'plan s/tile':>12} {'wall s/tile':>12} {'client MiB':>11} "
          f"{'worker MiB':>11} {'sched tasks':>12} {'time x':>7} {'client x':>9}")  # fmt: skip
    for r in rows:
        print(
            f"{r['tiles']:>7} {r['plan_s_per_tile']:>12.2e} {r['wall_s_per_tile']:>12.4f} "
            f"{r['client_mib']:>11.0f} {r['worker_mib']:>11.0f} {r['sched_tasks']:>12} "
            f"{r['wall_s_per_tile'] / base['wall_s_per_tile']:>7.2f} "
            f"{r['client_mib'] / base['client_mib']:>9.2f}"
        )
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
