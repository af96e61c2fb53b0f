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

With ``--client`` (issue 20: a Rubin wide survey is 10^5-10^6 patches) the client-side pieces
run at full scale instead, each size in a fresh process, with the sweep's own functions:

  plan     ``plan_scan`` over a consolidated tile index of N entries (no output yet)
  ledger   N ``TileResult``s committed by the sweep's ``Ledger`` (batches of its default size)
  resume   ``plan_scan`` again: the resume state (``load_ledger`` + a listing of N parts)
  reduce   ``load_ledger``, ``failure_records``, ``candidate_table(reduce_rows)``, the tables
           written

printing seconds per tile, the phase's peak RSS, and both as ratios to the smallest size (see
the comment above ``build_index_store`` for what is real and what is cloned).

Usage: python benchmarks/bench_sweep_scale.py [--sizes 1000 5000 20000] [--workers 2]
       [--work DIR]
       python benchmarks/bench_sweep_scale.py --client [--sizes 1000 20000 200000]
"""

from __future__ import annotations

import argparse
import gc
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


# ---------------------------------------------------------------------------------------------
# --client: the client-side pieces of a sweep at full survey scale (200,000 tiles and more).
#
# Scoring is per tile and runs on the workers; what could grow with the survey is the client's
# share: planning over the tile index, the ledger commits, reading the resume state, and the
# reduce. This mode runs those pieces for real at each size. The survey store holds one real
# tile (``write_tile``) and a tile index of N entries, written by the store's own functions
# (``_write_index_entries`` of copies of that tile's ``_index_entry``, each with its own id and
# write id, then ``consolidate_index``). The template tile is scored once by the real
# ``score_tile``; its Parquet part is hard-linked as every tile's part (the listing sees N real
# parts; the reduce only reads the parts of tiles committed with a higher floor), and its
# reduce rows, moved to each tile's sky position, come back to the client as each tile's
# ``TileResult``, committed by the sweep's ``Ledger`` in batches of its default size. Every
# tile's rows are kept as overlap-zone keys, so the reduce merges N detections; one tile in
# CANDIDATE_EVERY scores above the threshold (the candidates).
# ---------------------------------------------------------------------------------------------

TEMPLATE = "T0000000"
CANDIDATE_EVERY = 100


def _client_config(url: str, out: str):
    from lenscan.config import ScanConfig

    return ScanConfig(survey_url=url, out=out, gallery_size=0, formats=["parquet"])


def build_index_store(work: Path, n_tiles: int) -> None:
    """One real tile, scored once, and a consolidated tile index of ``n_tiles`` entries."""
    import pyarrow.parquet as pq
    from zarr.core.sync import sync

    from lenscan.survey import open_survey
    from lenscan.survey.store import _write_index_entries
    from lenscan.sweep.plan import plan_scan
    from lenscan.sweep.worker import part_url, score_tile

    url, out = str(work / f"index-{n_tiles}.zarr"), str(work / f"template-out-{n_tiles}")
    build_store(url, 1)
    plan = plan_scan(_client_config(url, out))
    result = score_tile(TEMPLATE, plan.job(), plan.payload)
    part = Path(part_url(str(Path(out, "scored")), TEMPLATE))
    shutil.copy(part, work / f"template-part-{n_tiles}.parquet")
    full = pq.read_table(part)  # every scored row: each clone keeps them as overlap-zone keys
    pq.write_table(full, work / f"template-rows-{n_tiles}.parquet")
    counts = {k: getattr(result, k) for k in ("n_sources", "n_selected", "n_scored", "n_edge")}
    (work / f"template-result-{n_tiles}.json").write_text(json.dumps(counts))
    shutil.rmtree(out)
    survey = open_survey(url, mode="a")
    entry = survey.tile_index()[TEMPLATE]
    entries = []
    for k in range(1, n_tiles):
        tile_id = f"T{k:07d}"
        entries.append({**entry, "tile": tile_id, "survey_tile": tile_id,
                        "write_id": uuid.uuid4().hex})  # fmt: skip
        if len(entries) == 10_000:
            sync(_write_index_entries(survey.zarr_store, entries))
            entries = []
    sync(_write_index_entries(survey.zarr_store, entries))
    survey.consolidate_index()


class PeakRSS(threading.Thread):
    """Peak RSS of this process, sampled every 10 ms, per phase."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.proc, self.peak, self.stop = psutil.Process(), 0, threading.Event()
        self.start()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self.stop.wait(0.01)

    def phase(self) -> float:
        """The peak since the last call (MiB); the next phase starts from the current RSS."""
        peak = max(self.peak, self.proc.memory_info().rss)
        self.peak = self.proc.memory_info().rss
        return peak / 2**20


