"""A sweep's client at survey scale: planning and the ledger hold no Python dict per tile and
field (the figures at 200,000 tiles: ``benchmarks/bench_sweep_scale.py --client``)."""

from __future__ import annotations

import fsspec
import pyarrow as pa
import pytest

from lenscan.config import ScanConfig
from lenscan.simulate import make_survey
from lenscan.survey import SurveyStore, open_survey
from lenscan.sweep.ledger import Ledger, TileRecord, load_ledger
from lenscan.sweep.plan import plan_scan
from lenscan.sweep.worker import TileResult


@pytest.fixture(scope="module")
def survey_url(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("scale") / "survey.zarr")
    make_survey(url, n_tiles=3, tile_size_pix=256, lenses_per_tile=1, seed=3)
    return url


def test_planning_reads_the_tile_index_as_columns(survey_url, tmp_path, monkeypatch):
    # tile_index() builds one dict per tile: ~0.6 kB each, 120 MB of client at 200,000 tiles.
    expected = open_survey(survey_url).tile_index()

    def refuse(self):
        raise AssertionError("planning must not build the per-tile dict index")

    monkeypatch.setattr(SurveyStore, "tile_index", refuse)
    plan = plan_scan(ScanConfig(survey_url=survey_url, out=str(tmp_path / "out")))
    assert plan.tiles == sorted(expected)
    assert plan.write_ids == {t: str(e["write_id"]) for t, e in expected.items()}
    assert plan.n_sources == {t: int(e["n_sources"]) for t, e in expected.items()}
    one = sorted(expected)[1]
    subset = plan_scan(ScanConfig(survey_url=survey_url, out=str(tmp_path / "o2"), tiles=[one]))
    assert subset.tiles == [one] and subset.write_ids == {one: str(expected[one]["write_id"])}


def _result(tile: str, write_id: str) -> TileResult:
    rows = pa.table({"tile": [tile], "id": [1], "ra": [40.0], "dec": [-30.0], "edge": [False],
                     "score": [0.9], "overlap_zone": [False]})  # fmt: skip
    return TileResult(tile=tile, write_id=write_id, n_sources=4, n_selected=2, n_scored=2,
                      reduce_rows=rows)  # fmt: skip


def test_ledger_records_are_slotted_and_the_newest_commit_wins(tmp_path):
    fs = fsspec.filesystem("file")
    ledger = Ledger(fs, str(tmp_path), "run0", storage_options={}, batch_tiles=2)
    for k in range(5):
        ledger.add(_result(f"T{k}", "old"), 0.5)
    ledger.add(_result("T1", "new"), 0.5)  # rescored in a later batch
    ledger.commit()
    state = load_ledger(fs, str(tmp_path), tiles=["T1", "T2", "T9"])
    assert sorted(state.tiles) == ["T1", "T2"]
    record = state.tiles["T1"]
    # One slotted record per tile, not a dict of 13 keys (~1 kB a tile in the client).
    assert isinstance(record, TileRecord) and not hasattr(record, "__dict__")
    assert record.write_id == "new" and record["n_scored"] == 2
    assert sorted(state.rows["tile"].to_pylist()) == ["T1", "T2"]
    assert state.current({"T1": "new", "T2": "changed"}).tiles.keys() == {"T1"}
    assert load_ledger(fs, str(tmp_path)).totals()["n_sources"] == 5 * 4
