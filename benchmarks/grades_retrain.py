"""Do visual grades fed back into training cut false candidates at equal recall?

1. Build a grading survey, scan it with the base model at a low threshold (``--grade-threshold``)
   and grade every candidate from the truth table (a scripted grader: injected lenses A, their
   companions C, everything else N); merge the grades onto the candidate table.
2. Fine-tune the base model twice with the same recipe and steps: with the grades
   (``lenscan train --grades``) and without them (the control: same extra training, no grades).
3. Scan fresh surveys (seeds never used above) with the three models and report, pooled, the false
   candidates per 1000 scored non-lenses at equal recall of bright injected lenses
   (theta_E >= 1.2", source S/N >= 20), each model's threshold set to reach that recall.

``--recipe bundled`` fine-tunes the bundled model with its own recipe (simulations plus real-galaxy
classes from a lens-free synthetic survey). ``--recipe sims-only`` first trains a base model on
simulations alone (the poster's situation: it has never seen the survey's own galaxies) and
fine-tunes it on simulations alone, so that the survey's confusers reach the graded model only
through the grades.

Everything is kept under ``--work``; a second run reuses the surveys, models and scans there (so
extra ``--recalls`` cost nothing).

Usage (about 10-30 min on 2 busy CPU cores; OMP_NUM_THREADS=1):
    python benchmarks/grades_retrain.py --work /tmp/grades-retrain [--recipe sims-only]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import yaml
from distributed import Client, LocalCluster

from lenscan.grades import merge_to_file, write_scripted_grades
from lenscan.simulate import make_survey
from lenscan.simulate.survey import read_truth
from lenscan.survey import SurveyFormatError, open_survey
from lenscan.sweep import read_scored, scan
from lenscan.table import read_parquet_table
from lenscan.training import TrainConfig, train

FINETUNE = Path(__file__).resolve().parents[1] / "workflows" / "train-des-bundled-finetune.yaml"


def best_per_id(ids: np.ndarray, scores: np.ndarray) -> dict[int, float]:
    """Highest score of each id (a source seen by two overlapping tiles counts once)."""
    best: dict[int, float] = {}
    for i, s in zip(ids.tolist(), scores.tolist(), strict=True):
        best[i] = max(s, best.get(i, -1.0))
    return best


def split_scores(scored, truth) -> tuple[np.ndarray, np.ndarray]:
    """Scores of bright lenses and of non-lenses (companions left out), one per source."""
    ids = np.asarray(scored["id"], np.int64)
    score = np.asarray(scored["score"], np.float64)
    bright = truth["id"][(truth["theta_e_arcsec"] >= 1.2) & (truth["source_snr"] >= 20)]
    comp = truth["companion_id"][truth["companion_id"] >= 0]
    lens = np.isin(ids, bright)
    other = ~np.isin(ids, truth["id"]) & ~np.isin(ids, comp)
    return (
        np.array(list(best_per_id(ids[lens], score[lens]).values())),
        np.array(list(best_per_id(ids[other], score[other]).values())),
    )


def false_at_recall(lens: np.ndarray, other: np.ndarray, recall: float) -> tuple[float, int]:
    """Threshold reaching ``recall`` of ``lens`` and the number of ``other`` at or above it."""
    s = np.sort(lens)[::-1]
    t = float(s[max(int(np.ceil(recall * len(s))) - 1, 0)])
    return t, int((other >= t).sum())


def fit(
    args,
    work: Path,
    name: str,
    real_url: str | None,
    grades: str | None,
    init_from: str | None,
    steps: int,
) -> str:
    """Train (or fine-tune) with the bundled recipe; real-galaxy classes only with ``real_url``."""
    stem = work / f"train-{name}" / name
    if stem.with_suffix(".safetensors").exists():
        print(f"reusing {stem}", flush=True)
        return str(stem)
    data = yaml.safe_load(FINETUNE.read_text())
    data.update(
        name=name, output=str(stem.parent), init_from=init_from, steps=steps,
        warmup_steps=20, replay_size=4096, val_size=1000, val_every=steps,
        checkpoint_every=steps, eval_size=0, grades=grades, device="cpu",
        n_members=1 if args.recipe == "sims-only" else data["n_members"],
    )  # fmt: skip
    if real_url:
        data["training_set"] = {**data["training_set"], "survey_url": real_url,
                                "max_real_cutouts": 4000}  # fmt: skip
    else:
        data["training_set"] = {**data["training_set"], "survey_url": None,
                                "class_fractions": [0.5, 0.5, 0.0, 0.0]}  # fmt: skip
    t0 = time.perf_counter()
    result = train(TrainConfig.from_dict(data), resume=False, progress=False)
    print(f"trained {name} ({steps} steps): {time.perf_counter() - t0:.0f} s", flush=True)
    return str(result.model_path)


def survey(url: str, **kwargs) -> str:
    """Make a synthetic survey at ``url`` unless one is there."""
    try:
        open_survey(url)
    except (SurveyFormatError, FileNotFoundError):
        make_survey(url, tile_size_pix=1536, overwrite=True, **kwargs)
    return url


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work", required=True, help="folder for surveys, scans and models")
    p.add_argument("--model", default="lenscan-des-v1", help="base model")
    p.add_argument("--grade-seed", type=int, default=9101)
    p.add_argument("--grade-tiles", type=int, default=12)
    p.add_argument("--grade-threshold", type=float, default=0.2)
    p.add_argument("--real-seed", type=int, default=9201)
    p.add_argument("--eval-seeds", type=int, nargs="+", default=[9301, 9302, 9303, 9304])
    p.add_argument("--tiles", type=int, default=6)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--recalls", type=float, nargs="+", default=[0.8, 0.9, 0.95])
    p.add_argument("--recipe", choices=("bundled", "sims-only"), default="bundled")
    p.add_argument("--base-steps", type=int, default=400, help="sims-only base model steps")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        base = args.model
        if args.recipe == "sims-only":
            base = fit(args, work, "sims-only", None, None, None, args.base_steps)
        grade_url = survey(str(work / "grade-survey.zarr"), n_tiles=args.grade_tiles,
                           seed=args.grade_seed, lenses_per_tile=25)  # fmt: skip
        out = str(work / "grade-scan")
        cand = scan(grade_url, out=out, model=base, threshold=args.grade_threshold,
                    client=client, gallery_size=0, progress=False)  # fmt: skip
        truth = read_truth(grade_url)
        comp = truth["companion_id"][truth["companion_id"] >= 0]
        csv_path = str(work / "truth-grader.csv")
        write_scripted_grades(cand, truth["id"], csv_path, possible_ids=comp)
        grades = str(work / "grades.parquet")
        merged = merge_to_file([csv_path], grades, candidates=f"{out}/candidates.parquet")
        counts = {g: int((np.asarray(merged["grade"]) == g).sum()) for g in "ABCN"}
        print(f"grading survey: {len(cand)} candidates at score >= {args.grade_threshold}, "
              f"grades {counts}", flush=True)  # fmt: skip
        real_url = None
        if args.recipe == "bundled":
            real_url = survey(str(work / "real-survey.zarr"), n_tiles=8, seed=args.real_seed,
                              lenses_per_tile=0)  # fmt: skip
        models = {
            "base": base,
            "control": fit(args, work, "control", real_url, None, base, args.steps),
            "graded": fit(args, work, "graded", real_url, grades, base, args.steps),
        }
        pooled = {m: ([], []) for m in models}
        for seed in args.eval_seeds:
            url = survey(str(work / f"eval-{seed}.zarr"), n_tiles=args.tiles, seed=seed,
                         lenses_per_tile=25)  # fmt: skip
            truth = read_parquet_table(f"{url}/truth.parquet")
            for name, model in models.items():
                out = str(work / f"eval-{seed}-{name}")
                scan(url, out=out, model=model, threshold=0.5, client=client, gallery_size=0,
                     progress=False)  # fmt: skip
                lens, other = split_scores(read_scored(out), truth)
                pooled[name][0].append(lens)
                pooled[name][1].append(other)
            print(f"eval survey {seed} scanned", flush=True)
    print(
        f"\nrecipe {args.recipe}; fresh surveys {args.eval_seeds} "
        f"({args.tiles} tiles of 1536^2 px, 25 lenses each)"
    )
    print(f"{'model':>8} {'recall':>7} {'threshold':>10} {'false':>6} {'non-lenses':>11} "
          f"{'per 1000':>9} {'lenses':>7}")  # fmt: skip
    for name in models:
        lens, other = np.concatenate(pooled[name][0]), np.concatenate(pooled[name][1])
        for r in args.recalls:
            t, n_false = false_at_recall(lens, other, r)
            print(f"{name:>8} {r:>7.2f} {t:>10.4f} {n_false:>6} {len(other):>11} "
                  f"{1000 * n_false / len(other):>9.2f} {len(lens):>7}")  # fmt: skip


if __name__ == "__main__":
    main()
