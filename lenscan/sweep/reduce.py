"""The reduce: merge detections of one sky position, threshold, rank, and write the outputs.

The reduce reads the ledger's rows (candidates-to-be and overlap-zone keys), never every scored
row. Detections of one source in overlapping tiles are merged over *all* those rows before the
threshold is applied: the kept detection is the full (non-edge) stamp, then the higher score, so
a padded edge stamp cannot make a candidate that the same source's full stamp did not.
"""

from __future__ import annotations

import io
import logging
import posixpath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import pyarrow.parquet as pq
from astropy import units as u
from astropy.coordinates import Angle, SkyCoord
from astropy.table import Table
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import KDTree

from lenscan._io import atomic_write_bytes
from lenscan._secrets import safe_text, safe_url
from lenscan.sweep.ledger import FAILURE_SCHEMA, LedgerState
from lenscan.sweep.plan import ScanPlan, committed_part_tiles
from lenscan.sweep.worker import part_url
from lenscan.table import CandidateTable, arrow_to_table, table_to_arrow

__all__ = [
    "merge_groups",
    "rank_candidates",
    "reduce_rows",
    "select_candidates",
    "write_failures",
]

log = logging.getLogger(__name__)

#: Columns that exist for the reduce only and are not part of the candidate table.
_INTERNAL_COLUMNS = ("overlap_zone",)


