"""Candidate table writers round-trip in every format; recall against a truth table."""

import json

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from lenscan.table import (
    CandidateTable,
    read_parquet_table,
    recall_against_truth,
    write_table,
)


def _scored():
    # Rows 0 and 1 are the same source seen by two overlapping tiles (0.3" apart).
    return Table(
        {
            "tile": ["A", "B", "A", "B"],
            "id": np.array([1, 1001, 2, 3], np.int64),
            "ra": [40.0, 40.0 + 0.3 / 3600, 40.1, 40.2],
            "dec": [-30.0, -30.0, -30.0, -30.0],
            "edge": [True, False, False, False],
            "score": np.array([0.95, 0.90, 0.97, 0.2], np.float32),
        },
        meta={"model_name": "m"},
    )


@pytest.mark.parametrize("fmt", ["parquet", "fits", "votable", "ecsv"])
def test_writers_round_trip(tmp_path, fmt):
    cand = CandidateTable(_scored(), copy=True)
    url = str(tmp_path / f"c.{fmt}")
    write_table(cand, url, fmt)
    if fmt == "parquet":
        back = read_parquet_table(url)
        assert back.meta["model_name"] == "m"
    elif fmt == "fits":
        back = Table.read(url)
        header = fits.getheader(url, 1)
        assert header["NAXIS2"] == len(cand) and header["MODEL"] == "m"
        assert json.loads(header["LENSCAN"])["model_name"] == "m"
    else:
        back = Table.read(url, format="votable" if fmt == "votable" else "ascii.ecsv")
    assert back["id"].tolist() == cand["id"].tolist()
    np.testing.assert_allclose(back["score"], cand["score"])
    assert [str(t) for t in back["tile"]] == [str(t) for t in cand["tile"]]
    assert not list(tmp_path.glob(".tmp-*")), "temporary files must not be left behind"


def test_recall_against_truth():
    scored = _scored()
    truth = Table(
        {
            "id": [1, 3, 77],
            "theta_e_arcsec": [1.5, 0.9, 2.0],
            "source_snr": [30, 50, 40],
            "companion_id": [-1, 2, -1],  # source 2 sits beside lens 3: neither lens nor not
        }
    )
    scored.add_row(scored[1])  # source 1001 again, from an overlapping tile: counts once
    r = recall_against_truth(scored, truth, threshold=0.5)
    assert r["n_lenses_scored"] == 2  # 77 was never scored (did not pass the cut)
    assert r["recall"] == 0.5  # id 1 found, id 3 missed
    assert r["n_bright"] == 1 and r["recall_bright"] == 1.0
    assert r["n_nonlenses"] == 1 and r["n_false"] == 1
