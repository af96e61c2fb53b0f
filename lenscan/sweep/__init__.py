"""The scan: colour cut, stamps and CNN scoring mapped over tiles on Dask, then reduced.

A scan reads as its steps, each in its own module:

* :mod:`~lenscan.sweep.plan`: tiles from the store's index, the run's identity, what is done;
* :mod:`~lenscan.sweep.execute`: one task per tile on the cluster (the only scoring graph);
* :mod:`~lenscan.sweep.worker`: the model on each worker and the tile task;
* :mod:`~lenscan.sweep.ledger`: what each tile contributed, committed in batches;
* :mod:`~lenscan.sweep.reduce`: merge, threshold, rank and write.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

import fsspec
import pyarrow.compute as pc
import pyarrow.dataset as pds
from astropy.table import Table
from distributed import Client

from lenscan._io import StorageError, check_output_folder, storage_failure
from lenscan._lease import Lease, LeaseError, hold_lease
from lenscan._secrets import protect_logger, safe_text, safe_url
from lenscan.catalogs import flag_known, known_summary, load_known_lenses, scored_to_hats
from lenscan.cluster import (
    check_scheduler_reachable,
    cluster_record,
    connect,
    refuse_spawned_reimport,
)
from lenscan.config import ScanConfig
from lenscan.sweep.execute import OutputNotShared, run_tiles
from lenscan.sweep.ledger import LedgerState, load_ledger
from lenscan.sweep.plan import (
    ScanPlan,
    committed_parts,
    plan_scan,
    prepare_output,
    write_run_record,
)
from lenscan.sweep.reduce import (
    candidate_table,
    failure_records,
    rank_candidates,
    reduce_rows,
    write_failures,
)
from lenscan.table import CandidateTable, arrow_to_table

__all__ = [
    "OutputNotShared",
    "ScanError",
    "ScanInterrupted",
    "rank_candidates",
    "read_scored",
    "scan",
]

log = protect_logger(logging.getLogger(__name__))


class ScanError(RuntimeError):
    """Some tiles or sources failed; everything else was written and a re-run resumes.

    Attributes
    ----------
    candidates : CandidateTable
        The candidate table of everything that was scored (also written under ``out``).
    failures : astropy.table.Table
        One row per failed tile (``id`` = -1) or source, with stage, error type and message.
    """

    def __init__(self, message: str, candidates: CandidateTable, failures: Table) -> None:
        super().__init__(message)
        self.candidates = candidates
        self.failures = failures


class ScanInterrupted(KeyboardInterrupt):
    """The scan was interrupted (Ctrl-C); finished tiles are committed and a re-run resumes.

    The message says how many tiles are committed and where.
    """


def scan(
    survey_url: str | None = None,
    *,
    config: ScanConfig | None = None,
    client: Client | None = None,
    progress: bool = True,
    **options: Any,
) -> CandidateTable:
    """Scan a survey for lenses and return the ranked candidate table.

    Parameters
    ----------
    survey_url : str
        The survey store URL (or give ``config``).
    config : ScanConfig, optional
        A full configuration; keyword ``options`` build one otherwise (``out`` is required:
        ``model``, ``colour_cut``, ``threshold``, ``batch_size``, ``device``, ``tiles``, ...
        see :class:`~lenscan.config.ScanConfig`).
    client : distributed.Client, optional
        Run on this cluster. Default: the config's scheduler address, or a new local cluster.
    progress : bool
        Show a progress bar over tiles.

    Returns
    -------
    CandidateTable
        Ranked candidates; ``meta["summary"]`` holds the run's counts and timings. Written
        under ``out`` with the ``scored/`` parts, ``failures.parquet`` and ``run.json``.

    Raises
    ------
    ScanError
        If a tile or source failed (unless ``allow_failures``). Everything else is written
        first; a re-run scores only the failed and missing tiles.
    lenscan._lease.LeaseHeld
        Another live run holds the lease on ``out`` (the message names it); nothing is written.
    lenscan._io.StorageError
        The survey's or the output's store stayed unreachable after retries; everything
        committed is kept and a re-run resumes.
    """
    refuse_spawned_reimport()  # before anything is written: see its docstring
    config = _resolve_config(survey_url, config, options)
    if client is None:  # refuse what cannot work before any output is written
        _check_local_device(config)
        if config.cluster.resolved_kind == "address":
            check_scheduler_reachable(config.cluster.address or config.cluster.scheduler)
    check_output_folder(config.out, storage_options=config.out_storage_options)
    try:
        with hold_lease(
            config.out,
            config.out_storage_options,
            ttl_s=config.lease_ttl_seconds,
            break_lease=config.break_lease,
        ) as lease:
            return _scan_holding(config, client, progress, lease)
    except (StorageError, LeaseError):  # already one line, saying what happened and what to do
        raise
    except Exception as exc:
        failure = storage_failure(exc, config.out, config.survey_url)
        if failure is None:
            raise
        raise failure from exc


def _scan_holding(
    config: ScanConfig, client: Client | None, progress: bool, lease: Lease
) -> CandidateTable:
    """The scan proper, run while this process holds the lease on ``config.out``."""
    t_start = time.perf_counter()
    plan = plan_scan(config)
    with lease.writing():
        prepare_output(plan)
        write_run_record(plan, status="running")
    if plan.done:
        log.info(
            "resuming: %d of %d tiles already scored under %s",
            len(plan.done),
            len(plan.tiles),
            safe_url(config.out),
        )
    tile_failures: list[dict[str, Any]] = []
    scored_hats: str | None = None
    if plan.todo or config.hats_scored:
        tile_failures, scored_hats = _run_on_cluster(plan, client, progress)
    state = load_ledger(plan.out_fs, plan.out_path, tiles=plan.tiles).current(plan.write_ids)
    failures = failure_records(plan, state, tile_failures)
    candidates = candidate_table(plan, reduce_rows(plan, state))
    summary = _summary(plan, state, failures, len(candidates), time.perf_counter() - t_start)
    if config.known_lenses:
        summary["known"] = _flag_known(candidates, config)
    if scored_hats is not None:
        summary["scored_hats"] = scored_hats
    candidates.meta["summary"] = summary
    with lease.writing():  # a run whose lease was taken over must not overwrite the new holder's
        outputs = _write_outputs(plan, candidates, failures, summary)
    # Set after the tables are written: where they are is not part of their own metadata.
    candidates.meta["outputs"] = outputs
    failed = arrow_to_table(failures)
    if len(failed) and not config.allow_failures:
        raise ScanError(_failure_message(plan, summary, failed), candidates, failed)
    return candidates


def _resolve_config(
    survey_url: str | None, config: ScanConfig | None, options: dict[str, Any]
) -> ScanConfig:
    if config is None:
        if survey_url is None:
            raise TypeError("scan() needs survey_url or config")
        return ScanConfig(survey_url=survey_url, **options)
    if options or (survey_url is not None and survey_url != config.survey_url):
        raise TypeError("give either config or survey_url + options, not both")
    return config


def _flag_known(candidates: CandidateTable, config: ScanConfig) -> dict[str, Any]:
    """Flag the candidates that are known lenses; the counts for the summary."""
    known = load_known_lenses(str(config.known_lenses), storage_options=config.storage_options)
    flag_known(candidates, known, radius_arcsec=config.known_radius_arcsec)
    return known_summary(candidates)


def _run_on_cluster(
    plan: ScanPlan, client: Client | None, progress: bool
) -> tuple[list[dict], str | None]:
    """Connect, score the plan's tiles, then export the scored rows as HATS if asked (on the
    same cluster); Ctrl-C becomes :class:`ScanInterrupted`.

    Returns the tile failures and what :func:`scored_to_hats` returns (``None`` if not asked).
    """
    config = plan.config
    quieted: int | None = None
    dask_log = logging.getLogger("distributed")
    try:
        with connect(config.cluster, client) as active:
            plan.provenance["cluster"] = cluster_record(active, None if client else config.cluster)
            try:
                failures = run_tiles(active, plan, progress=progress) if plan.todo else []
                if not config.hats_scored:
                    return failures, None
                opts = config.out_storage_options
                return failures, scored_to_hats(config.out, active, storage_options=opts)
            except KeyboardInterrupt:
                # Closing an interrupted cluster kills workers busy in a tile: expected, and
                # Dask's warnings about it would bury the one line that matters.
                quieted = dask_log.level
                dask_log.setLevel(logging.ERROR)
                raise
    except KeyboardInterrupt:
        raise _interrupted(plan) from None
    finally:
        if quieted is not None:
            dask_log.setLevel(quieted)


def _interrupted(plan: ScanPlan) -> ScanInterrupted:
    state = load_ledger(plan.out_fs, plan.out_path, tiles=plan.tiles).current(plan.write_ids)
    return ScanInterrupted(
        f"interrupted: {len(state.tiles)} of {len(plan.tiles)} tiles are committed under "
        f"{plan.config.out}; run the same command again to resume (committed tiles are not "
        "scored again)"
    )


def _check_local_device(config: ScanConfig) -> None:
    """Refuse ``device="cuda"`` on a local cluster of a machine without a GPU, before it starts.

    Workers of other clusters run elsewhere: only they can tell whether they have one.
    """
    if config.device != "cuda" or config.cluster.resolved_kind not in ("local", "local-cuda"):
        return
    from lenscan._device import resolve_device

    try:
        resolve_device("cuda")
    except ValueError:
        raise ValueError(
            "--device cuda: this machine has no CUDA GPU for the local cluster's workers; use "
            "--device auto (a GPU where there is one) or cpu, or a cluster with GPU workers "
            "(--cluster, --scheduler)"
        ) from None


def _write_outputs(plan: ScanPlan, candidates, failures, summary: dict[str, Any]) -> dict[str, Any]:
    """Write tables, gallery and ``run.json``; return their URLs (``meta["outputs"]``)."""
    config = plan.config
    outputs: dict[str, Any] = {
        "tables": candidates.write_all(
            config.out, formats=config.formats, storage_options=config.out_storage_options
        ),
        "gallery": None,
        "gallery_candidates": 0,
        "run": plan.url("run.json"),
    }
    write_failures(plan, failures)
    if config.gallery_size:
        from lenscan.gallery import write_gallery

        shown = candidates[: config.gallery_size]
        outputs["gallery"] = write_gallery(shown, config, survey=plan.survey)
        outputs["gallery_candidates"] = len(shown)
    by_tile = failures.filter(pc.equal(failures["id"], -1)).to_pylist()
    write_run_record(
        plan,
        status="complete" if failures.num_rows == 0 else "failures",
        finished=_dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ"),
        summary=summary,
        failed_tiles={
            r["tile"]: f"{r['stage']}: {r['error_type']}: {r['message']}" for r in by_tile
        },
    )
    return outputs


def _summary(
    plan: ScanPlan, state: LedgerState, failures, n_candidates: int, wall: float
) -> dict[str, Any]:
    records = state.records
    now = records.filter(pc.invert(pc.is_in(records["tile"], plan.done.arrow)))
    totals = state.totals()

    def total(column: str) -> int:
        return int(pc.sum(now[column]).as_py() or 0)

    scored_now = total("n_scored")
    by_tile = failures.filter(pc.equal(failures["id"], -1))
    return {
        "tiles": len(plan.tiles),
        "tiles_skipped": len(plan.done),
        "tiles_scanned": now.num_rows,
        "tiles_failed": len(pc.unique(by_tile["tile"])),
        "sources": total("n_sources"),
        "selected": total("n_selected"),
        "scored": scored_now,
        "scored_total": totals["n_scored"],
        "sources_total": totals["n_sources"],
        "edge_stamps": total("n_edge"),
        "sources_failed": totals["n_source_failures"],
        "threshold": plan.threshold,
        "false_rate": plan.config.false_rate,
        "top": plan.config.top,
        "n_candidates": n_candidates,
        "wall_seconds": round(wall, 3),
        "stamps_per_second": round(scored_now / wall, 2) if wall > 0 else None,
        "worker_seconds": {k: round(v, 3) for k, v in _stage_seconds(now).items()},
    }


def _stage_seconds(records) -> dict[str, float]:
    """Worker seconds per stage summed over ``records`` (their JSON, parsed a step at a time)."""
    stages: dict[str, float] = {}
    for batch in records.select(["stage_seconds"]).to_batches(max_chunksize=8192):
        for text in batch["stage_seconds"].to_pylist():
            for k, v in json.loads(text).items():
                stages[k] = stages.get(k, 0.0) + v
    return stages


def _failure_message(plan: ScanPlan, summary: dict[str, Any], failed: Table) -> str:
    tiles = sorted({str(t) for t, i in zip(failed["tile"], failed["id"], strict=True) if i == -1})
    shown = "; ".join(tiles[:10]) + (" ..." if len(tiles) > 10 else "")
    return safe_text(
        f"{summary['tiles_failed']} of {summary['tiles']} tiles failed"
        + (f" ({shown})" if tiles else "")
        + f" and {summary['sources_failed']} sources could not be scored; reasons in "
        f"{plan.url('failures.parquet')}. The candidate table from everything else is written "
        f"under {plan.config.out}; re-run the same command to retry the failed tiles."
    )


def read_scored(
    out: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    tiles: list[str] | None = None,
    columns: list[str] | None = None,
    filter: Any = None,
) -> Table:
    """Read committed scored rows under ``OUT/scored/`` into one table.

    Parameters
    ----------
    out : str
        The scan's output URL.
    storage_options : mapping, optional
        fsspec options for ``out``.
    tiles : list of str, optional
        Only these tiles' parts.
    columns : list of str, optional
        Only these columns.
    filter : pyarrow.dataset.Expression, optional
        A row filter pushed down to the Parquet reader, e.g.
        ``pyarrow.dataset.field("score") >= 0.9``.
    """
    fs, path = fsspec.core.url_to_fs(out, **(storage_options or {}))
    parts = committed_parts(fs, f"{path.rstrip('/')}/scored")
    paths = [parts[t] for t in sorted(parts) if tiles is None or t in set(tiles)]
    if not paths:
        return Table()
    dataset = pds.dataset(paths, filesystem=fs, format="parquet")
    arrow = dataset.to_table(columns=columns, filter=filter, use_threads=True)
    return arrow_to_table(arrow)
