"""The reduce: detections of one sky position are merged over all scored rows, then thresholded."""

import numpy as np
import pyarrow as pa
import pytest

from lenscan.sweep.reduce import merge_groups, select_candidates


def _rows(**cols):
    return pa.table(
        {
            "tile": cols.get("tile", ["A"] * len(cols["score"])),
            "id": np.arange(len(cols["score"]), dtype=np.int64),
            "ra": np.asarray(cols["ra"], float),
            "dec": np.full(len(cols["score"]), -30.0),
            "edge": np.asarray(cols["edge"], bool),
            "score": np.asarray(cols["score"], np.float32),
        }
    )


def test_non_edge_stamp_wins_then_threshold_and_rank():
    # Rows 0 and 1: one source seen by two overlapping tiles, 0.3" apart.
    rows = _rows(
        ra=[40.0, 40.0 + 0.3 / 3600, 40.1, 40.2],
        edge=[True, False, False, False],
        score=[0.95, 0.90, 0.97, 0.2],
    )
    kept, n_det = select_candidates(rows, threshold=0.5, dedupe_radius_arcsec=1.0)
    assert kept["id"].to_pylist() == [2, 1]  # ranked by score; the non-edge stamp wins
    assert n_det.tolist() == [1, 2]
    kept, _ = select_candidates(rows, threshold=0.5, dedupe_radius_arcsec=0.0)
    assert kept.num_rows == 3


def test_padded_edge_stamp_cannot_make_a_candidate_its_full_stamp_did_not():
    # 0.1.0 thresholded first: the edge stamp at 0.995 survived although the same source's full
    # stamp in the neighbouring tile scored 0.1.
    rows = _rows(ra=[40.0, 40.0 + 0.2 / 3600], edge=[True, False], score=[0.995, 0.1])
    kept, _ = select_candidates(rows, threshold=0.99, dedupe_radius_arcsec=1.0)
    assert kept.num_rows == 0


def test_n_detections_counts_every_scored_row_of_the_source():
    rows = _rows(
        ra=[40.0, 40.0 + 0.2 / 3600, 40.0 + 0.4 / 3600],
        edge=[False, False, True],
        score=[0.999, 0.3, 0.2],
    )
    kept, n_det = select_candidates(rows, threshold=0.9, dedupe_radius_arcsec=1.0)
    assert kept["id"].to_pylist() == [0] and n_det.tolist() == [3]


def test_merge_groups_is_friends_of_friends():
    ra = 40.0 + np.array([0.0, 0.8, 1.6, 10.0]) / 3600  # a chain 0.8" apart, and a loner
    group, size = merge_groups(ra, np.full(4, -30.0), 1.0)
    assert group[0] == group[1] == group[2] != group[3]
    assert size.tolist() == [3, 3, 3, 1]


def test_threshold_out_of_range_is_refused():
    with pytest.raises(ValueError, match="threshold"):
        select_candidates(_rows(ra=[1.0], edge=[False], score=[0.5]), threshold=1.5)


def _tile_result(tile, *, ra, edge, score, overlap_zone):
    from lenscan.sweep.worker import TileResult

    rows = _rows(ra=[ra], edge=[edge], score=[score], tile=[tile]).append_column(
        "overlap_zone", pa.array([overlap_zone])
    )
    return TileResult(tile=tile, write_id=f"w-{tile}", n_sources=1, n_selected=1, n_scored=1,
                      reduce_rows=rows)  # fmt: skip


def test_ledger_keeps_overlap_keys_below_the_floor_for_the_merge(tmp_path):
    # One source seen by two overlapping tiles: tile A's padded edge stamp scores 0.995, tile B's
    # full stamp 0.1 (below the run's floor). The ledger must keep B's merge keys, or the reduce
    # would make a candidate of A's edge stamp that the full stamp did not earn.
    import fsspec

    from lenscan.sweep.ledger import Ledger, load_ledger
    from lenscan.sweep.reduce import rank_candidates

    fs = fsspec.filesystem("file")
    ledger = Ledger(fs, str(tmp_path), "run0", storage_options={})
    ledger.add(_tile_result("A", ra=40.0, edge=True, score=0.995, overlap_zone=True), 0.99)
    ledger.add(_tile_result("B", ra=40.0 + 0.2 / 3600, edge=False, score=0.1, overlap_zone=True),
               0.99)  # fmt: skip
    ledger.commit()
    rows = load_ledger(fs, str(tmp_path)).rows
    assert sorted(rows["tile"].to_pylist()) == ["A", "B"]
    assert len(rank_candidates(rows, threshold=0.99)) == 0
    merged = rank_candidates(rows, threshold=0.05)
    assert merged["tile"].tolist() == ["B"] and merged["n_detections"].tolist() == [2]
