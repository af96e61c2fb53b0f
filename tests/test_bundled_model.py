"""The shipped model finds lenses end to end: `lenscan.scan` on a fresh synthetic survey.

This is a regression floor on one seeded survey (with confusers and artefacts, as
``make_survey`` makes them; ~100 scored lenses, ~500 non-lenses), not the measurement of the
targets: those need thousands of non-lenses and are measured by ``benchmarks/recall_bundled.py``
on separate calibration and check surveys (figures in docs/training.md).
"""

from __future__ import annotations

import pytest

from lenscan.metrics import lens_finding_metrics, recall_against_truth, scored_labels
from lenscan.models import DEFAULT_MODEL, list_bundled_models, read_model_meta
from lenscan.simulate import make_survey
from lenscan.sweep import read_scored, scan
from lenscan.table import read_parquet_table

pytestmark = pytest.mark.timeout(300)


def test_bundled_model_recall_and_false_positives(tmp_path, cluster_client):
    survey = str(tmp_path / "survey.zarr")
    make_survey(survey, n_tiles=4, seed=4321, tile_size_pix=1536, lenses_per_tile=25)
    table = scan(survey, out=str(tmp_path / "scan"), client=cluster_client, progress=False)
    meta = read_model_meta(DEFAULT_MODEL)
    assert table.meta["threshold"] == meta.metrics["recommended_threshold"]
    assert table.meta["model_name"] == DEFAULT_MODEL
    scored = read_scored(str(tmp_path / "scan"))
    truth = read_parquet_table(f"{survey}/truth.parquet")
    result = recall_against_truth(scored, truth, threshold=table.meta["threshold"])
    assert result["n_bright"] >= 40 and result["n_nonlenses"] >= 250
    # The default threshold finds the lenses (issue 21: it keeps 0.9 of bright lenses on the
    # varied calibration surveys; lenscan-des-v3 at 0.5786: 0.93 at 19 false per 1000 on the
    # varied check surveys 31-34, docs/training.md);
    # floors with a margin for one survey of ~100 bright lenses.
    assert result["recall_bright"] >= 0.8, result
    assert result["false_per_1000"] <= 25.0, result
    m = lens_finding_metrics(*scored_labels(scored, truth))
    assert m["auroc"] >= 0.98 and m["tpr10"] >= 0.35, m
    # most candidates are still injected lenses
    assert result["n_false"] <= result["n_bright_found"] / 4, result
    # asking for 2 false per 1000 (the model's calibration curve) gives a purer list
    strict = meta.threshold_for_false_rate(2.0)
    assert strict > meta.recommended_threshold
    pure = recall_against_truth(scored, truth, threshold=strict)
    assert pure["false_per_1000"] <= 8.0 and pure["recall_bright"] >= 0.4, pure
    # the previous models stay loadable
    assert {"lenscan-des-v1", "lenscan-des-v2"} <= set(list_bundled_models())


def test_dihedral_averaging_is_orientation_invariant():
    import torch

    from lenscan.models import load_model
    from tests.test_models import _reference_stamps

    model = load_model(DEFAULT_MODEL)
    # toy lenses with an arc on one side: scores between 0 and 1, where orientation matters
    x = model.normalise(_reference_stamps(model.meta.stamp_size_pix))
    plain = model.score(x)
    tta = model.score(x, dihedral=True, batch_size=4)
    turned = model.score(torch.rot90(x, 1, dims=(-2, -1)).flip(-1), dihedral=True)
    assert torch.allclose(tta, turned, atol=1e-5)  # invariant under the group
    assert (plain - tta).abs().max() > 1e-3  # and not the plain score
