"""Lens-finding metrics: one module that training, evaluation and the benchmarks import.

Pure functions of arrays (or of tables of scored rows and a simulation's truth):

* :func:`roc_curve`, :func:`roc_auc` (ties count one half);
* :func:`tpr_at_fpr` (the TPR at a false-positive *rate*), :func:`tpr_at_n_false` (the TPR at a
  number of false positives: ``TPR0`` at zero, ``TPR10`` at ten, as in lens-finding papers such
  as HOLISMOKES XI), :func:`fpr_at_tpr` (e.g. the FPR at TPR 0.75);
* :func:`purity_top_k`: the expected fraction of lenses among the ``k`` highest-scoring objects
  of a survey of ``n_objects`` objects with lens prevalence ``prevalence``;
* :func:`lens_finding_metrics`: all of the above in one dictionary;
* :func:`completeness`, :func:`completeness_table`: fraction of lenses selected, overall and
  binned (by Einstein radius, source magnitude, ...);
* :func:`recall_against_truth`: a scan's scored rows compared with a synthetic survey's truth;
* :func:`calibration_curve`, :func:`threshold_for_recall`, :func:`threshold_for_false_rate`:
  a model's operating points on calibration surveys (false candidates per 1000 scored non-lenses
  and bright-lens recall against threshold), and the threshold for a recall or a false rate.

A stamp is selected when ``score >= threshold``. A TPR at FPR ``f`` measured on ``n_neg``
negatives rests on ``f * n_neg`` false positives: below about 10 it is noisy, below 1 it is not
measured at all (reported as ``None``).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "calibration_curve",
    "completeness",
    "completeness_table",
    "fpr_at_tpr",
    "lens_finding_metrics",
    "purity_top_k",
    "recall_against_truth",
    "roc_auc",
    "roc_curve",
    "threshold_for_false_rate",
    "threshold_for_recall",
    "tpr_at_fpr",
    "tpr_at_n_false",
]

#: Default survey used by :func:`purity_top_k` in :func:`lens_finding_metrics`: one million
#: scored galaxies of which one in a thousand is a lens like the simulated ones.
DEFAULT_PREVALENCE = 1e-3
DEFAULT_N_OBJECTS = 1_000_000


def _check_labels_scores(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(
            f"labels and scores must be 1-D of equal length, got {labels.shape}, {scores.shape}"
        )
    if not np.all(np.isin(labels, (0, 1))):
        raise ValueError("labels must be 0 (non-lens) or 1 (lens)")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite")
    labels = labels.astype(bool)
    if labels.all() or not labels.any():
        raise ValueError("need both lenses (label 1) and non-lenses (label 0) to compute a ROC")
    return labels, scores


def roc_curve(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve: one point per distinct score, ties handled exactly.

    Parameters
    ----------
    labels : array of {0, 1}, shape (n,)
    scores : array of float, shape (n,)
        Higher means more lens-like; a stamp is selected when ``score >= threshold``.

    Returns
    -------
    fpr, tpr, thresholds : ndarray
        Starting at ``(0, 0, +inf)`` and ending at ``(1, 1, min score)``.
    """
    labels, scores = _check_labels_scores(labels, scores)
    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    y = labels[order]
    distinct = np.flatnonzero(np.diff(s) != 0)  # last index of each group of equal scores
    ends = np.r_[distinct, len(s) - 1]
    tp = np.cumsum(y)[ends]
    fp = np.cumsum(~y)[ends]
    tpr = np.r_[0.0, tp / labels.sum()]
    fpr = np.r_[0.0, fp / (~labels).sum()]
    thresholds = np.r_[np.inf, s[ends]]
    return fpr, tpr, thresholds


def roc_auc(labels: Any, scores: Any) -> float:
    """Area under the ROC curve (ties count one half), in [0, 1].

    Examples
    --------
    >>> roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    0.75
    """
    fpr, tpr, _ = roc_curve(labels, scores)
    return float(np.trapezoid(tpr, fpr))


