"""End-to-end recall and false-positive rate of a model through ``lenscan.scan``.

For each seed: build a fresh synthetic survey (never seen in training), scan it at the model's
default threshold, compare with the truth table; then print the pooled figures, which is what
the issue's targets refer to (recall >= 0.8 of injected lenses with theta_E >= 1.2" and source
S/N >= 20 that pass the colour cut; < 1 false candidate per 1000 scored non-lenses).

Usage: python benchmarks/recall_bundled.py [--model default] [--seeds 101 202 303 2026 7]
       [--tiles 6] [--tile-size 1536] [--lenses-per-tile 25]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from distributed import Client, LocalCluster

from lenscan.scan import read_scored, scan
from lenscan.simulate import make_survey
from lenscan.table import read_parquet_table, recall_against_truth


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--seeds", type=int, nargs="+", default=[101, 202, 303, 2026, 7])
    p.add_argument("--tiles", type=int, default=6)
    p.add_argument("--tile-size", type=int, default=1536)
    p.add_argument("--lenses-per-tile", type=int, default=25)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lenscan-recall-"))
    pooled = {"n_bright": 0, "found_bright": 0, "n_lenses": 0, "found": 0, "n_non": 0, "n_false": 0}
    header = (
        f"{'seed':>6} {'lenses':>7} {'recall':>7} {'bright':>7} {'recall_b':>9} {'non-lens':>9}"
    )
    print(header + f" {'false':>6} {'per 1000':>9} {'s':>6}")
    with (
        LocalCluster(
            n_workers=args.workers, threads_per_worker=1, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        for seed in args.seeds:
            t0 = time.perf_counter()
            url = str(tmp / f"survey-{seed}.zarr")
            make_survey(
                url,
                n_tiles=args.tiles,
                seed=seed,
                tile_size_pix=args.tile_size,
                lenses_per_tile=args.lenses_per_tile,
            )
            out = str(tmp / f"scan-{seed}")
            table = scan(url, out=out, model=args.model, client=client, gallery_size=0,
                         progress=False)  # fmt: skip
            r = recall_against_truth(
                read_scored(out),
                read_parquet_table(f"{url}/truth.parquet"),
                threshold=table.meta["threshold"],
            )
            pooled["n_bright"] += r["n_bright"]
            pooled["found_bright"] += round(r["recall_bright"] * r["n_bright"])
            pooled["n_lenses"] += r["n_lenses_scored"]
            pooled["found"] += round(r["recall"] * r["n_lenses_scored"])
            pooled["n_non"] += r["n_nonlenses"]
            pooled["n_false"] += r["n_false"]
            print(
                f"{seed:>6} {r['n_lenses_scored']:>7} {r['recall']:>7.3f} {r['n_bright']:>7} "
                f"{r['recall_bright']:>9.3f} {r['n_nonlenses']:>9} {r['n_false']:>6} "
                f"{r['false_per_1000']:>9.2f} {time.perf_counter() - t0:>6.1f}"
            )
    print(
        f"pooled: recall {pooled['found'] / pooled['n_lenses']:.3f} of {pooled['n_lenses']}, "
        f"bright recall {pooled['found_bright'] / pooled['n_bright']:.3f} of "
        f"{pooled['n_bright']}, false {pooled['n_false']} of {pooled['n_non']} = "
        f"{1000 * pooled['n_false'] / pooled['n_non']:.2f} per 1000 "
        f"(threshold {table.meta['threshold']:.3f})"
    )


if __name__ == "__main__":
    main()
