"""Grades: merging graders' files, joining them onto candidates, and training on them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from astropy.table import Table

from lenscan.cli import main
from lenscan.grades import (
    GradedExamples,
    GradedMix,
    grade_labels,
    join_candidates,
    load_graded_examples,
    merge_grades,
    write_scripted_grades,
)
from lenscan.models import load_model
from lenscan.simulate import make_survey
from lenscan.simulate.survey import read_truth
from lenscan.survey import open_survey
from lenscan.table import read_parquet_table, write_table
from tests.test_train import TINY_SET

HEADER = "id,tile,ra,dec,grade,grader,time\n"


def _csv(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text(HEADER + "".join(f"{line}\n" for line in lines))
    return str(path)


def test_merge_latest_grade_wins_and_disagreements(tmp_path):
    a = _csv(tmp_path, "a.csv", [
        "1,T1,10.0,-5.0,B,ann,2026-01-01T10:00:00Z",
        "1,T1,10.0,-5.0,A,ann,2026-01-01T11:00:00Z",  # ann changed her mind: A counts
        "2,T1,10.1,-5.0,n,ann,2026-01-01T10:00:00Z",  # lower case accepted
    ])  # fmt: skip
    b = _csv(tmp_path, "b.csv", [
        "1,T1,10.0,-5.0,C,bo,2026-01-02T00:00:00Z",
        "2,T1,10.1,-5.0,N,bo,2026-01-02T00:00:00Z",
        "3,T2,10.2,-5.0,B,bo,2026-01-02T00:00:00Z",
    ])  # fmt: skip
    m = merge_grades([a, b])
    assert m["id"].tolist() == [1, 2, 3]
    assert m["n_graders"].tolist() == [2, 2, 1]
    np.testing.assert_allclose(m["mean_grade"], [2.0, 0.0, 2.0])
    assert m["disagree"].tolist() == [True, False, False]  # A against C
    assert m["grade"].tolist() == ["B", "N", "B"]
    assert m["grades"][0] == "ann:A;bo:C"
    digest = hashlib.sha256(Path(a).read_bytes() + Path(b).read_bytes()).hexdigest()
    assert m.meta["grade_files_sha256"] == digest
    rows, labels = grade_labels(m)
    assert rows.tolist() == [0, 1, 2] and labels.tolist() == [1, 0, 1]
    cand = Table({"rank": [1, 2, 3], "tile": ["T1", "T1", "T2"], "id": [2, 9, 3],
                  "ra": [10.1, 10.3, 10.2], "dec": [-5.0] * 3})  # fmt: skip
    with pytest.raises(ValueError, match=r"1 graded candidate\(s\) are not in the candidate"):
        join_candidates(cand, m)
    joined = join_candidates(cand, m[1:])
    assert joined["id"].tolist() == [2, 9, 3] and joined["n_graders"].tolist() == [2, 0, 1]
    assert joined["grade"].tolist() == ["N", "", "B"] and np.isnan(joined["mean_grade"][1])


def test_bad_grade_files_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match=r"line 2: the grader column is empty"):
        merge_grades([_csv(tmp_path, "x.csv", ["1,T,1,2,A,,t"])])
    with pytest.raises(ValueError, match=r"line 3: bad id, ra or dec"):
        merge_grades([_csv(tmp_path, "y.csv", ["1,T,1,2,A,g,t", "one,T,1,2,A,g,t"])])
    with pytest.raises(ValueError, match="at least one"):
        merge_grades([])


def test_graded_mix_puts_graded_stamps_into_batches():
    class Simulated:
        n_simulated = 0

        def next(self, gen):
            return torch.zeros((8, 3, 4, 4)), torch.ones(8)

    graded = GradedExamples(x=torch.full((5, 3, 4, 4), 7.0), y=torch.zeros(5), info={})
    mix = GradedMix(Simulated(), graded, 0.25)
    x, y = mix.next(torch.Generator().manual_seed(0))
    assert (x[:2] == 7).all() and (x[2:] == 0).all()  # 2 of 8 graded, the rest simulated
    assert y.tolist() == [0, 0] + [1] * 6
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        GradedMix(Simulated(), graded, 1.0)


def test_train_with_grades_from_a_scripted_grader(tmp_path):
    survey_url = str(tmp_path / "s.zarr")
    make_survey(survey_url, n_tiles=1, seed=11, tile_size_pix=384, lenses_per_tile=3)
    survey = open_survey(survey_url)
    tile = survey.tile(survey.tile_ids[0])
    cat = Table(tile.catalog())[:40]
    cat["tile"] = tile.id
    cat["score"] = np.linspace(0.99, 0.5, len(cat))
    cat["rank"] = np.arange(1, len(cat) + 1)
    cat.meta.update(survey_url=survey_url)
    write_table(cat, str(tmp_path / "candidates.parquet"), "parquet")
    truth = read_truth(survey_url)
    lenses = np.concatenate([truth["id"], cat["id"][:2]])  # two field galaxies called lenses
    possible = cat["id"][~np.isin(cat["id"], lenses)][:2]  # graded C: not trained on
    write_scripted_grades(cat, lenses, str(tmp_path / "g.csv"), possible_ids=possible)
    grades = str(tmp_path / "grades.parquet")
    assert main(["grades", "merge", str(tmp_path / "g.csv"), "--out", grades,
                 "--candidates", str(tmp_path / "candidates.parquet")]) == 0  # fmt: skip
    ex = load_graded_examples(
        grades, bands=("g", "r", "i"), stamp_size_pix=24,
        normalisation={"method": "asinh_mad", "softening_sigma": 3.0},
    )  # fmt: skip
    n_lens = int(np.isin(cat["id"], lenses).sum())
    assert ex.info["n_lenses"] == n_lens and ex.info["n_nonlenses"] == len(cat) - n_lens - 2
    assert ex.x.shape == (len(cat) - 2, 3, 24, 24) and torch.isfinite(ex.x).all()
    config = {
        "name": "tiny-graded", "output": str(tmp_path / "run"), "architecture": "jacobs-cnn",
        "arch_kwargs": {"channels": [4, 8], "hidden": 8}, "n_members": 1, "bands": ["g", "r", "i"],
        "stamp_size_pix": 24, "training_set": TINY_SET, "steps": 3, "batch_size": 16,
        "warmup_steps": 1, "val_size": 32, "val_every": 3, "checkpoint_every": 3,
        "device": "cpu", "graded_fraction": 0.5,
    }  # fmt: skip
    cfg_path = tmp_path / "train.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    assert main(["train", str(cfg_path), "--grades", grades, "--no-progress"]) == 0
    meta = load_model(str(tmp_path / "run" / "tiny-graded")).meta
    recorded = meta.training["grades"]
    assert recorded["sha256"] == hashlib.sha256(Path(grades).read_bytes()).hexdigest()
    assert json.dumps(meta.training["config"]).count(grades) == 1
    # Grades made without --candidates carry no survey: a clear error.
    bare = str(tmp_path / "bare.parquet")
    assert main(["grades", "merge", str(tmp_path / "g.csv"), "--out", bare]) == 0
    assert read_parquet_table(bare)["n_graders"].tolist() == [1] * len(cat)
    with pytest.raises(ValueError, match="--candidates"):
        load_graded_examples(bare, bands=("g",), stamp_size_pix=8, normalisation={})