def tpr_at_fpr(labels: Any, scores: Any, fpr: float) -> dict[str, Any]:
    """True-positive rate at a false-positive rate of at most ``fpr``.

    Parameters
    ----------
    labels, scores : array_like
        As for :func:`roc_curve`.
    fpr : float
        Target false-positive rate in (0, 1).

    Returns
    -------
    dict
        ``tpr`` (None when ``fpr * n_negatives < 1``: not measurable), ``threshold`` (score cut
        reaching it), ``fpr_achieved``, ``n_negatives``, ``n_positives`` and
        ``expected_false_positives`` (``fpr * n_negatives``; below ~10 the TPR is noisy).

    Examples
    --------
    With 4 non-lenses, FPR 0.25 allows one false positive (the non-lens at 0.9):

    >>> row = tpr_at_fpr([0, 0, 0, 0, 1, 1], [0.1, 0.2, 0.3, 0.9, 0.8, 0.95], 0.25)
    >>> row["tpr"], row["threshold"], row["expected_false_positives"]
    (1.0, 0.8, 1.0)
    >>> tpr_at_fpr([0, 0, 1], [0.1, 0.2, 0.9], 0.1)["tpr"] is None  # 0.1 * 2 negatives < 1
    True
    """
    if not 0 < fpr < 1:
        raise ValueError(f"fpr must be in (0, 1), got {fpr}")
    labels, scores = _check_labels_scores(labels, scores)
    fprs, tprs, thresholds = roc_curve(labels, scores)
    n_neg = int((~labels).sum())
    k = np.flatnonzero(fprs <= fpr)[-1]  # ROC is monotone: the last point within the budget
    measurable = fpr * n_neg >= 1
    return {
        "fpr": float(fpr),
        "tpr": float(tprs[k]) if measurable else None,
        "threshold": float(thresholds[k]) if measurable else None,
        "fpr_achieved": float(fprs[k]),
        "n_negatives": n_neg,
        "n_positives": int(labels.sum()),
        "expected_false_positives": float(fpr * n_neg),
    }


def tpr_at_n_false(labels: Any, scores: Any, n_false: int) -> dict[str, Any]:
    """True-positive rate when at most ``n_false`` non-lenses are selected.

    ``n_false=0`` gives TPR0 (the fraction of lenses scoring above every non-lens), ``10`` gives
    TPR10. Lenses tied with the ``(n_false + 1)``-th highest non-lens score are not counted.

    Returns
    -------
    dict
        ``n_false``, ``tpr``, ``threshold`` (the lowest score still selected, None when no lens
        is), ``n_negatives``, ``n_positives``.
    """
    if isinstance(n_false, bool) or not isinstance(n_false, int | np.integer) or n_false < 0:
        raise ValueError(f"n_false must be an integer >= 0, got {n_false!r}")
    labels, scores = _check_labels_scores(labels, scores)
    neg = np.sort(scores[~labels])[::-1]
    pos = scores[labels]
    bar = neg[n_false] if n_false < neg.size else -np.inf
    chosen = pos > bar
    return {
        "n_false": int(n_false),
        "tpr": float(chosen.mean()),
        "threshold": float(pos[chosen].min()) if chosen.any() else None,
        "n_negatives": int(neg.size),
        "n_positives": int(pos.size),
    }


