"""Scan throughput, measured side by side in one run.

Prints stamps/s for
  model-only   the CNN alone on pre-normalised stamps already in memory (the ceiling),
  lenscan      ``lenscan.scan`` end to end on a running cluster (cut, bulk read, normalise,
               score, Parquet commit, reduction),
  naive        a per-stamp loop: one store read, one normalisation, one forward pass per stamp,
and the ratios lenscan / model-only and lenscan / naive.

Usage: python benchmarks/bench_scan.py [--tiles 4] [--tile-size 2048] [--model default]
       [--workers 1] [--threads 2] [--device cpu] [--naive-max 300]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from distributed import Client, LocalCluster

from lenscan.models import DEFAULT_MODEL, load_model
from lenscan.scan import scan
from lenscan.select import DES_JACOBS19, colour_cut_mask
from lenscan.simulate import make_survey
from lenscan.stamps import normalise_stamps, stamp_origins
from lenscan.survey import open_survey


def naive_loop(survey_url: str, model, max_stamps: int) -> tuple[int, float]:
    """One store call, one normalisation and one forward pass per stamp."""
    survey = open_survey(survey_url)
    size = model.meta.stamp_size_pix
    n = 0
    t0 = time.perf_counter()
    for tile_id in survey.tile_ids:
        tile = survey.tile(tile_id)
        cat = tile.catalog()
        sel = np.flatnonzero(colour_cut_mask(cat, DES_JACOBS19))
        bands = [tile.bands.index(b) for b in model.meta.bands]
        ny, nx = tile.shape_yx
        for k in sel:
            x, y = tile.wcs.world_to_pixel_values(cat["ra"][k], cat["dec"][k])
            x0, y0 = stamp_origins(np.atleast_1d(x), np.atleast_1d(y), size)
            x0, y0 = int(np.clip(x0[0], 0, nx - size)), int(np.clip(y0[0], 0, ny - size))
            stamp = tile.image[:, y0 : y0 + size, x0 : x0 + size][bands][None]
            model.score(normalise_stamps(stamp, model.meta.normalisation), batch_size=1)
            n += 1
            if n >= max_stamps:
                return n, time.perf_counter() - t0
    return n, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--survey", help="existing survey URL (default: make a synthetic one)")
    p.add_argument("--tiles", type=int, default=4)
    p.add_argument("--tile-size", type=int, default=2048)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--naive-max", type=int, default=300)
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="lenscan-bench-"))
    survey_url = args.survey
    if survey_url is None:
        survey_url = str(tmp / "survey.zarr")
        t0 = time.perf_counter()
        make_survey(survey_url, n_tiles=args.tiles, seed=1, tile_size_pix=args.tile_size)
        took = time.perf_counter() - t0
        print(f"synthetic survey: {args.tiles} x {args.tile_size}^2 px in {took:.1f} s")

    model = load_model(args.model, device=args.device)
    torch.set_num_threads(args.threads)
    s, b = model.meta.stamp_size_pix, len(model.meta.bands)
    rng = np.random.default_rng(0)
    stamps = torch.from_numpy(rng.normal(size=(2048, b, s, s)).astype(np.float32))
    normalised = normalise_stamps(stamps, model.meta.normalisation)
    model.score(normalised[:64], batch_size=args.batch_size)  # warm-up
    t0 = time.perf_counter()
    model.score(normalised, batch_size=args.batch_size)
    if args.device == "cuda":
        torch.cuda.synchronize()
    model_rate = len(normalised) / (time.perf_counter() - t0)

    with (
        LocalCluster(
            n_workers=args.workers,
            threads_per_worker=args.threads,
            processes=True,
            dashboard_address=":0",
        ) as cluster,
        Client(cluster) as client,
    ):
        client.wait_for_workers(args.workers)
        table = scan(
            survey_url,
            out=str(tmp / "scan"),
            model=args.model,
            client=client,
            device=args.device,
            batch_size=args.batch_size,
            gallery_size=0,
            progress=False,
        )
    summary = table.meta["summary"]
    lenscan_rate = summary["scored"] / summary["wall_seconds"]

    n_naive, t_naive = naive_loop(survey_url, model, args.naive_max)
    naive_rate = n_naive / t_naive

    print(
        f"\nmodel {model.name} ({model.meta.stamp_size_pix} px, {model.meta.n_members} members), "
        f"device {args.device}, {args.workers} worker(s) x {args.threads} thread(s)"
    )
    print(f"{'path':<12} {'stamps':>8} {'stamps/s':>10}")
    print(f"{'model-only':<12} {len(normalised):>8} {model_rate:>10.1f}")
    print(f"{'lenscan':<12} {summary['scored']:>8} {lenscan_rate:>10.1f}")
    print(f"{'naive':<12} {n_naive:>8} {naive_rate:>10.1f}")
    print(f"\nlenscan / model-only = {lenscan_rate / model_rate:.2f}")
    print(f"lenscan / naive      = {lenscan_rate / naive_rate:.2f}")
    print(f"worker seconds by stage: {summary['worker_seconds']}")


if __name__ == "__main__":
    main()
