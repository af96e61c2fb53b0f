"""How a scan chooses its candidates: the model's calibrated threshold, a false rate read from
the model's calibration curve (``--false-rate``), and an inspection budget (``--top``).

Real scans of a small synthetic survey on a real LocalCluster; the model is a small random
checkpoint whose metadata is calibrated here, on the same survey, so that the figures the
scan reports can be predicted exactly from its scored rows and the survey's truth.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from lenscan.config import ScanConfig
from lenscan.metrics import (
    calibration_curve,
    recall_against_truth,
    scored_labels,
    threshold_for_false_rate,
    threshold_for_recall,
)
from lenscan.models import read_model_meta
from lenscan.simulate import make_survey
from lenscan.sweep import read_scored, scan
from lenscan.sweep.reduce import rank_candidates
from lenscan.table import read_parquet_table
from tests.helpers import make_tiny_model

pytestmark = pytest.mark.timeout(300)


# --- the numeric kernels ---------------------------------------------------------------------


def test_threshold_for_recall_keeps_exactly_the_fraction():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05], np.float32)
    t = threshold_for_recall(scores, 0.9)
    assert (scores >= t).sum() == 9 and t == pytest.approx(0.1)
    assert (scores >= threshold_for_recall(scores, 0.85)).sum() == 9  # ceil(8.5)
    assert (scores >= threshold_for_recall(scores, 1.0)).sum() == 10
    with pytest.raises(ValueError, match="no lens scores"):
        threshold_for_recall([], 0.9)
    with pytest.raises(ValueError, match="recall must be"):
        threshold_for_recall(scores, 0.0)


def test_calibration_curve_matches_brute_force_and_inverts():
    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(200, int), np.zeros(2000, int)]
    scores = np.r_[rng.beta(5, 2, 200), rng.beta(2, 5, 2000)].astype(np.float32)
    curve = calibration_curve(labels, scores, max_false_per_1000=10)
    assert len(curve["threshold"]) == 21  # k = 0 ... 20 false candidates of 2000
    for t, f, r in zip(curve["threshold"], curve["false_per_1000"], curve["recall"], strict=True):
        assert f == pytest.approx(1000 * (scores[labels == 0] >= t).sum() / 2000)
        assert r == pytest.approx((scores[labels == 1] >= t).mean())
    assert curve["false_per_1000"][0] == 0 and np.all(np.diff(curve["threshold"]) < 0)
    t2 = threshold_for_false_rate(curve, 2.0)
    assert (scores[labels == 0] >= t2).sum() == 4  # 2 per 1000 of 2000, and the lowest such
    assert (scores[labels == 0] >= np.nextafter(np.float32(t2), np.float32(0))).sum() > 4
    assert (scores[labels == 0] >= threshold_for_false_rate(curve, 0)).sum() == 0
    with pytest.raises(ValueError, match="beyond the calibration curve"):
        threshold_for_false_rate(curve, 50.0)
    with pytest.raises(ValueError, match="false rate must be"):
        threshold_for_false_rate(curve, -1)


def test_scan_config_validates_false_rate_and_top(tmp_path):
    base = {"survey_url": "s.zarr", "out": "o"}
    for bad, message in [
        ({"false_rate": -1}, "false_rate must be a number >= 0"),
        ({"false_rate": "two"}, "false_rate must be a number"),
        ({"false_rate": 1, "threshold": 0.5}, "threshold or false_rate, not both"),
        ({"top": 0}, "top must be a positive integer"),
        ({"top": 2.5}, "top must be a positive integer"),
    ]:
        with pytest.raises(ValueError, match=message):
            ScanConfig(**base, **bad)
    path = tmp_path / "scan.yaml"
    path.write_text(yaml.safe_dump({"scan": {**base, "false_rate": 2, "top": 50}}))
    config = ScanConfig.from_yaml(path)
    assert (config.false_rate, config.top) == (2.0, 50)
    assert config.to_dict()["false_rate"] == 2.0 and config.to_dict()["top"] == 50
    path.write_text(yaml.safe_dump({"scan": {**base, "top": -3}}))
    with pytest.raises(ValueError, match=f"invalid scan config {path}: top must be"):
        ScanConfig.from_yaml(path)


# --- real scans --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("op") / "survey.zarr")
    make_survey(url, n_tiles=2, seed=5, tile_size_pix=512, lenses_per_tile=10)
    return url, read_parquet_table(f"{url}/truth.parquet")


@pytest.fixture(scope="module")
def calibrated(survey, cluster_client, tmp_path_factory):
    """A tiny model calibrated on the survey as ``recall_bundled.py --calibrate --record`` does
    (all lenses count as bright here: the tiny model's scores are not science)."""
    url, truth = survey
    stem = make_tiny_model(tmp_path_factory.mktemp("model") / "tiny", seed=3)
    out = str(tmp_path_factory.mktemp("first") / "run")
    scan(url, out=out, model=stem, threshold=0.0, client=cluster_client, progress=False)
    labels, scores = scored_labels(read_scored(out), truth)
    meta_path = Path(stem + ".json")
    doc = json.loads(meta_path.read_text())
    doc["metrics"]["recommended_threshold"] = threshold_for_recall(scores[labels == 1], 0.9)
    doc["metrics"]["calibration_curve"] = calibration_curve(labels, scores, max_false_per_1000=1e3)
    meta_path.write_text(json.dumps(doc))
    return stem, out, labels, scores


def test_default_threshold_keeps_the_calibrated_recall(
    survey, calibrated, cluster_client, tmp_path
):
    url, truth = survey
    stem, _, labels, scores = calibrated
    table = scan(url, out=str(tmp_path / "run"), model=stem, client=cluster_client, progress=False)
    t = read_model_meta(stem).recommended_threshold
    assert table.meta["summary"]["threshold"] == t
    lens_ids = set(truth["id"].tolist())
    found = {i for i in table["id"].tolist() if i in lens_ids}
    n_lenses = int(labels.sum())
    assert n_lenses >= 10
    assert len(found) == int((scores[labels == 1].astype(np.float32) >= np.float32(t)).sum())
    assert len(found) >= 0.9 * n_lenses and len(found) < n_lenses  # the 0.9 target, no more


def test_false_rate_reads_the_models_curve(survey, calibrated, cluster_client, tmp_path):
    url, truth = survey
    stem, _, labels, _ = calibrated
    meta = read_model_meta(stem)
    n_neg = int((labels == 0).sum())
    rate = 1000 * 3 / n_neg  # three false candidates
    table = scan(
        url, out=str(tmp_path / "run"), model=stem, false_rate=rate, client=cluster_client,
        progress=False,
    )  # fmt: skip
    summary = table.meta["summary"]
    assert summary["false_rate"] == rate
    assert summary["threshold"] == meta.threshold_for_false_rate(rate) != meta.recommended_threshold
    rec = recall_against_truth(read_scored(str(tmp_path / "run")), truth, threshold=1.0)
    assert rec["n_nonlenses"] == n_neg
    companions = set(truth["companion_id"].tolist()) if "companion_id" in truth.colnames else set()
    lens_ids = set(truth["id"].tolist())
    false = [i for i in table["id"].tolist() if i not in lens_ids and i not in companions]
    assert len(false) == 3


def test_top_keeps_the_n_best_whatever_their_score(survey, calibrated, cluster_client, tmp_path):
    url, _ = survey
    stem, first_out, _, _ = calibrated
    every = rank_candidates(read_scored(first_out), threshold=0.0)
    table = scan(url, out=str(tmp_path / "a"), model=stem, top=7, client=cluster_client,
                 progress=False)  # fmt: skip
    assert table["id"].tolist() == every["id"][:7].tolist()
    assert table.meta["summary"]["threshold"] == 0.0 and table.meta["top"] == 7
    # With a threshold, the budget caps the candidates that pass it.
    t = float(every["score"][3])
    capped = scan(url, out=str(tmp_path / "b"), model=stem, top=100, threshold=t,
                  client=cluster_client, progress=False)  # fmt: skip
    assert capped["id"].tolist() == every["id"][every["score"] >= t].tolist()[:100]
    assert len(capped) == int((every["score"] >= t).sum())


def _lenscan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lenscan.cli", *args], capture_output=True, text=True, timeout=240
    )


