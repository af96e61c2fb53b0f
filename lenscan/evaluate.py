"""Evaluate a lens-finding model on a fresh held-out simulated set.

Metrics: ROC AUC, TPR0 and TPR10, the FPR at TPR 0.75, the purity of the top 1,000 at a stated
prevalence, the true-positive rate at fixed false-positive rates (1e-2, 1e-3, 1e-4) with the
number of negatives behind each, completeness as a function of Einstein radius and source
magnitude, and a ROC plot. The metric kernels live in :mod:`lenscan.metrics` (re-exported here).
:func:`lenscan.cuts.evaluate_cut` measures a colour cut's completeness (``lenscan evaluate
--cut``).

A TPR at FPR ``f`` measured on ``n_neg`` negatives rests on ``f * n_neg`` false positives: below
about 10 it is noisy, below 1 it is not measured at all (reported as ``None``). FPR = 1e-4 needs
>= 1e5 negatives to mean something.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lenscan._device import resolve_device
from lenscan._io import atomic_write_bytes
from lenscan._json import json_document_bytes, jsonable
from lenscan.datasets import (
    band_indices,
    build_training_set,
    load_real_cutouts,
    make_batch,
)
from lenscan.metrics import (
    completeness_table,
    lens_finding_metrics,
    roc_auc,
    roc_curve,
    tpr_at_fpr,
)
from lenscan.models.registry import DEFAULT_MODEL

__all__ = [
    "EvalResult",
    "completeness_table",
    "evaluate",
    "evaluate_after_training",
    "record_evaluation",
    "roc_auc",
    "roc_curve",
    "tpr_at_fpr",
]

#: False-positive rates at which the TPR is reported.
DEFAULT_FPRS = (1e-2, 1e-3, 1e-4)
#: Einstein-radius bin edges (arcsec) of the completeness table.
THETA_E_BINS = (0.5, 0.8, 1.2, 1.6, 2.0, 2.5, 3.5)
#: Source-magnitude bin edges (AB, in the brightest model band) of the completeness table.
SOURCE_MAG_BINS = (19.0, 20.0, 21.0, 22.0, 23.0, 24.0, 25.0)


# --------------------------------------------------------------------------------------
# Evaluation on simulations
# --------------------------------------------------------------------------------------
@dataclass
class EvalResult:
    """Metrics of a model on a held-out simulated set (see :func:`evaluate`)."""

    model: str
    sha256: str
    n: int
    n_positives: int
    n_negatives: int
    seed: int
    auc: float
    tpr_at_fpr: list[dict[str, Any]]
    threshold: float
    threshold_source: str
    completeness_overall: float
    completeness_vs_theta_e: list[dict[str, Any]]
    completeness_vs_source_mag: list[dict[str, Any]]
    auc_per_member: list[float]
    fpr_per_kind: dict[str, Any]
    wall_time_s: float
    roc_png: str | None = None
    survey_url: str | None = None
    recommended_threshold: float | None = None
    tpr_at_fpr_real: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dictionary of the result."""
        return jsonable(self.__dict__, "evaluation")

    def summary_metrics(self) -> dict[str, Any]:
        """The headline numbers, for a model's ``metrics`` metadata."""
        out: dict[str, Any] = {
            "auc": self.auc,
            "n_eval": self.n,
            "n_eval_positives": self.n_positives,
            "n_eval_negatives": self.n_negatives,
            "eval_seed": self.seed,
        }
        for row in self.tpr_at_fpr:
            key = f"{row['fpr']:.0e}".replace("e-0", "e-")
            out[f"tpr_at_fpr_{key}"] = row["tpr"]
            out[f"threshold_at_fpr_{key}"] = row["threshold"]
        for row in self.tpr_at_fpr_real:
            key = f"{row['fpr']:.0e}".replace("e-0", "e-")
            out[f"tpr_at_fpr_{key}_real"] = row["tpr"]
            out[f"threshold_at_fpr_{key}_real"] = row["threshold"]
        out["recommended_threshold"] = self.recommended_threshold
        out["completeness_threshold"] = self.threshold
        out["completeness_overall"] = self.completeness_overall
        out["completeness_vs_theta_e"] = self.completeness_vs_theta_e
        out["completeness_vs_source_mag"] = self.completeness_vs_source_mag
        out["fpr_per_kind"] = self.fpr_per_kind
        out["auc_per_member"] = self.auc_per_member
        out.update(self.extra)
        return out

    def format(self) -> str:
        """Human-readable report."""
        lines = [
            f"model {self.model} (sha256 {self.sha256[:12]}), {self.n} held-out simulated stamps "
            f"({self.n_positives} lenses, {self.n_negatives} non-lenses), seed {self.seed}",
            f"ROC AUC: {self.auc:.4f} (members: "
            + ", ".join(f"{a:.4f}" for a in self.auc_per_member)
            + ")",
        ]
        for row in self.tpr_at_fpr:
            tpr = "not measurable" if row["tpr"] is None else f"{row['tpr']:.3f}"
            lines.append(
                f"TPR at FPR {row['fpr']:.0e}: {tpr} (threshold {_fmt(row['threshold'])}, "
                f"{row['n_negatives']} negatives -> {row['expected_false_positives']:.1f} "
                "false positives allowed)"
            )
        for row in self.tpr_at_fpr_real:
            tpr = "not measurable" if row["tpr"] is None else f"{row['tpr']:.3f}"
            lines.append(
                f"TPR at FPR {row['fpr']:.0e} on real-galaxy non-lenses only: {tpr} (threshold "
                f"{_fmt(row['threshold'])}, {row['n_negatives']} real non-lenses)"
            )
        lf = self.extra.get("lens_finding")
        if lf:
            lines.append(
                f"TPR0 {lf['tpr0']:.3f}, TPR10 {lf['tpr10']:.3f}, FPR at TPR 0.75 "
                f"{lf['fpr_at_tpr_0.75']:.2e} ({lf['n_false_at_tpr_0.75']} of "
                f"{lf['n_negatives']} non-lenses), purity of the top 1000 "
                f"{lf['purity_top_1000']:.3f} (prevalence {lf['purity_prevalence']:g} in "
                f"{lf['purity_n_objects']:,} objects)"
            )
        lines.append(f"recommended threshold: {_fmt(self.recommended_threshold)}")
        lines.append(
            f"completeness at threshold {self.threshold:.4g} ({self.threshold_source}): "
            f"{self.completeness_overall:.3f}"
        )
        for title, rows, unit in (
            ("Einstein radius", self.completeness_vs_theta_e, "arcsec"),
            ("source magnitude", self.completeness_vs_source_mag, "mag"),
        ):
            lines.append(f"completeness vs {title} ({unit}):")
            for r in rows:
                c = "   -" if r["completeness"] is None else f"{r['completeness']:.3f}"
                lines.append(f"  [{r['lo']:5.2f}, {r['hi']:5.2f})  n={r['n']:6d}  {c}")
        if self.fpr_per_kind:
            lines.append("false-positive rate per non-lens class at that threshold:")
            for kind, v in self.fpr_per_kind.items():
                lines.append(f"  {kind}: {v['fpr']:.2e} ({v['n_false']}/{v['n']})")
        if self.roc_png:
            lines.append(f"ROC plot: {self.roc_png}")
        return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "none" if value is None else f"{value:.4f}"


