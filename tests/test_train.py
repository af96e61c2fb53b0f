"""Tests for lenscan.training (loop, config, checkpoints) and lenscan.evaluate (metrics)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lenscan.evaluate import evaluate
from lenscan.metrics import completeness_table, roc_auc, roc_curve, tpr_at_fpr
from lenscan.models import load_model
from lenscan.training import TrainConfig, _augment, train

# A tiny, fast training set: small stamps, the two simulated classes only.
TINY_SET = {
    "preset": "des",
    "class_fractions": [0.5, 0.5, 0.0, 0.0],
    "population": {"theta_e_arcsec": [1.5, 3.0], "source_mag_i": [19.5, 21.0]},
    # No sub-pixel ray tracing and no redraws of faint arcs: speed over fidelity in tests.
    "supersample": 1,
    "min_source_snr": 0.0,
}


def _config(tmp_path, **overrides):
    kw = dict(
        name="tiny",
        output=str(tmp_path / "run"),
        architecture="jacobs-cnn",
        arch_kwargs={"channels": [8, 16], "hidden": 16, "dropout": 0.0},
        n_members=2,
        seed=3,
        bands=["g", "r", "i"],
        stamp_size_pix=24,
        training_set=TINY_SET,
        steps=12,
        batch_size=32,
        lr=3e-3,
        warmup_steps=2,
        val_size=64,
        val_every=4,
        checkpoint_every=4,
        device="cpu",
    )
    kw.update(overrides)
    return TrainConfig(**kw)


# ----------------------------------------------------------------------------- metrics
def test_roc_perfect_random_and_ties():
    labels = np.array([0, 0, 1, 1])
    assert roc_auc(labels, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert roc_auc(labels, np.array([0.9, 0.8, 0.2, 0.1])) == 0.0
    # All tied: the ROC is the diagonal, AUC one half.
    assert roc_auc(labels, np.full(4, 0.5)) == pytest.approx(0.5)
    fpr, tpr, thr = roc_curve(labels, np.array([0.1, 0.5, 0.5, 0.9]))
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 1, 1])
    assert thr[0] == np.inf


def test_roc_auc_matches_pairwise_definition():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 300)
    scores = rng.normal(labels * 1.0, 1.0).round(1)  # rounding makes ties
    pos, neg = scores[labels == 1], scores[labels == 0]
    diff = pos[:, None] - neg[None, :]
    expected = ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size
    assert roc_auc(labels, scores) == pytest.approx(expected, abs=1e-12)


def test_tpr_at_fpr_counts_negatives():
    labels = np.r_[np.zeros(1000, int), np.ones(100, int)]
    scores = np.r_[np.linspace(0, 0.9, 1000), np.linspace(0.5, 1.0, 100)]
    row = tpr_at_fpr(labels, scores, 1e-2)
    assert row["n_negatives"] == 1000
    assert row["expected_false_positives"] == pytest.approx(10)
    assert row["fpr_achieved"] <= 1e-2
    # Threshold just above the 11th-highest negative: positives above 0.891 are selected.
    assert row["tpr"] == pytest.approx(np.mean(np.linspace(0.5, 1.0, 100) >= row["threshold"]))
    assert 0.2 < row["tpr"] < 0.3
    # 1e-4 of 1000 negatives is 0.1 false positive: not measurable.
    assert tpr_at_fpr(labels, scores, 1e-4)["tpr"] is None
    with pytest.raises(ValueError, match="fpr must be in"):
        tpr_at_fpr(labels, scores, 0.0)
    with pytest.raises(ValueError, match="both lenses"):
        roc_auc(np.ones(3, int), np.ones(3))
    with pytest.raises(ValueError, match="0 \\(non-lens\\) or 1"):
        roc_auc(np.array([0, 2]), np.ones(2))


def test_completeness_table():
    values = np.array([0.6, 0.9, 1.0, 1.3, np.nan, 5.0])
    selected = np.array([True, False, True, True, True, True])
    rows = completeness_table(values, selected, [0.5, 1.0, 1.5])
    assert [r["n"] for r in rows] == [2, 2]
    assert [r["completeness"] for r in rows] == [0.5, 1.0]
    assert completeness_table(values, selected, [2.0, 3.0])[0]["completeness"] is None
    with pytest.raises(ValueError, match="increasing"):
        completeness_table(values, selected, [1.0, 0.5])


def test_augment_is_a_dihedral_permutation():
    gen = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4).repeat(8, 1, 1, 1)
    y = _augment(x, gen)
    assert y.shape == x.shape
    # Each stamp keeps its pixel values (a permutation) and some stamps actually change.
    torch.testing.assert_close(y.flatten(1).sort(dim=1).values, x.flatten(1).sort(dim=1).values)
    assert not torch.equal(x, y)


# ----------------------------------------------------------------------------- config
def test_config_validation_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown architecture"):
        _config(tmp_path, architecture="vgg")
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        _config(tmp_path, steps=0)
    with pytest.raises(ValueError, match="lr must be > 0"):
        _config(tmp_path, lr=-1)
    with pytest.raises(ValueError, match="device must be one of"):
        _config(tmp_path, device="tpu")
    with pytest.raises(ValueError, match="seeds must be 2 distinct"):
        _config(tmp_path, seeds=[1, 1])
    with pytest.raises(ValueError, match="fresh_per_step"):
        _config(tmp_path, fresh_per_step=64)
    with pytest.raises(ValueError, match="normalisation"):
        _config(tmp_path, normalisation={"method": "minmax"})


def test_config_from_yaml(tmp_path):
    import yaml

    path = tmp_path / "c.yaml"
    cfg = _config(tmp_path).to_dict()
    path.write_text(yaml.safe_dump(cfg))
    loaded = TrainConfig.from_yaml(path, steps=5)
    assert loaded.steps == 5
    assert loaded.bands == ("g", "r", "i")
    path.write_text(yaml.safe_dump({**cfg, "learning_rate": 1}))
    with pytest.raises(ValueError, match=r"c\.yaml: unknown training options \['learning_rate'\]"):
        TrainConfig.from_yaml(path)
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        TrainConfig.from_yaml(tmp_path / "missing.yaml")


def test_workflow_configs_validate():
    workflows = Path(__file__).resolve().parent.parent / "workflows"
    bundled = TrainConfig.from_yaml(workflows / "train-des-bundled.yaml")
    assert bundled.name == "lenscan-des-v1"  # stage 1 of the previous model
    assert bundled.n_members >= 2
    assert bundled.training_set["class_fractions"][2] > 0  # real-galaxy classes are used
    tiny = TrainConfig.from_yaml(workflows / "train-tiny.yaml")
    assert tiny.steps <= 20


# ----------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    config = _config(tmp)
    torch.set_num_threads(2)
    return config, train(config, progress=False)


def test_train_loss_falls_and_model_round_trips(tiny_run):
    _, result = tiny_run
    log = [json.loads(line) for line in result.log_path.read_text().splitlines()]
    assert [r["step"] for r in log if r["member"] == 0] == [4, 8, 12]
    for member in (0, 1):
        losses = [r["loss"] for r in log if r["member"] == member]
        assert losses[-1] < losses[0]
        assert 0.0 <= log[-1]["val_auc"] <= 1.0
    model = load_model(result.model_path)
    assert model.meta.n_members == 2
    assert model.meta.stamp_size_pix == 24
    assert model.meta.training["steps_per_member"] == [12, 12]
    assert model.meta.training["config"]["seed"] == 3
    assert model.meta.metrics["val_auc"] > 0.6
    x = model.normalise(torch.randn(5, 3, 24, 24))
    probs = model.score(x)
    assert probs.shape == (5, 2)
    # The saved weights reproduce the trained members exactly.
    again = result.load()
    torch.testing.assert_close(again.score(x), probs)


def test_resume_continues_from_saved_step(tiny_run, tmp_path):
    config, _ = tiny_run
    longer = dataclasses.replace(config, steps=16)
    result = train(longer, progress=False)
    log = [json.loads(line) for line in result.log_path.read_text().splitlines()]
    steps0 = [r["step"] for r in log if r["member"] == 0]
    # The first 12 steps were not repeated: the log continues at 16.
    assert steps0 == [4, 8, 12, 16]
    assert result.steps_per_member == [16, 16]
    # A different config in the same directory is refused.
    with pytest.raises(ValueError, match="different config"):
        train(dataclasses.replace(config, lr=1e-2), progress=False)


def test_train_with_replay_buffer(tmp_path):
    config = _config(tmp_path, n_members=1, steps=6, replay_size=64, fresh_per_step=8, val_every=3)
    result = train(config, progress=False)
    info = result.meta.training["members"][0]
    # 64 stamps to fill the buffer, then 8 new ones per step.
    assert info["n_simulated"] == 64 + 6 * 8
    assert info["n_seen"] == 6 * 32


def test_members_trained_separately_then_exported(tmp_path):
    from lenscan.training import export_model

    config = _config(tmp_path, steps=4, val_every=2, checkpoint_every=2)
    first = train(config, members=[1], progress=False)
    assert first.model_path is None  # member 0 is not trained yet
    assert first.steps_per_member == [0, 4]
    with pytest.raises(FileNotFoundError, match="member 0 has no checkpoint"):
        export_model(config)
    second = train(config, members=[0], progress=False)
    assert second.steps_per_member == [4, 4]
    model = second.load()
    assert model.meta.training["steps_per_member"] == [4, 4]
    with pytest.raises(ValueError, match="members must be distinct"):
        train(config, members=[2], progress=False)
    # A partial export of a longer run records the steps reached.
    longer = dataclasses.replace(config, steps=8)
    with pytest.raises(ValueError, match="at step 4 of 8"):
        export_model(longer)
    stem, meta = export_model(longer, allow_partial=True, stem=tmp_path / "partial")
    assert meta.training["steps_per_member"] == [4, 4]
    assert load_model(stem).meta.name == "tiny"


def test_evaluate_metrics_and_png(tiny_run, tmp_path):
    _, result = tiny_run
    res = evaluate(result.model_path, n=200, seed=11, out_dir=tmp_path / "ev", progress=False)
    assert 0.0 <= res.auc <= 1.0
    assert res.n_positives + res.n_negatives == 200
    assert [r["fpr"] for r in res.tpr_at_fpr] == [1e-2, 1e-3, 1e-4]
    assert res.tpr_at_fpr[0]["tpr"] is not None  # 100 negatives x 1e-2 = 1 false positive
    assert res.tpr_at_fpr[2]["tpr"] is None
    assert sum(r["n"] for r in res.completeness_vs_theta_e) == res.n_positives
    png = tmp_path / "ev" / "roc.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert doc["auc"] == pytest.approx(res.auc)
    assert "TPR at FPR 1e-02" in res.format()
    summary = res.summary_metrics()
    assert summary["auc"] == res.auc
    assert summary["tpr_at_fpr_1e-2"] == res.tpr_at_fpr[0]["tpr"]


def test_evaluate_with_real_galaxy_classes(tiny_run, tmp_path):
    from lenscan.simulate import make_survey

    _, result = tiny_run
    url = str(tmp_path / "survey.zarr")
    make_survey(url, n_tiles=1, seed=5, tile_size_pix=384, lenses_per_tile=0)
    training_set = {
        **TINY_SET,
        "class_fractions": [0.25, 0.25, 0.25, 0.25],
        "survey_url": url,
        "max_real_cutouts": 50,
    }
    res = evaluate(result.model_path, n=400, seed=13, training_set=training_set, progress=False)
    assert res.fpr_per_kind["real field galaxy"]["n"] == 100
    assert res.survey_url == url
    assert [r["n_negatives"] for r in res.tpr_at_fpr_real] == [100, 100, 100]
    assert res.tpr_at_fpr_real[0]["tpr"] is not None  # 100 x 1e-2 = 1 false positive
    # 1e-3 is not measurable on 200 non-lenses: no recommended threshold.
    assert res.recommended_threshold is None
    assert "real-galaxy non-lenses only" in res.format()


def test_evaluate_builds_a_fresh_held_out_survey(tiny_run, tmp_path):
    import shutil

    _, result = tiny_run
    for suffix in (".safetensors", ".json"):
        shutil.copy(str(result.model_path) + suffix, tmp_path / ("m" + suffix))
    # Pretend the model was trained with real-galaxy classes from a survey that is gone.
    doc = json.loads((tmp_path / "m.json").read_text())
    doc["training"]["config"]["training_set"].update(
        class_fractions=[0.25, 0.25, 0.25, 0.25], survey_url=str(tmp_path / "gone.zarr")
    )
    (tmp_path / "m.json").write_text(json.dumps(doc))
    res = evaluate(
        tmp_path / "m", n=200, seed=14, out_dir=tmp_path / "ev", survey_tiles=1, progress=False
    )
    assert res.survey_url == str(tmp_path / "ev" / "eval-survey-s14")
    assert res.fpr_per_kind["real field galaxy"]["n"] == 50


def test_record_evaluation_updates_metadata(tiny_run, tmp_path):
    import shutil

    from lenscan.evaluate import record_evaluation

    _, result = tiny_run
    for suffix in (".safetensors", ".json"):
        shutil.copy(str(result.model_path) + suffix, tmp_path / ("m" + suffix))
    res = evaluate(tmp_path / "m", n=100, seed=12, progress=False)
    # (test_resume_continues_from_saved_step may have trained this run on: read the copy)
    val_auc = load_model(tmp_path / "m").meta.metrics["val_auc"]
    record_evaluation(tmp_path / "m", res)
    model = load_model(tmp_path / "m")
    assert model.meta.metrics["auc"] == pytest.approx(res.auc)
    assert model.meta.metrics["val_auc"] == val_auc  # kept
    other = evaluate(result.model_path, n=100, seed=12, progress=False)
    other.sha256 = "0" * 64
    with pytest.raises(ValueError, match="not of this model"):
        record_evaluation(tmp_path / "m", other)


def test_after_export_hook_and_no_cross_import(tmp_path):
    import ast
    import importlib.util

    for name, other in (
        ("lenscan.training", "lenscan.evaluate"),
        ("lenscan.evaluate", "lenscan.training"),
    ):
        path = importlib.util.find_spec(name).origin
        tree = ast.parse(Path(path).read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert other not in imported, f"{name} imports {other}"
    calls = []

    def hook(stem, config, device, progress):
        calls.append((Path(stem).name, config.eval_size, device))
        return {"auc": 0.5}

    config = _config(tmp_path, steps=2, val_every=2, checkpoint_every=2, eval_size=20)
    result = train(config, progress=False, after_export=hook)
    assert calls == [("tiny", 20, "cpu")] and result.evaluation == {"auc": 0.5}


def test_mine_hard_negatives_then_train_on_them(tiny_run, tmp_path, cluster_client):
    import pyarrow.parquet as pq

    from lenscan.mining import mine_hard_negatives
    from lenscan.simulate import make_survey
    from lenscan.simulate.training import TrainingSetConfig, make_training_batch

    _, result = tiny_run
    url = str(tmp_path / "lens-free.zarr")
    make_survey(url, n_tiles=1, tile_size_pix=512, lenses_per_tile=0, seed=9,
                confusers_per_arcmin2=1.0)  # fmt: skip
    path = mine_hard_negatives(
        url, tmp_path / "mine", model=str(result.model_path), colour_cut="all", top=10,
        client=cluster_client,
    )  # fmt: skip
    table = pq.read_table(path).to_pydict()
    assert len(table["id"]) == 10 and len(set(table["id"])) == 10
    assert table["score"] == sorted(table["score"], reverse=True)
    assert set(table["survey_url"]) == {url}
    cfg = TrainingSetConfig(
        stamp_size_pix=24,
        class_fractions=(0.5, 0, 0, 0, 0, 0.5),
        hard_negatives=str(path),
        supersample=1,
        min_source_snr=0.0,
    )
    batch = make_training_batch(cfg, 8, generator=torch.Generator().manual_seed(0))
    assert torch.bincount(batch.kind, minlength=6).tolist() == [4, 0, 0, 0, 0, 4]
    assert torch.all(batch.labels[batch.kind == 5] == 0)
    with pytest.raises(ValueError, match="cannot read it as Parquet"):
        make_training_batch(
            dataclasses.replace(cfg, hard_negatives=str(tmp_path / "missing.parquet")), 4
        )


def test_evaluation_never_draws_mined_negatives():
    from lenscan.evaluate import _without_mined_negatives

    spec = {"class_fractions": [0.25, 0.15, 0.15, 0.15, 0.1, 0.2], "hard_negatives": "x.parquet"}
    out = _without_mined_negatives(spec)
    assert out["hard_negatives"] is None and len(out["class_fractions"]) == 5
    assert sum(out["class_fractions"]) == pytest.approx(1.0)
    assert out["class_fractions"][0] == pytest.approx(0.25 / 0.8)
    assert _without_mined_negatives({"class_fractions": [0.5, 0.5, 0, 0]})["class_fractions"] == [
        0.5, 0.5, 0, 0,
    ]  # fmt: skip
    # kind 6 (neighbour-centred) keeps its place after the dropped kind 5
    seven = _without_mined_negatives({"class_fractions": [0.2, 0.1, 0.1, 0.1, 0.1, 0.2, 0.2]})
    assert seven["class_fractions"][5:] == [0.0, pytest.approx(0.25)]


@pytest.mark.timeout(600)
def test_bundled_finetune_workflow_runs_from_a_fresh_clone(tmp_path, monkeypatch):
    """workflows/train-des-bundled-finetune.yaml as written needs nothing a clone lacks: it
    builds its training survey (build_survey) and starts from the bundled model by name. Run
    here shrunk (a 1-tile survey, 2 steps) in an empty directory, as a fresh clone would."""
    import yaml

    workflows = Path(__file__).resolve().parent.parent / "workflows"
    data = yaml.safe_load((workflows / "train-des-bundled-finetune.yaml").read_text())
    assert data["init_from"] == "lenscan-des-v1"  # a bundled name, not a path under runs/
    ts = data["training_set"]
    assert ts["build_survey"]["lenses_per_tile"] == 0
    for name in ("train-des-bundled.yaml", "train-des-bundled-finetune.yaml"):
        other = yaml.safe_load((workflows / name).read_text())["training_set"]
        assert "build_survey" in other and not Path(other["survey_url"]).is_absolute(), name
    ts.update(build_survey={**ts["build_survey"], "n_tiles": 1, "tile_size_pix": 512},
              max_real_cutouts=64, supersample=1)  # fmt: skip
    small = {"steps": 2, "batch_size": 16, "val_size": 32, "val_every": 1,
             "checkpoint_every": 1, "warmup_steps": 0, "replay_size": 0, "fresh_per_step": None,
             "device": "cpu"}  # fmt: skip
    monkeypatch.chdir(tmp_path)
    config = TrainConfig.from_dict({**data, **small})
    result = train(config, progress=False)
    assert (tmp_path / ts["survey_url"] / "zarr.json").is_file()  # built where the config says
    assert result.model_path is not None and result.meta.name == "lenscan-des-v1"
    assert result.meta.training["config"]["init_from"] == "lenscan-des-v1"
