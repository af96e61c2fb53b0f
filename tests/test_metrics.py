"""lenscan.metrics: ROC, AUC (checked against scikit-learn), TPR0/TPR10, FPR at TPR, purity."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table
from sklearn.metrics import roc_auc_score

from lenscan.metrics import (
    completeness,
    fpr_at_tpr,
    lens_finding_metrics,
    purity_top_k,
    recall_against_truth,
    roc_auc,
    scored_labels,
    tpr_at_n_false,
)


def test_auc_matches_scikit_learn_with_ties():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 5000)
    # coarse scores: many ties, the case where trapezoid and rank definitions must agree
    scores = np.round(rng.normal(labels * 0.8, 1.0), 1)
    assert roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    scores = rng.random(5000) + 0.3 * labels
    assert roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_tpr0_and_tpr10():
    neg = np.arange(20) / 100.0  # 0.00 .. 0.19
    pos = np.array([0.05, 0.15, 0.185, 0.195, 0.5, 0.9])
    labels = np.r_[np.zeros(20, int), np.ones(6, int)]
    scores = np.r_[neg, pos]
    t0 = tpr_at_n_false(labels, scores, 0)
    assert t0["tpr"] == pytest.approx(3 / 6)  # 0.195, 0.5, 0.9 beat every non-lens (max 0.19)
    t10 = tpr_at_n_false(labels, scores, 10)
    # 10 false positives allowed: the bar is the 11th highest non-lens, 0.09
    assert t10["tpr"] == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="n_false"):
        tpr_at_n_false(labels, scores, -1)


def test_fpr_at_tpr():
    labels = np.r_[np.zeros(100, int), np.ones(4, int)]
    scores = np.r_[np.linspace(0, 0.5, 100), [0.9, 0.8, 0.45, 0.1]]
    r = fpr_at_tpr(labels, scores, 0.75)
    # the third lens (0.45) comes after the non-lenses above 0.45: 0.4545.. 0.5 -> 10 of them
    assert r["n_false"] == 10 and r["fpr"] == pytest.approx(0.10)
    perfect = fpr_at_tpr([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], 0.75)
    assert perfect["fpr"] == 0.0 and perfect["n_false"] == 0


def test_purity_top_k():
    # perfect separation: the top k of a survey with more lenses than k are all lenses
    labels = np.r_[np.zeros(1000, int), np.ones(1000, int)]
    scores = np.r_[np.zeros(1000), np.ones(1000)]
    r = purity_top_k(labels, scores, k=100, prevalence=0.01, n_objects=100_000)
    assert r["purity"] == pytest.approx(1.0)
    # random scores: purity equals the prevalence
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 20000)
    r = purity_top_k(labels, rng.random(20000), k=1000, prevalence=0.02, n_objects=100_000)
    assert r["purity"] == pytest.approx(0.02, abs=0.01)
    with pytest.raises(ValueError, match="prevalence"):
        purity_top_k(labels, rng.random(20000), prevalence=0.0)


def test_lens_finding_metrics_keys():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 3000)
    scores = rng.normal(labels * 3.0, 1.0)
    m = lens_finding_metrics(labels, scores)
    assert 0.95 < m["auroc"] <= 1.0
    assert 0 <= m["tpr0"] <= m["tpr10"] <= 1
    assert 0 < m["fpr_at_tpr_0.75"] < 0.2
    assert 0 < m["purity_top_1000"] <= 1


def test_completeness():
    assert completeness([True, False, True, True]) == 0.75
    assert np.isnan(completeness([]))


def test_recall_against_truth_and_labels():
    scored = Table(
        {
            "id": [1, 2, 3, 4, 1, 5],
            "score": [0.9, 0.95, 0.2, 0.7, 0.1, 0.99],
        }
    )
    truth = Table(
        {
            "id": [1, 3, 77],
            "theta_e_arcsec": [1.5, 0.9, 2.0],
            "source_snr": [30, 50, 40],
            "companion_id": [-1, 2, -1],
        }
    )
    r = recall_against_truth(scored, truth, threshold=0.5)
    assert r["n_lenses_scored"] == 2 and r["recall"] == 0.5
    assert r["n_bright"] == 1 and r["recall_bright"] == 1.0
    assert r["n_nonlenses"] == 2 and r["n_false"] == 2  # ids 4 and 5; 2 is a companion
    assert r["false_ids"] == [5, 4]
    r = recall_against_truth(scored, truth, threshold=0.5, exclude_ids=[5])
    assert r["n_false"] == 1
    labels, best = scored_labels(scored, truth)
    pairs = sorted(zip(labels.tolist(), best.tolist(), strict=True))
    assert pairs == [(0, 0.7), (0, 0.99), (1, 0.2), (1, 0.9)]
    with pytest.raises(KeyError, match="source_snr"):
        recall_against_truth(scored, Table({"id": [1], "theta_e_arcsec": [1.0]}), threshold=0.5)