def test_cli_top_and_false_rate(survey, calibrated, tmp_path):
    url, _ = survey
    stem, _, _, _ = calibrated
    common = ("--model", stem, "--workers", "1", "--threads-per-worker", "1", "--no-progress",
              "--gallery-size", "0", "--formats", "parquet")  # fmt: skip
    run = _lenscan("scan", url, "--out", str(tmp_path / "top"), "--top", "5", *common)
    assert run.returncode == 0, run.stderr
    assert "candidates  5 at score >= 0.000, the best 5 kept" in run.stdout
    run = _lenscan("scan", url, "--out", str(tmp_path / "fr"), "--false-rate", "10", *common)
    assert run.returncode == 0, run.stderr
    t = read_model_meta(stem).threshold_for_false_rate(10)
    assert f"at score >= {t:.3f} (the model's threshold for 10 false per 1000)" in run.stdout
    uncalibrated = make_tiny_model(tmp_path / "raw")
    run = _lenscan("scan", url, "--out", str(tmp_path / "raw-out"), "--false-rate", "2",
                   "--model", uncalibrated, "--workers", "1", "--no-progress")  # fmt: skip
    assert run.returncode == 2
    assert "has no calibration curve" in run.stderr and "Traceback" not in run.stderr
    run = _lenscan("scan", url, "--out", str(tmp_path / "both"), "--false-rate", "2",
                   "--threshold", "0.5", *common)  # fmt: skip
    assert run.returncode == 2 and "threshold or false_rate, not both" in run.stderr