def fpr_at_tpr(labels: Any, scores: Any, tpr: float) -> dict[str, Any]:
    """Smallest false-positive rate at which the true-positive rate reaches ``tpr``.

    Returns
    -------
    dict
        ``tpr`` (the target), ``fpr``, ``n_false`` (non-lenses selected there), ``threshold``,
        ``n_negatives``. ``fpr`` is 0 with ``n_false`` 0 when the target is reached before any
        non-lens: then the FPR is below ``1 / n_negatives``.
    """
    if not 0 < tpr <= 1:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    labels, scores = _check_labels_scores(labels, scores)
    fprs, tprs, thresholds = roc_curve(labels, scores)
    k = int(np.flatnonzero(tprs >= tpr - 1e-12)[0])
    n_neg = int((~labels).sum())
    return {
        "tpr": float(tpr),
        "fpr": float(fprs[k]),
        "n_false": round(float(fprs[k]) * n_neg),
        "threshold": float(thresholds[k]),
        "n_negatives": n_neg,
    }


def purity_top_k(
    labels: Any,
    scores: Any,
    *,
    k: int = 1000,
    prevalence: float = DEFAULT_PREVALENCE,
    n_objects: int = DEFAULT_N_OBJECTS,
) -> dict[str, Any]:
    """Expected purity of the ``k`` highest-scoring objects of a survey.

    The survey holds ``n_objects`` scored objects, a fraction ``prevalence`` of them lenses
    scoring like the labelled lenses and the rest non-lenses scoring like the labelled
    non-lenses. Going down the ROC curve, the expected number of objects selected is
    ``n_objects * (prevalence * TPR + (1 - prevalence) * FPR)``; the threshold where it reaches
    ``k`` (linear between ROC points) gives the purity ``prevalence * TPR / (selected fraction)``.

    Returns
    -------
    dict
        ``k``, ``prevalence``, ``n_objects``, ``purity``, ``tpr`` and ``fpr`` at that point,
        ``n_lenses_expected`` among the top ``k``. With few labelled non-lenses (``(1 -
        prevalence) * n_objects / n_negatives`` objects per non-lens large) the FPR is coarse.
    """
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if not 0 < prevalence < 1:
        raise ValueError(f"prevalence must be in (0, 1), got {prevalence}")
    if n_objects < k:
        raise ValueError(f"n_objects ({n_objects}) must be >= k ({k})")
    fprs, tprs, _ = roc_curve(labels, scores)
    counts = n_objects * (prevalence * tprs + (1 - prevalence) * fprs)
    j = int(np.searchsorted(counts, k, side="left"))
    j = min(max(j, 1), len(counts) - 1)
    span = counts[j] - counts[j - 1]
    w = 1.0 if span <= 0 else float(np.clip((k - counts[j - 1]) / span, 0.0, 1.0))
    tpr = tprs[j - 1] + w * (tprs[j] - tprs[j - 1])
    fpr = fprs[j - 1] + w * (fprs[j] - fprs[j - 1])
    lenses = n_objects * prevalence * tpr
    selected = lenses + n_objects * (1 - prevalence) * fpr
    return {
        "k": int(k),
        "prevalence": float(prevalence),
        "n_objects": int(n_objects),
        "purity": float(lenses / selected) if selected > 0 else 1.0,
        "tpr": float(tpr),
        "fpr": float(fpr),
        "n_lenses_expected": float(lenses * min(1.0, k / selected) if selected > 0 else 0.0),
    }


def lens_finding_metrics(
    labels: Any,
    scores: Any,
    *,
    k: int = 1000,
    prevalence: float = DEFAULT_PREVALENCE,
    n_objects: int = DEFAULT_N_OBJECTS,
) -> dict[str, Any]:
    """AUROC, TPR0, TPR10, FPR at TPR 0.75 and purity in the top ``k`` in one dictionary."""
    labels, scores = _check_labels_scores(labels, scores)
    fat = fpr_at_tpr(labels, scores, 0.75)
    pur = purity_top_k(labels, scores, k=k, prevalence=prevalence, n_objects=n_objects)
    return {
        "auroc": roc_auc(labels, scores),
        "tpr0": tpr_at_n_false(labels, scores, 0)["tpr"],
        "tpr10": tpr_at_n_false(labels, scores, 10)["tpr"],
        "fpr_at_tpr_0.75": fat["fpr"],
        "n_false_at_tpr_0.75": fat["n_false"],
        f"purity_top_{k}": pur["purity"],
        "purity_prevalence": float(prevalence),
        "purity_n_objects": int(n_objects),
        "n_positives": int(labels.sum()),
        "n_negatives": int((~labels).sum()),
    }


