"""End-to-end recall and false-positive rate of a model through ``lenscan.scan``.

For each seed: build a fresh synthetic survey (never seen in training; with confusers and
artefacts, as ``make_survey`` now makes them), scan it with the default cut, compare with the
truth table; then print the pooled figures and the lens-finding metrics of the scored sources
(AUROC, TPR0, TPR10, FPR at TPR 0.75, purity of the top 1000 at prevalence 1e-3). The target
(issue 11): recall >= 0.85 of injected lenses with theta_E >= 1.2" and source S/N >= 20 that
pass the cut, < 0.5 false candidates per 1000 scored non-lenses.

Seeds: the *calibration* surveys (``--calibrate``) choose the threshold: the highest threshold
keeping at least ``--target-recall`` (default 0.9) of the pooled bright lenses, or with
``--target-false RATE`` the lowest threshold whose pooled false-candidate rate is <= RATE per
1000; ``--record`` stores it in the model's metadata as the scan's default, with the false
candidates per 1000 it lets through and the calibration curve (threshold, false per 1000 and
bright recall, one point per false candidate up to 50 per 1000) that ``lenscan scan
--false-rate`` reads.
The *check* surveys (the default) are never used to choose anything; quote them;
``--record-check`` stores their figures in the model's metadata (``metrics["check"]``).

``--preset lsst`` / ``--preset hsc`` build the surveys with that simulator preset (tiles of the
same 6.7' side as DES's 1536 px unless ``--tile-size`` is given) and scan them with the
survey's default cut (:func:`lenscan.survey_defaults.default_cut_for_survey`) unless ``--cut``.
``--preset euclid`` builds tiles of 2048 px (3.4' at 0.1"/px, so that scans stay quick) scanned
with ``euclid-vis-bright`` (synthetic catalogues have no MER columns for ``euclid-q1``).

Recall is also split by lens variant (issue 21: each >= 0.85): smooth or clumpy source, with or
without a catalogued neighbour 1-3" away, good (<= 1.1x the preset's FWHM) or poor seeing; and
the false-positive rate of the neighbours' own stamps is printed beside the other non-lenses'.

Usage: python benchmarks/recall_bundled.py [--model default] [--seeds ...] [--calibrate
       [--target-recall 0.9 | --target-false RATE] [--record]] [--record-check]
       [--preset des] [--cut NAME] [--tiles 6] [--tile-size 1536]
       [--lenses-per-tile 25] [--threshold T] [--sky varied|plain]
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
from lenscan.metrics import (
    calibration_curve,
    lens_finding_metrics,
    recall_against_truth,
    scored_labels,
    threshold_for_recall,
)
from lenscan.models import read_model_meta
from lenscan.simulate import LensPopulation, make_survey
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


#: Lens variants recall is split by: name -> (truth column, value); seeing is split at 1.1x.
POOR_SEEING_FACTOR = 1.1
VARIANTS: dict[str, tuple[str, object]] = {
    "smooth source": ("source_clumpy", False),
    "clumpy source": ("source_clumpy", True),
    "no neighbour": ("has_neighbour", False),
    "with neighbour": ("has_neighbour", True),
    "good seeing": ("poor_seeing", False),
    "poor seeing": ("poor_seeing", True),
}


def variant_recall(scans: list[tuple], threshold: float) -> dict[str, dict]:
    """Pooled bright recall per lens variant, and the neighbour stamps' false-positive rate.

    ``scans`` holds (scored table, truth table) pairs; truth tables of surveys made before
    issue 21 lack the variant columns and count as smooth, without neighbour, good seeing.
    """
    out: dict[str, dict] = {}
    for name, (column, value) in VARIANTS.items():
        found = total = 0
        for scored, truth in scans:
            t = {k: np.asarray(truth[k]) for k in ("id", "theta_e_arcsec", "source_snr")}
            keep = _variant_column(truth, column) == value
            r = recall_against_truth(scored, {k: v[keep] for k, v in t.items()},
                                     threshold=threshold)  # fmt: skip
            found, total = found + r["n_bright_found"], total + r["n_bright"]
        out[name] = {"n_bright": total, "recall_bright": found / total if total else float("nan")}
    n_nb = n_nb_false = 0
    for scored, truth in scans:
        has_comp = "companion_id" in _names(truth)
        comp = np.asarray(truth["companion_id"] if has_comp else [], dtype=np.int64)
        ids = np.asarray(scored["id"], dtype=np.int64)
        mine = np.isin(ids, comp[comp >= 0])
        best: dict[int, float] = {}
        for i, sc in zip(
            ids[mine].tolist(), np.asarray(scored["score"])[mine].tolist(), strict=True
        ):
            best[i] = max(float(sc), best.get(i, -1.0))
        n_nb += len(best)
        n_nb_false += sum(v >= threshold for v in best.values())
    rate = n_nb_false / n_nb if n_nb else float("nan")
    out["neighbour stamps"] = {"n_scored": n_nb, "n_false": n_nb_false, "false_rate": rate}
    return out


def _sky_options(sky: str) -> dict:
    """make_survey options of a ``varied`` (the default) or ``plain`` (pre-issue-21) sky."""
    if sky == "varied":
        return {}
    plain = LensPopulation(clumpy_fraction=0.0, companion_distance_arcsec=(1.5, 5.0))
    return {"seeing_factor_range": None, "neighbour_fraction": 0.0, "population": plain}


def _names(table) -> list[str]:
    """Column names of an astropy Table or a mapping of columns."""
    return list(table.colnames) if hasattr(table, "colnames") else list(table)


def _variant_column(truth, column: str) -> np.ndarray:
    """A variant column of a truth table (``poor_seeing`` derived from ``seeing_factor``)."""
    n, names = len(truth["id"]), _names(truth)
    if column == "poor_seeing":
        if "seeing_factor" not in names:
            return np.zeros(n, bool)
        return np.asarray(truth["seeing_factor"], dtype=np.float64) > POOR_SEEING_FACTOR
    return np.asarray(truth[column], dtype=bool) if column in names else np.zeros(n, bool)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--calibrate", action="store_true", help="calibration seeds; pick threshold")
    p.add_argument("--target-recall", type=float, default=0.9, help="bright, for --calibrate")
    p.add_argument("--target-false", type=float, default=None, help="per 1000, for --calibrate")
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
    p.add_argument("--sky", choices=("varied", "plain"), default="varied",
                   help="plain: surveys without issue 21's clumpy sources, seeing variation "
                   "and neighbours (as before), to measure what they cost")  # fmt: skip
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
            tag = ("" if args.preset == "des" else f"{args.preset}-") + (
                "plain-" if args.sky == "plain" else ""
            )
            url = str(tmp / f"survey-{tag}{seed}.zarr")
            if not (Path(url) / "truth.parquet").exists():
                make_survey(url, n_tiles=args.tiles, seed=seed, tile_size_pix=tile_size,
                            lenses_per_tile=args.lenses_per_tile, overwrite=True,
                            preset=args.preset, **_sky_options(args.sky))  # fmt: skip
            # One scan folder per model path (two runs' models may share a name).
            slug = str(args.model).strip("/").replace("/", "_")
            out = str(tmp / f"scan-{tag}{seed}-{slug}")
            table = scan(url, out=out, model=args.model, client=client, gallery_size=0,
                         progress=False, resume=True, colour_cut=cut)  # fmt: skip
            truth = read_parquet_table(f"{url}/truth.parquet")
            scans.append((read_scored(out), truth))
            r = recall_against_truth(scans[-1][0], truth, threshold=1.0)
            print(f"{seed:>6} {r['n_lenses_scored']:>7} {r['n_bright']:>7} "
                  f"{r['n_nonlenses']:>9} {time.perf_counter() - t0:>6.1f}")  # fmt: skip
    model_t = float(table.meta["threshold"])
    curve = calibration_curve(*_bright_labels(scans))
    if args.calibrate:
        threshold, rule = _calibrate(scans, args, seeds)
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
    kinds = _kind_rates(scans, tmp, seeds, args.preset, threshold)
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
    print("false rate by kind of non-lens: " + ", ".join(
        f"{k} {v['false_rate']:.2e} ({v['n_false']} of {v['n_scored']})" for k, v in kinds.items()
    ))  # fmt: skip
    variants = variant_recall(scans, threshold)
    print("bright recall by lens variant (target >= 0.85 each):")
    for name in VARIANTS:
        v = variants[name]
        print(f"  {name:<15} {v['recall_bright']:.3f} of {v['n_bright']}")
    nb = variants["neighbour stamps"]
    print(f"  neighbour stamps: {nb['n_false']} of {nb['n_scored']} scored above the threshold "
          f"(false-positive rate {nb['false_rate']:.2e})")  # fmt: skip
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "seeds": list(seeds),
                    "pooled": pooled,
                    "metrics": lf,
                    "kinds": kinds,
                    "variants": variants,
                },
                indent=2,
            )
        )
    if args.record_check:
        if args.calibrate:
            raise SystemExit("--record-check records check surveys: leave out --calibrate")
        _record(args.model, {"check": {"seeds": list(seeds), "cut": cut, "pooled": pooled,
                                       "metrics": lf, "kinds": kinds}})  # fmt: skip
    if args.record:
        if not args.calibrate:
            raise SystemExit("--record needs --calibrate (never record a check-set threshold)")
        _record(args.model, {
            "recommended_threshold": threshold,
            "recommended_threshold_source": (
                f"benchmarks/recall_bundled.py --calibrate --preset {args.preset}: {rule}, "
                f"pooled over the calibration surveys {list(seeds)} (cut {cut})"
            ),
            "calibration": {"seeds": list(seeds), "cut": cut, "pooled": pooled, "metrics": lf,
                            "kinds": kinds},
            "calibration_curve": {"seeds": list(seeds), "cut": cut, "lenses": "bright", **curve},
        })  # fmt: skip


def _bright_labels(scans: list) -> tuple[np.ndarray, np.ndarray]:
    """Labels (1 = bright lens) and best scores of the scored sources; other lenses left out."""
    labels, scores = [], []
    for scored, truth in scans:
        faint = ~((np.asarray(truth["theta_e_arcsec"]) >= 1.2)
                  & (np.asarray(truth["source_snr"]) >= 20))  # fmt: skip
        lab, sc = scored_labels(scored, truth, exclude_ids=np.asarray(truth["id"])[faint])
        labels.append(lab)
        scores.append(sc)
    return np.concatenate(labels), np.concatenate(scores)


def _calibrate(scans: list, args: argparse.Namespace, seeds) -> tuple[float, str]:
    """The calibrated threshold and the rule that picked it, printed."""
    labels, scores = _bright_labels(scans)
    neg = np.sort(scores[labels == 0])[::-1]
    if args.target_false is not None:
        # The lowest threshold letting at most floor(target * N / 1000) of the N pooled
        # non-lenses through: just above the (k+1)-th highest non-lens score.
        k = int(np.floor(args.target_false * neg.size / 1000))
        threshold = float(np.nextafter(np.float32(neg[k]), np.float32(2))) if k < neg.size else 0.0
        rule = f"lowest threshold with <= {args.target_false} false candidates per 1000"
    else:
        threshold = threshold_for_recall(scores[labels == 1], args.target_recall)
        rule = f"highest threshold keeping >= {args.target_recall} of the bright lenses"
    n_false = int((neg.astype(np.float32) >= np.float32(threshold)).sum())
    rate = 1000 * n_false / neg.size
    print(f"calibrated threshold {threshold:.7f} ({rule}): {n_false} of {neg.size} pooled "
          f"non-lenses pass = {rate:.2f} per 1000 (seeds {list(seeds)})")  # fmt: skip
    return threshold, rule


def _kind_rates(scans: list, tmp: Path, seeds, preset: str, threshold: float) -> dict:
    """False rate per kind of scored non-lens: each confuser kind, the second galaxy of a
    merger, objects within 3" of a coadd artefact, and plain galaxies (the rest)."""
    counts: dict[str, list[int]] = {}
    tag = "" if preset == "des" else f"{preset}-"
    for (scored, truth), seed in zip(scans, seeds, strict=True):
        url = tmp / f"survey-{tag}{seed}.zarr"
        conf = read_parquet_table(f"{url}/confusers.parquet")
        kind = {int(i): str(k) for i, k in zip(conf["id"], conf["kind"], strict=True)}
        for c in np.asarray(conf["companion_id"])[np.asarray(conf["kind"]) == "merger"]:
            if c >= 0:
                kind.setdefault(int(c), "merger_companion")
        near_art = _near_artefacts(scored, read_parquet_table(f"{url}/artefacts.parquet"))
        ids = np.asarray(scored["id"]).astype(np.int64)
        sc = np.asarray(scored["score"], dtype=np.float64)
        lens_or_comp = set(np.asarray(truth["id"]).tolist())
        if "companion_id" in truth.colnames:
            lens_or_comp |= set(np.asarray(truth["companion_id"]).tolist())
        best: dict[int, tuple[float, str]] = {}
        for i, s, art in zip(ids.tolist(), sc.tolist(), near_art.tolist(), strict=True):
            if i in lens_or_comp:
                continue
            k = kind.get(i, "artefact" if art else "plain")
            best[i] = (max(s, best.get(i, (-1.0, k))[0]), k)
        for s, k in best.values():
            c = counts.setdefault(k, [0, 0])
            c[0] += 1
            c[1] += int(s >= threshold)
    return {k: {"n_scored": n, "n_false": f, "false_rate": f / n if n else float("nan")}
            for k, (n, f) in sorted(counts.items())}  # fmt: skip


def _near_artefacts(scored, artefacts, radius_pix: float = 11.4) -> np.ndarray:
    """Whether each scored row lies within 3" (11.4 DES px) of an artefact of its tile."""
    from scipy.spatial import cKDTree

    tiles = np.asarray(scored["tile"]).astype(str)
    xy = np.stack([np.asarray(scored["x"]), np.asarray(scored["y"])], 1).astype(float)
    out = np.zeros(len(tiles), dtype=bool)
    a_tile = np.asarray(artefacts["tile"]).astype(str)
    a_xy = np.stack([np.asarray(artefacts["x"]), np.asarray(artefacts["y"])], 1).astype(float)
    for t in np.unique(tiles):
        pts = a_xy[(a_tile == t) & np.isfinite(a_xy).all(1)]
        if len(pts):
            rows = tiles == t
            out[rows] = cKDTree(pts).query(xy[rows], distance_upper_bound=radius_pix)[0] < np.inf
    return out


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