def plot_roc(
    labels: np.ndarray,
    scores: np.ndarray,
    path: str | os.PathLike[str],
    *,
    title: str = "",
    member_scores: np.ndarray | None = None,
) -> Path:
    """Save a ROC plot (log FPR axis) as PNG and return its path."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=110)
    n_neg = int((np.asarray(labels) == 0).sum())
    floor = 1.0 / max(n_neg, 1)
    if member_scores is not None:
        for j in range(member_scores.shape[1]):
            f, t, _ = roc_curve(labels, member_scores[:, j])
            ax.plot(np.maximum(f, floor), t, lw=0.8, alpha=0.6, label=f"member {j}")
    f, t, _ = roc_curve(labels, scores)
    ax.plot(
        np.maximum(f, floor),
        t,
        lw=1.8,
        color="k",
        label=f"ensemble (AUC {roc_auc(labels, scores):.4f})",
    )
    for x in DEFAULT_FPRS:
        ax.axvline(x, color="0.7", lw=0.6, ls="--")
    ax.set_xscale("log")
    ax.set_xlim(floor, 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel(f"false-positive rate ({n_neg} non-lenses)")
    ax.set_ylabel("true-positive rate (completeness)")
    ax.set_title(title or "ROC on held-out simulations")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _training_set_from_meta(meta: Any) -> Mapping[str, Any]:
    cfg = meta.training.get("config", {}) if isinstance(meta.training, Mapping) else {}
    ts = cfg.get("training_set")
    if not isinstance(ts, Mapping):
        raise ValueError(
            f"model {meta.name!r} does not record its training_set config in its metadata; "
            "pass training_set= to evaluate()"
        )
    return ts


def _without_mined_negatives(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A recorded training set without kind 5: mined hard negatives are training data (and a
    file on the trainer's disk), never held-out evaluation data; the other kinds keep their
    relative fractions."""
    spec = dict(spec)
    fr = list(spec.get("class_fractions") or [])
    if len(fr) >= 6 and fr[5] > 0:
        fr[5] = 0.0
        total = sum(fr)
        fr = [f / total for f in fr]
        while len(fr) > 5 and fr[-1] == 0:  # no trailing unused kinds
            fr.pop()
        spec["class_fractions"] = fr
        spec["hard_negatives"] = None
    return spec