def _just_above(score: float) -> float:
    """The lowest float32 threshold that a float32 ``score`` no longer reaches."""
    return float(np.nextafter(np.float32(score), np.float32(2)))


def threshold_for_recall(lens_scores: Any, recall: float) -> float:
    """The highest threshold that at least a fraction ``recall`` of ``lens_scores`` reach.

    A lens is kept when ``score >= threshold``, so the threshold is the
    ``ceil(recall * n)``-th highest lens score. Raises ``ValueError`` without lens scores.
    """
    if not 0 < recall <= 1:
        raise ValueError(f"recall must be in (0, 1], got {recall}")
    pos = np.sort(np.asarray(lens_scores, dtype=np.float64).ravel())[::-1]
    if pos.size == 0:
        raise ValueError("threshold_for_recall: no lens scores")
    # 1e-9: a recall of 0.9 of 10 lenses needs 9, not 10 (0.9 * 10 = 9.000000000000002).
    n_keep = max(1, int(np.ceil(recall * pos.size - 1e-9)))
    return float(np.float32(pos[n_keep - 1]))


def calibration_curve(
    labels: Any, scores: Any, *, max_false_per_1000: float = 50.0
) -> dict[str, Any]:
    """Operating points of a model on calibration surveys: one per number of false candidates.

    Point ``k`` is the lowest threshold that lets exactly the ``k`` highest-scoring non-lenses
    through (fewer on ties), for ``k = 0 ... floor(max_false_per_1000 * n_negatives / 1000)``;
    each point gives that threshold, its false candidates per 1000 scored non-lenses and the
    recall of the lenses (label 1: pass only the lenses the recall should count, e.g. bright).

    Returns
    -------
    dict
        Lists ``threshold`` (descending), ``false_per_1000`` and ``recall`` (ascending), and
        ``n_negatives``, ``n_positives``: plain JSON, for a model's ``metrics``.
    """
    labels, scores = _check_labels_scores(labels, scores)
    neg = np.sort(scores[~labels])[::-1]
    pos = scores[labels].astype(np.float32)
    k_max = min(int(np.floor(max_false_per_1000 * neg.size / 1000)), neg.size - 1)
    thresholds = [_just_above(float(s)) for s in neg[: k_max + 1]]
    n_false = [int((neg.astype(np.float32) >= t).sum()) for t in thresholds]
    return {
        "threshold": thresholds,
        "false_per_1000": [1000.0 * n / neg.size for n in n_false],
        "recall": [float((pos >= t).mean()) if pos.size else float("nan") for t in thresholds],
        "n_negatives": int(neg.size),
        "n_positives": int(pos.size),
    }


def threshold_for_false_rate(curve: Mapping[str, Any], false_per_1000: float) -> float:
    """The lowest threshold of a :func:`calibration_curve` letting at most ``false_per_1000``.

    Raises
    ------
    ValueError
        If the rate is negative or not finite, or beyond the curve's last point (the curve was
        not measured that far: the threshold would be an extrapolation).
    """
    rate = float(false_per_1000)
    if not (np.isfinite(rate) and rate >= 0):
        raise ValueError(f"false rate must be a number >= 0 per 1000, got {false_per_1000!r}")
    t = np.asarray(curve["threshold"], dtype=np.float64)
    f = np.asarray(curve["false_per_1000"], dtype=np.float64)
    if t.size == 0:
        raise ValueError("calibration curve has no points")
    top = float(f.max())
    # The curve stops at its largest rate; a larger one is allowed only up to the next
    # non-lens (one more false candidate) beyond the last point.
    step = 1000.0 / max(int(curve.get("n_negatives", 1)), 1)
    if rate >= top + step:
        raise ValueError(
            f"false rate {rate:g} per 1000 is beyond the calibration curve (measured up to "
            f"{top:.3g} per 1000)"
        )
    return float(t[f <= rate + 1e-12].min())


