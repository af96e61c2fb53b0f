"""Test-time dihedral averaging against plain scoring, on the stamps a scan scored.

Reads the surveys and scans that ``benchmarks/recall_bundled.py --workdir DIR`` left in DIR
(``survey-SEED.zarr``, ``scan-SEED-MODEL``), re-reads every scored stamp (masked pixels NaN, as
the scan does), scores it plainly and with ``LensModel.score(dihedral=True)``, calibrates each
variant's threshold on the calibration seeds (lowest threshold with <= 0.25 false candidates
per 1000 scored non-lenses, pooled) and prints both variants' figures on the check seeds.

Usage: python benchmarks/tta_compare.py --workdir runs/recall --model MODEL
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from lenscan.metrics import lens_finding_metrics, recall_against_truth, scored_labels
from lenscan.models import load_model
from lenscan.stamps import mask_stamps, normalise_stamps
from lenscan.survey import open_survey, read_stamps
from lenscan.sweep import read_scored
from lenscan.table import read_parquet_table

CALIBRATION_SEEDS = (101, 202, 303, 2026, 7, 11, 12, 13)
CHECK_SEEDS = (21, 22, 23, 24, 25, 26, 27, 28)


def rescore(workdir: Path, seed: int, model, scan_name: str):
    survey = open_survey(str(workdir / f"survey-{seed}.zarr"))
    scored = read_scored(str(workdir / f"scan-{seed}-{scan_name}"))
    tiles = np.asarray(scored["tile"]).astype(str)
    plain = np.zeros(len(scored))
    tta = np.zeros(len(scored))
    size = model.meta.stamp_size_pix
    for tile_id in np.unique(tiles):
        rows = np.flatnonzero(tiles == tile_id)
        tile = survey.tile(tile_id)
        x, y = np.asarray(scored["x"])[rows], np.asarray(scored["y"])[rows]
        stamps, _ = read_stamps(tile, x, y, size, bands=model.meta.bands)
        mask, _ = read_stamps(tile, x, y, size, array="mask", bands=model.meta.bands)
        stamps, _ = mask_stamps(stamps, mask=mask)
        z = normalise_stamps(torch.from_numpy(stamps), model.meta.normalisation)
        plain[rows] = model.score(z).mean(dim=1).numpy()
        tta[rows] = model.score(z, dihedral=True).mean(dim=1).numpy()
    truth = read_parquet_table(str(workdir / f"survey-{seed}.zarr" / "truth.parquet"))
    return scored, plain, tta, truth


def calibrate(parts, target: float = 0.25) -> float:
    grid = np.unique(np.r_[np.linspace(0.5, 0.99, 50), 1 - np.logspace(-2, -5, 31)])
    for t in grid:
        rs = [recall_against_truth(s, tr, threshold=t) for s, tr in parts]
        if 1000 * sum(r["n_false"] for r in rs) / sum(r["n_nonlenses"] for r in rs) <= target:
            return float(t)
    return 1.0


def report(name: str, parts, threshold: float) -> None:
    rs = [recall_against_truth(s, tr, threshold=threshold) for s, tr in parts]
    n_b = sum(r["n_bright"] for r in rs)
    f_b = sum(r["n_bright_found"] for r in rs)
    n_n = sum(r["n_nonlenses"] for r in rs)
    n_f = sum(r["n_false"] for r in rs)
    labels, scores = zip(*(scored_labels(s, tr) for s, tr in parts), strict=True)
    lf = lens_finding_metrics(np.concatenate(labels), np.concatenate(scores))
    print(
        f"{name}: threshold {threshold:.5f}: bright recall {f_b / n_b:.3f} of {n_b}, false "
        f"{n_f} of {n_n} = {1000 * n_f / n_n:.2f} per 1000; AUROC {lf['auroc']:.4f}, TPR0 "
        f"{lf['tpr0']:.3f}, TPR10 {lf['tpr10']:.3f}, FPR@TPR0.75 {lf['fpr_at_tpr_0.75']:.2e}, "
        f"purity top 1000 {lf['purity_top_1000']:.3f}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--model", default="default")
    args = p.parse_args()
    model = load_model(args.model)
    scan_name = Path(str(args.model)).name
    work = Path(args.workdir)
    out = {}
    for group, seeds in (("calibration", CALIBRATION_SEEDS), ("check", CHECK_SEEDS)):
        plain, tta = [], []
        for seed in seeds:
            scored, sp, st, truth = rescore(work, seed, model, scan_name)
            a, b = scored.copy(), scored.copy()
            a["score"], b["score"] = sp, st
            plain.append((a, truth))
            tta.append((b, truth))
        out[group] = (plain, tta)
    for name, k in (("plain", 0), ("dihedral", 1)):
        t = calibrate(out["calibration"][k])
        report(f"{name} (check seeds, threshold from calibration seeds)", out["check"][k], t)


if __name__ == "__main__":
    main()