def simulate_scores(
    model: Any,
    training_set: Any,
    *,
    n: int,
    seed: int,
    device: torch.device,
    batch_size: int = 256,
    real_cutouts: Any = None,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Simulate ``n`` stamps with ``training_set`` and score them with every member.

    Returns arrays ``labels``, ``kind``, ``theta_e_arcsec``, ``source_mag``, ``source_snr`` and
    ``scores`` (n, n_members).
    """
    from tqdm.auto import tqdm

    bidx = band_indices(training_set, model.meta.bands)
    gen = torch.Generator(device=device).manual_seed(int(seed))
    parts: dict[str, list[np.ndarray]] = {
        k: [] for k in ("labels", "kind", "theta_e_arcsec", "source_mag", "source_snr", "scores")
    }
    with tqdm(total=n, desc="evaluate", unit="stamp", disable=not progress) as bar:
        done = 0
        while done < n:
            m = min(batch_size, n - done)
            batch, x = make_batch(
                training_set,
                m,
                generator=gen,
                device=device,
                real_cutouts=real_cutouts,
                band_idx=bidx,
                normalisation=model.meta.normalisation,
            )
            parts["scores"].append(model.score(x, batch_size=batch_size).numpy())
            parts["labels"].append(batch.labels.detach().cpu().numpy())
            parts["kind"].append(batch.kind.detach().cpu().numpy())
            for k in ("theta_e_arcsec", "source_mag", "source_snr"):
                parts[k].append(getattr(batch, k).detach().float().cpu().numpy())
            done += m
            bar.update(m)
    return {k: np.concatenate(v) for k, v in parts.items()}


def evaluate(
    model: Any = None,
    *,
    n: int = 20_000,
    seed: int = 20261125,
    out_dir: str | os.PathLike[str] | None = None,
    training_set: Any = None,
    survey_url: str | None = None,
    threshold: float | None = None,
    device: str = "auto",
    batch_size: int = 256,
    progress: bool = True,
    survey_tiles: int = 16,
) -> EvalResult:
    """Evaluate a model on a fresh held-out simulated set.

    Parameters
    ----------
    model : LensModel, str or path, optional
        The model (default: :data:`lenscan.models.DEFAULT_MODEL`).
    n : int
        Stamps to simulate, with the training set's class fractions. The TPR at FPR ``f`` needs
        ``n_negatives >= 1/f`` to be measurable and ~10x that to be precise.
    seed : int
        Seed of the held-out set; must differ from the training and validation seeds.
    out_dir : path, optional
        Where to write ``roc.png`` and ``evaluation.json``; nothing is written when None.
    training_set : TrainingSetConfig or mapping, optional
        Simulation config; default: the one recorded in the model's metadata.
    survey_url : str, optional
        Survey for the real-galaxy classes (overrides the training set's ``survey_url``; use a
        survey built with another seed than the training survey). By default, when the model's
        recorded training set uses real galaxies, a fresh synthetic survey of ``survey_tiles``
        tiles is built with ``seed`` (in ``out_dir`` when given, else in a temporary directory),
        so that no galaxy seen in training is scored.
    survey_tiles : int
        Tiles of that held-out survey (~140 galaxies inside the DES colour cut per tile).
    threshold : float, optional
        Score threshold for the completeness tables; default: the threshold reaching FPR 1e-3
        on this set (or 1e-2 if 1e-3 is not measurable).
    device : str
        ``"auto"``, ``"cpu"`` or ``"cuda"``.
    batch_size : int
        Stamps per simulated batch and forward pass.
    progress : bool
        Show a progress bar.

    Returns
    -------
    EvalResult
    """
    from lenscan.models import DEFAULT_MODEL, load_model

    if isinstance(n, bool) or not isinstance(n, int) or n < 10:
        raise ValueError(f"n must be an int >= 10, got {n!r}")
    t0 = time.perf_counter()
    dev = resolve_device(device)
    lens_model = load_model(DEFAULT_MODEL if model is None else model, device=dev)
    ts, real = _held_out_set(
        lens_model.meta,
        training_set,
        seed=seed,
        survey_url=survey_url,
        out_dir=out_dir,
        survey_tiles=survey_tiles,
        progress=progress,
    )
    sims = simulate_scores(
        lens_model, ts, n=n, seed=seed, device=dev, batch_size=batch_size, real_cutouts=real,
        progress=progress,
    )  # fmt: skip
    result = _score_held_out_set(lens_model, sims, n=n, seed=seed, threshold=threshold)
    result.survey_url = ts.survey_url
    _write_evaluation(result, sims, out_dir, t0)
    return result


def _held_out_set(
    meta: Any,
    training_set: Any,
    *,
    seed: int,
    survey_url: str | None,
    out_dir: str | os.PathLike[str] | None,
    survey_tiles: int,
    progress: bool,
) -> tuple[Any, Any]:
    """The held-out simulator and its real-galaxy cutouts (``None`` without real classes).

    Without ``training_set`` it is the model's recorded training set (less mined negatives),
    reseeded; without ``survey_url`` its real galaxies come from a fresh synthetic survey.
    """
    ts_spec = _training_set_from_meta(meta) if training_set is None else training_set
    if training_set is None:
        ts_spec = _without_mined_negatives(ts_spec)
    ts = build_training_set(
        ts_spec,
        seed=seed,
        stamp_size_pix=meta.stamp_size_pix,
        bands=meta.bands,
        survey_url=survey_url,
    )
    fractions = ts.class_fractions
    if not (training_set is None and survey_url is None and (fractions[2] or fractions[3])):
        return ts, load_real_cutouts(ts, seed=seed)
    # The training survey's galaxies were seen in training: build a fresh held-out one.
    import tempfile

    if out_dir is not None:
        url = str(Path(out_dir) / f"eval-survey-s{seed}")
        ts = _with_fresh_survey(ts, url, seed=seed, survey_tiles=survey_tiles, progress=progress)
        return ts, load_real_cutouts(ts, seed=seed)
    with tempfile.TemporaryDirectory(prefix="lenscan-eval-") as tmpdir:
        url = str(Path(tmpdir) / "survey.zarr")
        ts = _with_fresh_survey(ts, url, seed=seed, survey_tiles=survey_tiles, progress=progress)
        return ts, load_real_cutouts(ts, seed=seed)  # the cutouts are in memory after this


def _with_fresh_survey(ts: Any, url: str, *, seed: int, survey_tiles: int, progress: bool) -> Any:
    """Build a lens-free synthetic survey at ``url`` and point the training set's real classes
    at it."""
    from lenscan.simulate.survey import make_survey

    if progress:
        print(f"building a held-out synthetic survey ({survey_tiles} tiles, seed {seed}) at {url}")
    make_survey(
        url,
        n_tiles=survey_tiles,
        seed=seed,
        preset=ts.preset,
        bands=ts.bands,
        lenses_per_tile=0,
        overwrite=True,
    )
    return build_training_set(ts, survey_url=url)


def _score_held_out_set(
    lens_model: Any,
    sims: Mapping[str, np.ndarray],
    *,
    n: int,
    seed: int,
    threshold: float | None,
) -> EvalResult:
    """The metrics of the scored held-out stamps (everything but the files and the timing)."""
    labels = sims["labels"].astype(int)
    member_scores = sims["scores"]
    scores = member_scores.mean(axis=1)
    tprs = [tpr_at_fpr(labels, scores, f) for f in DEFAULT_FPRS]
    tprs_real = _tprs_on_real_negatives(labels, scores, sims["kind"])
    recommended = _recommended_threshold(tprs, tprs_real)
    threshold, source = _completeness_threshold(threshold, recommended, tprs)
    selected = scores >= threshold
    lens = labels == 1
    result = EvalResult(
        model=lens_model.meta.name,
        sha256=lens_model.sha256,
        n=n,
        n_positives=int(lens.sum()),
        n_negatives=int((~lens).sum()),
        seed=int(seed),
        auc=roc_auc(labels, scores),
        tpr_at_fpr=tprs,
        threshold=threshold,
        threshold_source=source,
        completeness_overall=float(selected[lens].mean()),
        completeness_vs_theta_e=completeness_table(
            sims["theta_e_arcsec"][lens], selected[lens], THETA_E_BINS
        ),
        completeness_vs_source_mag=completeness_table(
            sims["source_mag"][lens], selected[lens], SOURCE_MAG_BINS
        ),
        auc_per_member=[
            roc_auc(labels, member_scores[:, j]) for j in range(member_scores.shape[1])
        ],
        fpr_per_kind=_fpr_per_kind(sims["kind"], selected),
        wall_time_s=0.0,
        recommended_threshold=recommended,
        tpr_at_fpr_real=tprs_real,
    )
    result.extra.update(_extra_metrics(labels, scores, sims, selected))
    return result


def _tprs_on_real_negatives(
    labels: np.ndarray, scores: np.ndarray, kinds: np.ndarray
) -> list[dict[str, Any]]:
    """TPR at :data:`DEFAULT_FPRS` against the real-galaxy non-lenses (kind 3) only.

    A scan scores real galaxies only, so the FPR that matters in a survey is the one on the
    real-galaxy non-lenses; empty when the set has none.
    """
    real_neg = kinds == 3
    if not real_neg.any():
        return []
    keep = (labels == 1) | real_neg
    return [tpr_at_fpr(labels[keep], scores[keep], f) for f in DEFAULT_FPRS]


def _recommended_threshold(
    tprs: list[dict[str, Any]], tprs_real: list[dict[str, Any]]
) -> float | None:
    """The threshold keeping the FPR <= 1e-3 on all non-lenses and on the real ones."""
    candidates = [next(r["threshold"] for r in tprs if r["fpr"] == 1e-3)]
    if tprs_real:
        candidates.append(next(r["threshold"] for r in tprs_real if r["fpr"] == 1e-3))
    return None if None in candidates else max(candidates)


def _completeness_threshold(
    threshold: float | None, recommended: float | None, tprs: list[dict[str, Any]]
) -> tuple[float, str]:
    """The threshold of the completeness tables and where it comes from."""
    if threshold is not None:
        return float(threshold), "given"
    if recommended is not None:
        return float(recommended), "recommended: FPR <= 1e-3 on all and on real non-lenses"
    at_1e2 = next(r["threshold"] for r in tprs if r["fpr"] == 1e-2)
    if at_1e2 is not None:
        return float(at_1e2), "FPR 1e-2 on this set"
    return 0.5, "0.5 (too few non-lenses for FPR 1e-2)"


#: Names of the non-lens kinds of a simulated set, as reported in ``fpr_per_kind``.
_KIND_NAMES = {
    1: "sim lens galaxy without source",
    3: "real field galaxy",
    4: "simulated confuser",
    5: "hard negative",
    6: "neighbour-centred lens or galaxy",
}


def _fpr_per_kind(kinds: np.ndarray, selected: np.ndarray) -> dict[str, Any]:
    """The false-positive rate of each non-lens kind present at the chosen threshold."""
    out = {}
    for k, name in _KIND_NAMES.items():
        m = kinds == k
        if m.any():
            n_false = int((selected & m).sum())
            out[name] = {"n": int(m.sum()), "n_false": n_false, "fpr": n_false / m.sum()}
    return out


def _extra_metrics(
    labels: np.ndarray,
    scores: np.ndarray,
    sims: Mapping[str, np.ndarray],
    selected: np.ndarray,
) -> dict[str, Any]:
    """The lens-finding metrics and the completeness of large, bright arcs."""
    extra: dict[str, Any] = {"lens_finding": lens_finding_metrics(labels, scores)}
    big = (labels == 1) & (sims["theta_e_arcsec"] >= 1.2) & (sims["source_snr"] >= 20)
    if big.any():
        extra["completeness_theta_e_ge_1.2_snr_ge_20"] = float(selected[big].mean())
        extra["n_theta_e_ge_1.2_snr_ge_20"] = int(big.sum())
    return extra


def _plot_held_out_roc(sims: Mapping[str, np.ndarray], out: Path, name: str, n: int) -> Path:
    """``out/roc.png`` of the ensemble and its members on the held-out set."""
    out.mkdir(parents=True, exist_ok=True)
    member_scores = sims["scores"]
    return plot_roc(
        sims["labels"].astype(int),
        member_scores.mean(axis=1),
        out / "roc.png",
        member_scores=member_scores,
        title=f"{name}: ROC on {n} held-out simulations",
    )


def _write_evaluation(
    result: EvalResult,
    sims: Mapping[str, np.ndarray],
    out_dir: str | os.PathLike[str] | None,
    t0: float,
) -> None:
    """Time the evaluation from ``t0``; with ``out_dir``, save ``roc.png`` and the JSON there."""
    if out_dir is not None:
        result.roc_png = str(_plot_held_out_roc(sims, Path(out_dir), result.model, result.n))
    result.wall_time_s = time.perf_counter() - t0
    if out_dir is not None:
        atomic_write_bytes(
            str(Path(out_dir, "evaluation.json")), json_document_bytes(result.to_dict())
        )


def evaluate_after_training(
    stem: str | os.PathLike[str], config: Any, device: str, progress: bool
) -> dict[str, Any]:
    """Evaluate a just-trained model with its config's ``eval_size``/``eval_seed`` and record it.

    The ``after_export`` hook of :func:`lenscan.training.train` (``lenscan train`` passes it).
    """
    res = evaluate(
        stem,
        n=config.eval_size,
        seed=config.eval_seed,
        out_dir=Path(config.output) / "evaluation",
        device=device,
        progress=progress,
    )
    record_evaluation(stem, res)
    return res.to_dict()


def record_evaluation(
    model_path: str | os.PathLike[str], result: EvalResult, *, key: str | None = None
) -> Path:
    """Store an evaluation's metrics in a model's metadata (the weights are not touched).

    Parameters
    ----------
    model_path : str or path
        Model name or path (see :func:`lenscan.models.resolve_model_files`).
    result : EvalResult
        From :func:`evaluate` on that same model (checked by SHA-256).
    key : str, optional
        Store the metrics under ``metrics[key]`` instead of replacing the top-level metrics
        (default: top level, keeping the training-time validation numbers).

    Returns
    -------
    Path
        The metadata file rewritten.
    """
    from lenscan.models.checkpoint import ModelMeta
    from lenscan.models.registry import resolve_model_files

    _weights, meta_path = resolve_model_files(model_path)
    doc = json.loads(meta_path.read_text())
    if doc.get("weights_sha256") != result.sha256:
        raise ValueError(
            f"{meta_path}: the evaluation is of weights {result.sha256[:12]}..., not of this "
            f"model ({str(doc.get('weights_sha256'))[:12]}...)"
        )
    summary = {
        **result.summary_metrics(),
        "eval_survey_url": result.survey_url,
        "eval_wall_time_s": result.wall_time_s,
    }
    metrics = dict(doc.get("metrics") or {})
    if key is None:
        metrics.update(summary)
    else:
        metrics[key] = summary
    doc["metrics"] = jsonable(metrics, "metrics")
    # Validate before writing.
    ModelMeta.from_dict(
        {k: v for k, v in doc.items() if k != "weights_sha256"}, source=str(meta_path)
    )
    atomic_write_bytes(str(meta_path), json_document_bytes(doc))
    return meta_path


# --------------------------------------------------------------------------------------
# CLI helpers (wired into ``lenscan evaluate`` by lenscan.cli)
# --------------------------------------------------------------------------------------
def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``lenscan evaluate`` arguments to ``parser``."""
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        help="bundled model name or path to a .safetensors/.json model (default: bundled model)",
    )
    parser.add_argument("--n", type=int, default=20_000, help="held-out stamps to simulate")
    parser.add_argument("--seed", type=int, default=20261125, help="seed of the held-out set")
    parser.add_argument("--out", default="evaluation", help="directory for roc.png + JSON")
    parser.add_argument(
        "--survey-url",
        default=None,
        help="survey for the real-galaxy classes (default: build a fresh held-out synthetic one)",
    )
    parser.add_argument(
        "--survey-tiles", type=int, default=16, help="tiles of the held-out synthetic survey"
    )
    parser.add_argument("--threshold", type=float, default=None, help="completeness threshold")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--record", action="store_true", help="store the metrics in the model's .json metadata"
    )
    parser.add_argument(
        "--cut",
        default=None,
        help="evaluate this colour cut instead of a model: its completeness on simulated lenses "
        "(arc light in the catalogue magnitudes) next to its selected fraction of non-lens "
        "galaxies, on lens-rich synthetic surveys (built in --out, or --survey-url)",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="with --cut: seeds of the surveys (default: lenscan.cuts.CHECK_SEEDS)",
    )
    parser.add_argument(
        "--preset",
        default="des",
        help="with --cut: simulator survey preset of the surveys built (des, lsst, hsc, euclid)",
    )
    parser.add_argument(
        "--reference",
        default=None,
        help="with --cut: the cut whose selected fraction of galaxies is compared (default: "
        "des-jacobs19; euclid-vis-bright with --preset euclid, whose bands have no g-r-i)",
    )