def completeness(selected: Any) -> float:
    """Fraction of ``selected`` that is True (NaN for an empty array)."""
    selected = np.asarray(selected, dtype=bool)
    return float(selected.mean()) if selected.size else float("nan")


def completeness_table(values: Any, selected: Any, edges: Sequence[float]) -> list[dict[str, Any]]:
    """Completeness (fraction selected) of lenses binned by ``values``.

    Parameters
    ----------
    values : array_like, shape (n,)
        Per-lens quantity (e.g. Einstein radius); NaN rows are ignored.
    selected : array_like of bool, shape (n,)
        Whether each lens is selected (passes a threshold or a cut).
    edges : sequence of float
        Increasing bin edges; values outside them are ignored.

    Returns
    -------
    list of dict
        One row per bin: ``lo``, ``hi``, ``n``, ``n_selected``, ``completeness`` (None if empty).

    Examples
    --------
    >>> rows = completeness_table([0.6, 1.0, 1.5, 2.2], [True, False, True, True], [0.5, 1.2, 2.5])
    >>> [(r["lo"], r["hi"], r["completeness"]) for r in rows]
    [(0.5, 1.2, 0.5), (1.2, 2.5, 1.0)]
    """
    values = np.asarray(values, dtype=np.float64)
    selected = np.asarray(selected, dtype=bool)
    bins = np.asarray(edges, dtype=np.float64)
    if values.shape != selected.shape or values.ndim != 1:
        raise ValueError("values and selected must be 1-D arrays of equal length")
    if bins.ndim != 1 or len(bins) < 2 or np.any(np.diff(bins) <= 0):
        raise ValueError(f"edges must be increasing with at least 2 entries, got {bins}")
    rows = []
    for lo, hi in itertools.pairwise(bins):
        in_bin = (values >= lo) & (values < hi)
        n = int(in_bin.sum())
        k = int((in_bin & selected).sum())
        rows.append(
            {"lo": float(lo), "hi": float(hi), "n": n, "n_selected": k,
             "completeness": k / n if n else None}
        )  # fmt: skip
    return rows


def _column(table: Any, name: str) -> np.ndarray:
    return np.asarray(table[name])


def _colnames(table: Any) -> list[str]:
    return list(table.colnames) if hasattr(table, "colnames") else list(table)


def _companion_ids(truth: Any, names: Sequence[str]) -> np.ndarray:
    """Ids of the injected lenses' companions (none when the truth table has no such column)."""
    if "companion_id" not in names:
        return np.zeros(0, dtype=np.int64)
    return _column(truth, "companion_id").astype(np.int64)


