"""End-to-end recall and false-positive rate of a model through ``lenscan.scan``.

For each seed: build a fresh synthetic survey (never seen in training; with confusers and
artefacts, as ``make_survey`` now makes them), scan it with the default cut, compare with the
truth table; then print the pooled figures and the lens-finding metrics of the scored sources
(AUROC, TPR0, TPR10, FPR at TPR 0.75, purity of the top 1000 at prevalence 1e-3). The target
(issue 11): recall >= 0.85 of injected lenses with theta_E >= 1.2" and source S/N >= 20 that
pass the cut, < 0.5 false candidates per 1000 scored non-lenses.

Seeds: the *calibration* surveys (``--calibrate``) choose the threshold: the lowest threshold
whose pooled false-candidate rate is <= ``--target-false`` per 1000 (default 0.25, half the
target, as a margin); ``--record`` stores it in the model's metadata as the scan's default.
The *check* surveys (the default) are never used to choose anything; quote them;
``--record-check`` stores their figures in the model's metadata (``metrics["check"]``).

``--preset lsst`` / ``--preset hsc`` build the surveys with that simulator preset (tiles of the
same 6.7' side as DES's 1536 px unless ``--tile-size`` is given) and scan them with the
survey's default cut (:func:`lenscan.survey_defaults.default_cut_for_survey`) unless ``--cut``.
``--preset euclid`` builds tiles of 2048 px (3.4' at 0.1"/px, so that scans stay quick) scanned
with ``euclid-vis-bright`` (synthetic catalogues have no MER columns for ``euclid-q1``).

Usage: python benchmarks/recall_bundled.py [--model default] [--seeds ...] [--calibrate
       [--record]] [--record-check] [--preset des] [--cut NAME] [--tiles 6] [--tile-size 1536]
       [--lenses-per-tile 25] [--threshold T]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from distributed import Client, LocalCluster

from lenscan.cuts import cut_tile_size_pix
from lenscan.metrics import lens_finding_metrics, recall_against_truth, scored_labels
from lenscan.models import read_model_meta
from lenscan.simulate import make_survey
from lenscan.survey_defaults import default_cut_for_survey
from lenscan.sweep import read_scored, scan
from lenscan.table import read_parquet_table

CALIBRATION_SEEDS = (101, 202, 303, 2026, 7, 11, 12, 13)
CHECK_SEEDS = (21, 22, 23, 24, 25, 26, 27, 28)
# Euclid's 6.7' tiles would be 4040 px of four bands: 2048 px keeps each scan to seconds.
_TILE_SIZE = {"euclid": 2048}


def _pool(results: list[dict], threshold: float) -> dict:
    n_b = sum(r["n_bright"] for r in results)
    f_b = sum(round(r["recall_bright"] * r["n_bright"]) for r in results if r["n_bright"])
    n_l = sum(r["n_lenses_scored"] for r in results)
    f_l = sum(round(r["recall"] * r["n_lenses_scored"]) for r in results if r["n_lenses_scored"])
    n_n = sum(r["n_nonlenses"] for r in results)
    n_f = sum(r["n_false"] for r in results)
    return {
        "threshold": threshold,
        "recall": f_l / n_l,
        "n_lenses": n_l,
        "recall_bright": f_b / n_b,
        "n_bright": n_b,
        "n_false": n_f,
        "n_nonlenses": n_n,
        "false_per_1000": 1000 * n_f / n_n,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--calibrate", action="store_true", help="calibration seeds; pick threshold")
    p.add_argument("--target-false", type=float, default=0.25, help="per 1000, for --calibrate")
    p.add_argument("--record", action="store_true", help="store the calibrated threshold")
    p.add_argument("--threshold", type=float, default=None, help="default: the model's")
    p.add_argument("--tiles", type=int, default=6)
    p.add_argument("--tile-size", type=int, default=None,
                   help="default: 6.7' (1536 DES px); euclid: 2048 px")  # fmt: skip
    p.add_argument("--preset", default="des", help="simulator preset: des, lsst, hsc, euclid")
    p.add_argument("--cut", default=None, help="colour cut (default: the preset survey's)")
    p.add_argument("--record-check", action="store_true", help="store check figures in model")
    p.add_argument("--lenses-per-tile", type=int, default=25)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", default=None, help="write the figures here")
    p.add_argument("--workdir", default=None, help="keep surveys and scans here (reused)")
    args = p.parse_args()
    seeds = args.seeds or (CALIBRATION_SEEDS if args.calibrate else CHECK_SEEDS)
    tile_size = args.tile_size or _TILE_SIZE.get(args.preset) or cut_tile_size_pix(args.preset)
    cut = args.cut or default_cut_for_survey(f"synthetic-{args.preset}")
    tmp = Path(args.workdir or tempfile.mkdtemp(prefix="lenscan-recall-"))
    scans = []
    print(f"{'seed':>6} {'lenses':>7} {'bright':>7} {'non-lens':>9} {'s':>6}")
    with (
        LocalCluster(
            n_workers=args.workers, threads_per_worker=1, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        for seed in seeds:
            t0 = time.perf_counter()
            tag = "" if args.preset == "des" else f"{args.preset}-"
            url = str(tmp / f"survey-{tag}{seed}.zarr")
            if not (Path(url) / "truth.parquet").exists():
                make_survey(url, n_tiles=args.tiles, seed=seed, tile_size_pix=tile_size,
                            lenses_per_tile=args.lenses_per_tile, overwrite=True,
                            preset=args.preset)  # fmt: skip
            out = str(tmp / f"scan-{tag}{seed}-{Path(str(args.model)).name}")
            table = scan(url, out=out, model=args.model, client=client, gallery_size=0,
                         progress=False, resume=False, colour_cut=cut)  # fmt: skip
            truth = read_parquet_table(f"{url}/truth.parquet")
            scans.append((read_scored(out), truth))
            r = recall_against_truth(scans[-1][0], truth, threshold=1.0)
            print(f"{seed:>6} {r['n_lenses_scored']:>7} {r['n_bright']:>7} "
                  f"{r['n_nonlenses']:>9} {time.perf_counter() - t0:>6.1f}")  # fmt: skip
    model_t = float(table.meta["threshold"])
    if args.calibrate:
        # The lowest threshold letting at most floor(target * N / 1000) of the N pooled
        # non-lenses through: just above the (k+1)-th highest non-lens score.
        neg = np.sort(
            np.concatenate([sc[lab == 0] for lab, sc in (scored_labels(s, tr) for s, tr in scans)])
        )[::-1]
        k = int(np.floor(args.target_false * neg.size / 1000))
        threshold = float(np.nextafter(np.float32(neg[k]), np.float32(2))) if k < neg.size else 0.0
        print(f"calibrated threshold {threshold:.7f}: at most {k} of {neg.size} pooled non-lenses "
              f"pass (target {args.target_false} per 1000, seeds {list(seeds)})")  # fmt: skip
    else:
        threshold = model_t if args.threshold is None else args.threshold
    per = [recall_against_truth(s, tr, threshold=threshold) for s, tr in scans]
    pooled = _pool(per, threshold)
    labels, best = [], []
    for s, tr in scans:
        lab, sc = scored_labels(s, tr)
        labels.append(lab)
        best.append(sc)
    lf = lens_finding_metrics(np.concatenate(labels), np.concatenate(best))
    for seed, r in zip(seeds, per, strict=True):
        print(f"  seed {seed}: bright recall {r['recall_bright']:.3f} of {r['n_bright']}, "
              f"false {r['n_false']} of {r['n_nonlenses']}")  # fmt: skip
    print(
        f"pooled ({'calibration' if args.calibrate else 'check'} seeds {list(seeds)}) at "
        f"threshold {threshold:.5f}: recall {pooled['recall']:.3f} of {pooled['n_lenses']}, "
        f"bright recall {pooled['recall_bright']:.3f} of {pooled['n_bright']}, false "
        f"{pooled['n_false']} of {pooled['n_nonlenses']} = {pooled['false_per_1000']:.2f} per 1000"
    )
    print(
        f"scored sources: AUROC {lf['auroc']:.4f}, TPR0 {lf['tpr0']:.3f}, TPR10 "
        f"{lf['tpr10']:.3f}, FPR at TPR 0.75 {lf['fpr_at_tpr_0.75']:.2e} "
        f"({lf['n_false_at_tpr_0.75']} of {lf['n_negatives']}), purity of the top 1000 "
        f"{lf['purity_top_1000']:.3f} (prevalence 1e-3, 1e6 objects)"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"seeds": list(seeds), "pooled": pooled, "metrics": lf}, indent=2)
        )
    if args.record_check:
        if args.calibrate:
            raise SystemExit("--record-check records check surveys: leave out --calibrate")
        _record(args.model, {"check": {"seeds": list(seeds), "cut": cut, "pooled": pooled,
                                       "metrics": lf}})  # fmt: skip
    if args.record:
        if not args.calibrate:
            raise SystemExit("--record needs --calibrate (never record a check-set threshold)")
        _record(args.model, {
            "recommended_threshold": threshold,
            "recommended_threshold_source": (
                f"benchmarks/recall_bundled.py --calibrate --preset {args.preset}: lowest "
                f"threshold with <= {args.target_false} false candidates per 1000 scored "
                f"non-lenses, pooled over the calibration surveys {list(seeds)} (cut {cut})"
            ),
            "calibration": {"seeds": list(seeds), "cut": cut, "pooled": pooled, "metrics": lf},
        })  # fmt: skip


def _record(model: str, metrics: dict) -> None:
    """Merge ``metrics`` into the model's metadata ``metrics``."""
    from lenscan.models.registry import resolve_model_files

    _, meta_path = resolve_model_files(model)
    doc = json.loads(meta_path.read_text())
    doc["metrics"].update(metrics)
    meta_path.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    read_model_meta(str(meta_path))  # still valid
    print(f"recorded in {meta_path}")


if __name__ == "__main__":
    main()