#: ``lenscan evaluate --cut``'s reference cut per simulator preset without DES's g, r, i.
_CUT_REFERENCES = {"euclid": "euclid-vis-bright"}


def run_evaluate_cli(args: argparse.Namespace) -> int:
    """Run ``lenscan evaluate`` from parsed arguments; prints the report, returns 0."""
    if args.cut is not None:
        from lenscan.cuts import CHECK_SEEDS, evaluate_cut

        Path(args.out).mkdir(parents=True, exist_ok=True)
        cut_result = evaluate_cut(
            args.cut,
            survey_urls=None if args.survey_url is None else [args.survey_url],
            seeds=args.seeds or CHECK_SEEDS,
            workdir=args.out,
            preset=args.preset,
            reference=args.reference or _CUT_REFERENCES.get(args.preset, "des-jacobs19"),
        )
        print(cut_result.format())
        atomic_write_bytes(
            str(Path(args.out, "cut-evaluation.json")),
            (json.dumps(cut_result.to_dict(), indent=2) + "\n").encode(),
        )
        return 0
    result = evaluate(
        args.model,
        n=args.n,
        seed=args.seed,
        out_dir=args.out,
        survey_url=args.survey_url,
        threshold=args.threshold,
        device=args.device,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        survey_tiles=args.survey_tiles,
    )
    print(result.format())
    if args.record:
        path = record_evaluation(args.model if args.model is not None else DEFAULT_MODEL, result)
        print(f"metrics recorded in {path}")
    return 0