def recall_against_truth(
    scored: Any,
    truth: Any,
    *,
    threshold: float,
    min_theta_e_arcsec: float = 1.2,
    min_source_snr: float = 20.0,
    exclude_ids: Any = None,
) -> dict[str, Any]:
    """Compare a scan's scored rows with a simulation's truth table (injected lenses by ``id``).

    A source scored in two overlapping tiles counts once, with its best score. Recall is over
    injected lenses that were scored (passed the cut); ``recall_bright`` over those with
    ``theta_e_arcsec >= min_theta_e_arcsec`` and ``source_snr >= min_source_snr``. False
    positives are scored non-lens sources at or above the threshold. Companion galaxies of
    injected lenses (truth column ``companion_id``) are neither: their stamps hold the
    neighbouring lens's arcs, and a search would merge them into the lens's candidate; nor are
    the ids in ``exclude_ids``.

    Parameters
    ----------
    scored : Table or mapping
        Columns ``id`` and ``score`` (one row per scored stamp).
    truth : Table or mapping
        Columns ``id``, ``theta_e_arcsec``, ``source_snr`` and optionally ``companion_id``.
    threshold : float
        Score cut.

    Returns
    -------
    dict
        ``n_injected``, ``n_lenses_scored``, ``recall``, ``n_bright``, ``recall_bright``,
        ``n_nonlenses``, ``n_false``, ``false_per_1000`` and ``false_ids`` (ids of the false
        candidates, highest score first).
    """
    names = _colnames(truth)
    for col in ("id", "theta_e_arcsec", "source_snr"):
        if col not in names:
            raise KeyError(f"truth table lacks column {col!r} (has {names})")
    n_scored = len(_column(scored, "id")) if "id" in _colnames(scored) else 0
    ids = _column(scored, "id").astype(np.int64) if n_scored else np.zeros(0, np.int64)
    score = _column(scored, "score").astype(np.float64) if n_scored else np.zeros(0)
    truth_ids = _column(truth, "id").astype(np.int64)
    is_lens = np.isin(ids, truth_ids)
    companions = _companion_ids(truth, names)
    is_other = ~is_lens & ~np.isin(ids, companions)
    if exclude_ids is not None:
        is_other &= ~np.isin(ids, np.asarray(exclude_ids, dtype=np.int64))
    best = _best_score_per_id(ids[is_lens], score[is_lens])
    bright = (_column(truth, "theta_e_arcsec") >= min_theta_e_arcsec) & (
        _column(truth, "source_snr") >= min_source_snr
    )
    bright_ids = set(truth_ids[bright].tolist())
    found = {i for i, s in best.items() if s >= threshold}
    bright_scored = bright_ids & set(best)
    # Non-lenses count once per source, like lenses: overlapping tiles score some sources
    # twice, and the candidate table merges those rows into one candidate.
    best_other = _best_score_per_id(ids[is_other], score[is_other])
    n_non = len(best_other)
    false = sorted(((s, i) for i, s in best_other.items() if s >= threshold), reverse=True)
    return {
        "n_injected": len(truth_ids),
        "n_lenses_scored": len(best),
        "recall": len(found) / len(best) if best else float("nan"),
        "n_bright": len(bright_scored),
        "n_bright_found": len(found & bright_scored),
        "recall_bright": len(found & bright_scored) / len(bright_scored)
        if bright_scored
        else float("nan"),
        "n_nonlenses": n_non,
        "n_false": len(false),
        "false_per_1000": 1000.0 * len(false) / n_non if n_non else float("nan"),
        "false_ids": [i for _, i in false],
    }


def _best_score_per_id(ids: np.ndarray, scores: np.ndarray) -> dict[int, float]:
    best: dict[int, float] = {}
    for i, s in zip(ids.tolist(), scores.tolist(), strict=True):
        best[i] = max(s, best.get(i, -1.0))
    return best


def scored_labels(
    scored: Any, truth: Mapping[str, Any] | Any, *, exclude_ids: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-source labels (1 = injected lens) and best scores of a scan, for ROC metrics.

    Companions of injected lenses and ``exclude_ids`` are dropped (see
    :func:`recall_against_truth`).
    """
    ids = _column(scored, "id").astype(np.int64)
    score = _column(scored, "score").astype(np.float64)
    names = _colnames(truth)
    truth_ids = _column(truth, "id").astype(np.int64)
    drop = _companion_ids(truth, names)
    keep = ~np.isin(ids, drop)
    if exclude_ids is not None:
        keep &= ~np.isin(ids, np.asarray(exclude_ids, dtype=np.int64))
    best = _best_score_per_id(ids[keep], score[keep])
    uid = np.fromiter(best.keys(), dtype=np.int64, count=len(best))
    s = np.fromiter(best.values(), dtype=np.float64, count=len(best))
    return np.isin(uid, truth_ids).astype(int), s