def merge_groups(
    ra: np.ndarray, dec: np.ndarray, radius_arcsec: float
) -> tuple[np.ndarray, np.ndarray]:
    """Friends-of-friends groups of sky positions closer than ``radius_arcsec``.

    Returns
    -------
    group : ndarray of int64
        Group label of each position.
    size : ndarray of int64
        Number of positions in each position's group.
    """
    n = len(ra)
    if n < 2 or radius_arcsec <= 0:
        return np.arange(n, dtype=np.int64), np.ones(n, dtype=np.int64)
    # The pairs astropy's search_around_sky finds (unit vectors, chord radius, the same KD-tree
    # test), as one array of i < j: its per-position Python lists and SkyCoord copies cost
    # ~400 B a detection, 80 MB of client at 200,000 tiles.
    xyz = SkyCoord(np.asarray(ra) * u.deg, np.asarray(dec) * u.deg).cartesian.xyz.value
    if np.isnan(xyz).any():  # astropy's own refusal
        raise ValueError("Catalog coordinates cannot contain NaN entries.")
    chord = (2 * np.sin(Angle(0.5 * radius_arcsec * u.arcsec))).value
    tree = KDTree(xyz.T, compact_nodes=False, balanced_tree=False)
    pairs = tree.query_pairs(chord, output_type="ndarray")
    graph = coo_matrix((np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, group = connected_components(graph, directed=False)
    group = group.astype(np.int64)
    return group, np.bincount(group)[group]


def select_candidates(
    rows: pa.Table,
    *,
    threshold: float,
    dedupe_radius_arcsec: float = 1.0,
    top: int | None = None,
) -> tuple[pa.Table, np.ndarray]:
    """Merge detections of one sky position, then keep those at or above ``threshold``.

    Within a group the detection kept is a stamp not padded at a tile edge if there is one,
    then the highest score; the group is a candidate if that detection's score reaches the
    threshold. Returns the kept rows (ranked by score, at most ``top`` of them) and their
    ``n_detections``.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be within [0, 1], got {threshold}")
    n = rows.num_rows
    ra, dec = rows["ra"].to_numpy(), rows["dec"].to_numpy()
    score = rows["score"].to_numpy()
    edge = rows["edge"].to_numpy(zero_copy_only=False).astype(bool)
    group, size = merge_groups(ra, dec, dedupe_radius_arcsec)
    order = np.lexsort((-score, edge, group))
    first = np.ones(n, dtype=bool)
    first[1:] = group[order][1:] != group[order][:-1]
    keep = order[first]
    keep = keep[score[keep] >= threshold]
    keep = keep[np.argsort(-score[keep], kind="stable")][:top]
    return rows.take(pa.array(keep, type=pa.int64())), size[keep]


#: Stale parts re-read per dataset scan: bounded fragments and paths, however many are stale.
_REREAD_PARTS = 2048


def reduce_rows(plan: ScanPlan, state: LedgerState) -> pa.Table | None:
    """The ledger's rows, re-read from the parts for tiles committed with a higher floor.

    A resumed run with a lower threshold than an earlier run needs rows the earlier run did not
    keep; those tiles' parts are scanned with the filter pushed down to the Parquet reader, a
    bounded number of parts per scan. A tile whose part is gone (deleted, and not scored again
    because it failed in this run) keeps the ledger's rows, above its old floor, with a warning:
    the reduce goes on, and a re-run scores the tile again.
    """
    records = state.records
    stale = records["tile"].filter(pc.greater(records["reduce_floor"], plan.threshold))
    rows = state.rows
    if len(stale) == 0:
        return rows
    stale = _with_parts(plan, stale.take(pc.sort_indices(stale)))
    if rows is not None:
        rows = rows.filter(pc.invert(pc.is_in(rows["tile"], value_set=stale)))
    wanted = (pds.field("score") >= plan.threshold) | pds.field("overlap_zone")
    scored = plan.url("scored")
    reread = []
    for start in range(0, len(stale), _REREAD_PARTS):
        tiles = stale.slice(start, _REREAD_PARTS).to_pylist()
        paths = [plan.out_fs._strip_protocol(part_url(scored, t)) for t in tiles]
        dataset = pds.dataset(paths, filesystem=plan.out_fs, format="parquet")
        reread.append(dataset.to_table(filter=wanted, use_threads=True))
    parts = [t for t in (rows, *reread) if t is not None]
    return pa.concat_tables(parts, promote_options="default")


def _with_parts(plan: ScanPlan, stale: pa.Array) -> pa.Array:
    """The tiles of ``stale`` whose committed part exists (fresh listing); warns of the rest."""
    present = pc.is_in(stale, value_set=committed_part_tiles(plan.out_fs, plan.scored_path))
    missing = stale.filter(pc.invert(present))
    if len(missing):
        log.warning(
            "%d tile(s) have no scored part under %s (e.g. %s): their rows below an earlier "
            "run's higher threshold are not in this table; re-run the same command to score "
            "them again",
            len(missing),
            safe_url(plan.url("scored")),
            missing[0].as_py(),
        )
    return stale.filter(present)


def candidate_table(plan: ScanPlan, rows: pa.Table | None) -> CandidateTable:
    """Merge, threshold and rank ``rows`` into the candidate table (with provenance)."""
    if rows is None or rows.num_rows == 0:
        rows = _empty_rows(plan.meta.n_members)
    table = rank_candidates(
        rows,
        threshold=plan.threshold,
        dedupe_radius_arcsec=plan.config.dedupe_radius_arcsec,
        top=plan.config.top,
    )
    if plan.survey_tiles:  # the tile in the survey's own words, beside the store's id
        table["survey_tile"] = [plan.survey_tiles.get(str(t), str(t)) for t in table["tile"]]
    table.meta.update(plan.provenance)
    table.meta["threshold"] = plan.threshold
    table.meta["dedupe_radius_arcsec"] = plan.config.dedupe_radius_arcsec
    return table


def rank_candidates(
    scored: pa.Table | Table,
    *,
    threshold: float,
    dedupe_radius_arcsec: float = 1.0,
    top: int | None = None,
) -> CandidateTable:
    """The candidate table of scored rows at ``threshold``, as the scan's reduce builds it.

    Parameters
    ----------
    scored : pyarrow.Table or astropy.table.Table
        Scored rows (e.g. :func:`lenscan.sweep.read_scored`), with at least ``tile``, ``id``,
        ``ra``, ``dec``, ``edge`` and ``score``.
    threshold : float
        Keep merged detections scoring at least this.
    dedupe_radius_arcsec : float
        Detections closer than this are one source.
    top : int, optional
        Keep only this many, the highest-scoring (an inspection budget).

    Returns
    -------
    CandidateTable
        Ranked (``rank`` 1 = highest score), with ``n_detections``.
    """
    rows = scored if isinstance(scored, pa.Table) else table_to_arrow(Table(scored))
    kept, n_detections = select_candidates(
        rows, threshold=threshold, dedupe_radius_arcsec=dedupe_radius_arcsec, top=top
    )
    kept = kept.drop_columns([c for c in _INTERNAL_COLUMNS if c in kept.column_names])
    meta = dict(scored.meta) if isinstance(scored, Table) else {}
    table = CandidateTable(arrow_to_table(kept), meta=meta)
    table["n_detections"] = n_detections.astype(np.int32)
    table.add_column(np.arange(1, len(table) + 1, dtype=np.int32), name="rank", index=0)
    table.meta["threshold"] = threshold
    if top is not None:
        table.meta["top"] = int(top)
    return table


def _empty_rows(n_members: int) -> pa.Table:
    cols: dict[str, Any] = {"tile": pa.array([], pa.string()), "id": pa.array([], pa.int64())}
    for c in ("ra", "dec", "x", "y"):
        cols[c] = pa.array([], pa.float64())
    cols["edge"] = pa.array([], pa.bool_())
    for k in range(n_members):
        cols[f"score_m{k}"] = pa.array([], pa.float32())
    cols["score"] = pa.array([], pa.float32())
    return pa.table(cols)


def write_failures(plan: ScanPlan, records: pa.Table) -> str:
    """Write ``OUT/failures.parquet`` (one row per failed tile or source); return its URL."""
    records = records.cast(FAILURE_SCHEMA)
    messages = pa.array([safe_text(m) for m in records["message"].to_pylist()], pa.string())
    records = records.set_column(records.schema.get_field_index("message"), "message", messages)
    buf = io.BytesIO()
    pq.write_table(records, buf)
    url = plan.url("failures.parquet")
    atomic_write_bytes(url, buf.getvalue(), storage_options=plan.config.out_storage_options)
    return url


def failure_records(
    plan: ScanPlan, state: LedgerState, tile_failures: list[dict[str, Any]]
) -> pa.Table:
    """This run's failed tiles, planned tiles with no committed part, and failed sources."""
    from lenscan.sweep.plan import committed_part_tiles

    failed = pa.array(sorted({f["tile"] for f in tile_failures}), pa.string())
    ids = state.tile_ids
    parts = committed_part_tiles(plan.out_fs, plan.scored_path)
    lost = ids.filter(pc.invert(pc.or_(pc.is_in(ids, parts), pc.is_in(ids, failed))))
    missing = [
        f"no part {posixpath.basename(part_url('', t))} under {plan.url('scored')} although a "
        "worker reported it written (was --out a local path on workers that do not share this "
        "client's disk?)"
        for t in lost.to_pylist()
    ]
    planned = plan.tiles.arrow
    left = planned.filter(pc.invert(pc.or_(pc.is_in(planned, ids), pc.is_in(planned, failed))))
    unscored = pc.fill_null(pa.nulls(len(left), pa.string()), _NOT_SCORED)
    return pa.concat_tables(
        [
            pa.Table.from_pylist(tile_failures, schema=FAILURE_SCHEMA),
            _tile_failures(lost, "commit", "MissingPart", pa.array(missing, pa.string())),
            _tile_failures(left, "task", "NotScored", unscored),
            state.failures.cast(FAILURE_SCHEMA),
        ]
    )


_NOT_SCORED = "the run ended before this tile was scored"


def _tile_failures(tiles: pa.Array, stage: str, error_type: str, messages: pa.Array) -> pa.Table:
    """Failure records of whole tiles (``id`` -1), as columns."""
    n = len(tiles)
    return pa.table(
        [
            tiles,
            pa.array(np.full(n, -1, np.int64)),
            pc.fill_null(pa.nulls(n, pa.string()), stage),
            pc.fill_null(pa.nulls(n, pa.string()), error_type),
            messages,
        ],
        schema=FAILURE_SCHEMA,
    )