def _tile_results(plan, work: Path, n: int):
    """Each tile's ``TileResult``: the template's, at the tile's own sky position."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from lenscan.sweep.worker import TileResult

    rows = pq.read_table(work / f"template-rows-{n}.parquet")
    rows = rows.set_column(rows.schema.get_field_index("overlap_zone"), "overlap_zone",
                           pa.array(np.ones(rows.num_rows, bool)))  # fmt: skip
    counts = json.loads((work / f"template-result-{n}.json").read_text())
    side = int(np.ceil(np.sqrt(n)))
    for k, tile in enumerate(plan.tiles):
        shifted = rows.set_column(0, "tile", pa.array([tile] * rows.num_rows, pa.string()))
        for col, shift in (("ra", (k % side) * SPACING_DEG), ("dec", (k // side) * SPACING_DEG)):
            i = shifted.schema.get_field_index(col)
            shifted = shifted.set_column(i, col, pc.add(shifted[col], shift))
        if k % CANDIDATE_EVERY == 0:
            score = pa.array(np.full(rows.num_rows, 0.99, np.float32))
            shifted = shifted.set_column(shifted.schema.get_field_index("score"), "score", score)
        yield TileResult(tile=tile, write_id=plan.write_ids[tile], reduce_rows=shifted,
                         seconds=0.03, stage_seconds={"score": 0.02}, **counts)  # fmt: skip


def client_one(work: Path, n: int) -> dict:
    """Plan, commit the ledger, read the resume state and reduce, for ``n`` tiles."""
    from lenscan.sweep.ledger import Ledger, load_ledger
    from lenscan.sweep.plan import plan_scan, prepare_output, write_run_record
    from lenscan.sweep.reduce import candidate_table, failure_records, reduce_rows, write_failures
    from lenscan.sweep.worker import part_url

    url, out = str(work / f"index-{n}.zarr"), str(work / f"client-out-{n}")
    shutil.rmtree(out, ignore_errors=True)
    config = _client_config(url, out)
    rss, row = PeakRSS(), {"tiles": n}
    row["base_mib"] = rss.phase()
    t0 = time.perf_counter()
    plan = plan_scan(config)
    row["plan_s"], row["plan_mib"] = time.perf_counter() - t0, rss.phase()
    assert len(plan.tiles) == n and not plan.done
    prepare_output(plan)
    write_run_record(plan, status="running")
    scored = Path(out, "scored")
    scored.mkdir(parents=True)
    for k, tile in enumerate(plan.tiles):  # the workers' parts (not timed: worker side)
        if k % 50_000 == 0:  # a file takes at most 65,000 hard links (ext4)
            source = scored / f"template-{k}"
            shutil.copy(work / f"template-part-{n}.parquet", source)
        os.link(source, part_url(str(scored), tile))
    rss.phase()
    ledger = Ledger(plan.out_fs, plan.out_path, plan.run_token,
                    storage_options={}, batch_seconds=config.commit_interval_seconds)  # fmt: skip
    t0, t_make = time.perf_counter(), 0.0
    results = _tile_results(plan, work, n)
    while True:
        t1 = time.perf_counter()
        result = next(results, None)
        t_make += time.perf_counter() - t1
        if result is None:
            break
        ledger.add(result, plan.threshold)
    ledger.commit()
    row["ledger_s"], row["ledger_mib"] = time.perf_counter() - t0 - t_make, rss.phase()
    plan, ledger = None, None  # a resumed run plans afresh
    gc.collect()
    rss.phase()
    t0 = time.perf_counter()
    plan = plan_scan(config)
    row["resume_s"], row["resume_mib"] = time.perf_counter() - t0, rss.phase()
    # done is a subset of the planned tiles: all N of them (no set of N ids held by the bench)
    assert len(plan.done) == n and len(plan.todo) == 0, "every tile is done on resume"
    t0 = time.perf_counter()
    state = load_ledger(plan.out_fs, plan.out_path, tiles=plan.tiles).current(plan.write_ids)
    failures = failure_records(plan, state, [])
    candidates = candidate_table(plan, reduce_rows(plan, state))
    write_failures(plan, failures)
    candidates.write_all(out, formats=["parquet"])
    row["reduce_s"], row["reduce_mib"] = time.perf_counter() - t0, rss.phase()
    assert failures.num_rows == 0 and len(candidates) > 0, (failures.num_rows, len(candidates))
    row["candidates"] = len(candidates)
    row["ledger_batches"] = len(list(Path(out, "ledger").glob("*.tiles.parquet")))
    shutil.rmtree(out)
    return row


def client_main(args: argparse.Namespace, work: str) -> None:
    rows = []
    for n in sorted(args.sizes):
        if not Path(work, f"index-{n}.zarr", "index", "tiles.parquet").exists():
            t0 = time.perf_counter()
            cmd = [sys.executable, __file__, "--build-index", str(n), "--work", work]
            subprocess.run(cmd, check=True, env=os.environ)
            print(f"  built the {n}-tile index in {time.perf_counter() - t0:.0f} s",
                  file=sys.stderr)  # fmt: skip
        cmd = [sys.executable, __file__, "--client-one", str(n), "--work", work]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"  {n} tiles measured", file=sys.stderr)
    base = rows[0]
    phases = ("plan", "ledger", "resume", "reduce")
    print(f"{'tiles':>7} {'phase':>7} {'s/tile':>10} {'peak MiB':>9} {'time x':>7} {'mem x':>6}")
    for r in rows:
        for p in phases:
            per, base_per = r[f"{p}_s"] / r["tiles"], base[f"{p}_s"] / base["tiles"]
            print(f"{r['tiles']:>7} {p:>7} {per:>10.2e} {r[f'{p}_mib']:>9.0f} "
                  f"{per / base_per:>7.2f} {r[f'{p}_mib'] / base[f'{p}_mib']:>6.2f}")  # fmt: skip
        peak = max(r[f"{p}_mib"] for p in phases)
        base_peak = max(base[f"{p}_mib"] for p in phases)
        print(f"{r['tiles']:>7} {'client':>7} {'':>10} {peak:>9.0f} {'':>7} "
              f"{peak / base_peak:>6.2f}   (import {r['base_mib']:.0f} MiB, "
              f"{r['ledger_batches']} ledger batches, {r['candidates']} candidates)")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=None)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--work", default=None, help="folder for the stores (default: a temp dir)")
    ap.add_argument("--client", action="store_true",
                    help="the client-side pieces only, at full scale (default sizes "
                    "1000 20000 200000)")  # fmt: skip
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--build-index", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--client-one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one_size(args)))
        return
    if args.build_index:
        build_index_store(Path(args.work), args.build_index)
        return
    if args.client_one:
        print(json.dumps(client_one(Path(args.work), args.client_one)))
        return
    work = args.work or tempfile.mkdtemp(prefix="lenscan-sweep-scale-")
    if args.client:
        if args.sizes is None:
            args.sizes = [1000, 20000, 200000]
        client_main(args, work)
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
        return
    args.sizes = args.sizes or [1000, 5000, 20000]
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
