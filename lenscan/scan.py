"""The scan: colour cut, stamps and CNN scoring mapped over tiles on Dask, then reduced.

This is the only module that builds the scoring graph. One task per tile: the task reads the
tile's catalogue, applies the cut, reads the touched chunks in bulk, cuts and normalises the
stamps, scores them with the worker's cached model and commits one Parquet part under
``OUT/scored/``. The client then reduces the parts to the candidate table.

Models live on workers, never in the graph: a :class:`ModelPlugin` carries the checkpoint bytes
to each worker once; tasks find the loaded model in a per-process cache keyed by its SHA-256.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import logging
import os
import posixpath
import re
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from astropy.table import Table, vstack
from distributed import Client, WorkerPlugin, as_completed

import lenscan
from lenscan.cluster import cluster_record, connect
from lenscan.config import ScanConfig
from lenscan.models import (
    DEFAULT_MODEL,
    LensModel,
    check_compatible,
    load_model,
    read_model_meta,
)
from lenscan.models.registry import resolve_model_files
from lenscan.select import ColourCut, _parse_colour, colour_cut_mask
from lenscan.stamps import normalise_stamps
from lenscan.survey import open_survey, read_stamps
from lenscan.table import (
    CandidateTable,
    atomic_write_bytes,
    read_parquet_table,
    select_candidates,
)

log = logging.getLogger(__name__)

#: Sources handled per block inside a tile task (bounds worker memory on dense tiles).
SOURCE_BLOCK = 4096
_RUN_FINGERPRINT_KEYS = ("survey_url", "model_sha256", "colour_cut", "stamp_size_pix")


class ScanError(RuntimeError):
    """Some tiles failed; everything else was written and a re-run resumes."""


# --------------------------------------------------------------------------- worker side
_MODEL_CACHE: dict[str, LensModel] = {}


@dataclass(frozen=True)
class ModelPayload:
    """A checkpoint as bytes, so workers without the file (remote clusters) can load it."""

    sha256: str
    weights: bytes
    meta_json: str

    @classmethod
    def from_model(cls, model_ref: str) -> ModelPayload:
        weights_path, meta_path = resolve_model_files(model_ref)
        weights = weights_path.read_bytes()
        return cls(hashlib.sha256(weights).hexdigest(), weights, meta_path.read_text())


def _pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but this worker has no CUDA GPU")
    return device


def _cache_key(sha256: str, device: str) -> str:
    return f"{sha256}:{device}"


def worker_model(payload: ModelPayload, device: str) -> LensModel:
    """Return the model for ``payload`` loaded once in this process (cached by SHA-256)."""
    key = _cache_key(payload.sha256, device)
    model = _MODEL_CACHE.get(key)
    if model is None:
        with tempfile.TemporaryDirectory(prefix="lenscan-model-") as tmp:
            stem = os.path.join(tmp, "model")
            with open(stem + ".safetensors", "wb") as fh:
                fh.write(payload.weights)
            with open(stem + ".json", "w") as fh:
                fh.write(payload.meta_json)
            model = load_model(stem, device=_pick_device(device))
        if model.sha256 != payload.sha256:
            raise RuntimeError("model bytes changed in transit (SHA-256 mismatch)")
        _MODEL_CACHE[key] = model
    return model


class ModelPlugin(WorkerPlugin):
    """Loads the scan's model on every worker once, when the worker joins."""

    def __init__(self, payload: ModelPayload, device: str) -> None:
        self.payload = payload
        self.device = device
        self.name = f"lenscan-model-{payload.sha256[:16]}-{device}"

    def setup(self, worker: Any) -> None:
        # Each Dask thread runs one tile at a time and the worker's threads match its cores:
        # one torch thread per task keeps the cores busy without oversubscribing them (with
        # torch threads = Dask threads, 2 tiles on 2 cores ran 4x slower than the CNN alone).
        torch.set_num_threads(1)
        worker_model(self.payload, self.device)


@dataclass(frozen=True)
class TileJob:
    """What a tile task needs: small, picklable, the same for every tile of a scan."""

    survey_url: str
    storage_options: Mapping[str, Any]
    cut: ColourCut
    payload_sha256: str
    device: str
    batch_size: int
    scored_url: str
    out_storage_options: Mapping[str, Any]
    run_id: str


@dataclass
class TileResult:
    """Counts a tile task reports back (the rows go to its Parquet part)."""

    tile: str
    n_sources: int = 0
    n_selected: int = 0
    n_scored: int = 0
    n_edge: int = 0
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)


def part_url(scored_url: str, tile_id: str) -> str:
    """URL of the committed Parquet part of one tile."""
    return posixpath.join(scored_url, f"tile-{tile_id}.parquet")


def score_tile(tile_id: str, job: TileJob, payload: ModelPayload | None = None) -> TileResult:
    """Score one tile and commit its rows as one Parquet part (runs on a worker).

    Parameters
    ----------
    tile_id : str
        Tile to score.
    job : TileJob
        The scan's settings.
    payload : ModelPayload, optional
        Only needed where no :class:`ModelPlugin` ran (synchronous execution).
    """
    t_start = time.perf_counter()
    result = TileResult(tile=tile_id)
    model = _MODEL_CACHE.get(_cache_key(job.payload_sha256, job.device))
    if model is None:
        if payload is None:
            raise RuntimeError(
                f"model {job.payload_sha256[:12]} is not loaded on this worker "
                "(the lenscan ModelPlugin did not run here)"
            )
        model = worker_model(payload, job.device)
    meta = model.meta
    tile = open_survey(job.survey_url, storage_options=dict(job.storage_options)).tile(tile_id)
    catalog = tile.catalog()
    wcs = tile.wcs
    t0 = time.perf_counter()
    mask = colour_cut_mask(catalog, job.cut)
    selected = np.flatnonzero(mask)
    result.n_sources = int(mask.size)
    result.n_selected = int(selected.size)
    rows: list[dict[str, np.ndarray]] = []
    timings = {"cut": time.perf_counter() - t0, "read": 0.0, "score": 0.0}
    for start in range(0, selected.size, SOURCE_BLOCK):
        idx = selected[start : start + SOURCE_BLOCK]
        ra = np.asarray(catalog["ra"], dtype=np.float64)[idx]
        dec = np.asarray(catalog["dec"], dtype=np.float64)[idx]
        # Stamps are centred on the WCS position of the source, not on stored pixel columns.
        x, y = wcs.world_to_pixel_values(ra, dec)
        t0 = time.perf_counter()
        stamps, edge = read_stamps(tile, x, y, meta.stamp_size_pix, bands=meta.bands)
        timings["read"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        normalised = normalise_stamps(torch.from_numpy(stamps), meta.normalisation)
        scores = model.score(normalised, batch_size=job.batch_size).cpu().numpy()
        timings["score"] += time.perf_counter() - t0
        rows.append(_rows(tile_id, catalog, idx, ra, dec, x, y, edge, scores, job.cut))
        result.n_scored += int(idx.size)
        result.n_edge += int(edge.sum())
    table = _concat_rows(rows, tile_id, catalog, job.cut, model.meta.n_members)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write_bytes(
        part_url(job.scored_url, tile_id), buf.getvalue(), storage_options=job.out_storage_options
    )
    result.stage_seconds = timings
    result.seconds = time.perf_counter() - t_start
    return result


def _photometry_columns(catalog: Mapping[str, np.ndarray]) -> list[str]:
    return [c for c in catalog if c.startswith(("mag_", "magerr_"))]


def _rows(tile_id, catalog, idx, ra, dec, x, y, edge, scores, cut) -> dict[str, np.ndarray]:
    n = idx.size
    row: dict[str, np.ndarray] = {
        "tile": np.full(n, tile_id, dtype=object),
        "id": np.asarray(catalog["id"], dtype=np.int64)[idx],
        "ra": ra,
        "dec": dec,
        "x": np.asarray(x, dtype=np.float64),
        "y": np.asarray(y, dtype=np.float64),
    }
    for col in _photometry_columns(catalog):
        row[col] = np.asarray(catalog[col], dtype=np.float32)[idx]
    for colour in cut.colour_ranges:
        a, b = _parse_colour(colour)
        row[f"colour_{a}_{b}"] = (row[f"mag_{a}"] - row[f"mag_{b}"]).astype(np.float32)
    for col, dtype in (("flags", np.int32), ("extended_class", np.int16)):
        if col in catalog:
            row[col] = np.asarray(catalog[col], dtype=dtype)[idx]
    row["edge"] = np.asarray(edge, dtype=bool)
    for k in range(scores.shape[1]):
        row[f"score_m{k}"] = scores[:, k].astype(np.float32)
    row["score"] = scores.mean(axis=1).astype(np.float32)
    return row


def _concat_rows(rows, tile_id, catalog, cut, n_members) -> pa.Table:
    if not rows:
        # An empty part still commits the tile as done, with the full schema.
        empty_idx = np.zeros(0, dtype=np.int64)
        zeros = np.zeros(0)
        rows = [
            _rows(
                tile_id, catalog, empty_idx, zeros, zeros, zeros, zeros,
                np.zeros(0, bool), np.zeros((0, n_members), np.float32), cut,
            )
        ]  # fmt: skip
    merged = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
    merged["tile"] = merged["tile"].astype(str)
    return pa.table(merged)


# --------------------------------------------------------------------------- client side
def _run_fingerprint(config: ScanConfig, payload: ModelPayload, stamp_size: int) -> dict:
    return {
        "survey_url": config.survey_url,
        "model_sha256": payload.sha256,
        "colour_cut": config.colour_cut.to_dict(),
        "stamp_size_pix": stamp_size,
    }


def _check_resume(out_fs, run_json: str, fingerprint: dict, out: str) -> None:
    if not out_fs.exists(run_json):
        return
    previous = json.loads(out_fs.cat_file(run_json))
    for key in _RUN_FINGERPRINT_KEYS:
        if previous.get(key) != fingerprint[key]:
            raise ValueError(
                f"{out} already holds a scan with a different {key} "
                f"({previous.get(key)!r} != {fingerprint[key]!r}); use another --out, or "
                "resume=False to rescore every tile"
            )


def _committed_parts(fs, scored_path: str) -> dict[str, str]:
    """Map tile id -> path of its committed part (temporary files never match)."""
    if not fs.exists(scored_path):
        return {}
    parts = {}
    for path in fs.ls(scored_path, detail=False):
        m = re.fullmatch(r"tile-(.+)\.parquet", posixpath.basename(path))
        if m:
            parts[m.group(1)] = path
    return parts


def read_scored(out: str, *, storage_options: Mapping[str, Any] | None = None) -> Table:
    """Read every committed per-tile part under ``OUT/scored/`` into one table."""
    fs, path = fsspec.core.url_to_fs(out, **(storage_options or {}))
    parts = _committed_parts(fs, posixpath.join(path, "scored"))
    tables = [
        read_parquet_table(fs.unstrip_protocol(parts[t]), storage_options=storage_options)
        for t in sorted(parts)
    ]
    tables = [t for t in tables if len(t)] or tables[:1]
    if not tables:
        return Table()
    return vstack(tables, metadata_conflicts="silent") if len(tables) > 1 else tables[0]


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
        Ranked candidates; ``meta["summary"]`` holds the run's counts and timings. The table is
        also written under ``out`` with ``scored/`` parts and ``run.json``.

    Raises
    ------
    ScanError
        If some tiles failed. Everything else is written first; a re-run scores only the
        missing tiles.
    """
    if config is None:
        if survey_url is None:
            raise TypeError("scan() needs survey_url or config")
        config = ScanConfig(survey_url=survey_url, **options)
    elif options or (survey_url is not None and survey_url != config.survey_url):
        raise TypeError("give either config or survey_url + options, not both")
    t_start = time.perf_counter()
    model_ref = DEFAULT_MODEL if config.model == "default" else config.model
    payload = ModelPayload.from_model(model_ref)
    meta = read_model_meta(model_ref)
    survey = open_survey(config.survey_url, storage_options=config.storage_options)
    missing = [b for b in config.colour_cut.bands if b not in survey.bands]
    if missing:
        raise ValueError(
            f"colour cut {config.colour_cut.name!r} needs bands {missing} that survey "
            f"{config.survey_url} does not have (bands: {list(survey.bands)})"
        )
    all_tiles = list(survey.tile_ids)
    if config.tiles is not None:
        unknown = sorted(set(config.tiles) - set(all_tiles))
        if unknown:
            raise ValueError(f"tiles {unknown} are not complete tiles of {config.survey_url}")
        all_tiles = [t for t in all_tiles if t in set(config.tiles)]
    # Refuse a model that cannot read this survey before any work starts.
    scales = {survey.tile(t).pixel_scale_arcsec for t in all_tiles[:1]}
    try:
        check_compatible(meta, bands=survey.bands, pixel_scale_arcsec=next(iter(scales), None))
    except ValueError as exc:
        raise ValueError(f"survey {config.survey_url}: {exc}") from exc
    threshold = config.threshold if config.threshold is not None else _model_threshold(meta)

    out_fs, out_path = fsspec.core.url_to_fs(config.out, **config.out_storage_options)
    scored_path = posixpath.join(out_path, "scored")
    run_json = posixpath.join(out_path, "run.json")
    fingerprint = _run_fingerprint(config, payload, meta.stamp_size_pix)
    if config.resume:
        _check_resume(out_fs, run_json, fingerprint, config.out)
        done = set(_committed_parts(out_fs, scored_path)) & set(all_tiles)
    else:
        done = set()
        if out_fs.exists(scored_path):
            out_fs.rm(scored_path, recursive=True)
    todo = [t for t in all_tiles if t not in done]
    run_id = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    provenance = {
        **fingerprint,
        "lenscan_version": lenscan.__version__,
        "model_name": meta.name,
        "model_members": meta.n_members,
        "threshold": threshold,
        "config": config.to_dict(),
        "started": run_id,
        "status": "running",
    }
    atomic_write_bytes(
        out_fs.unstrip_protocol(run_json),
        json.dumps(provenance, indent=2, default=str).encode(),
        storage_options=config.out_storage_options,
    )
    if done:
        log.info(
            "resuming: %d of %d tiles already scored under %s",
            len(done),
            len(all_tiles),
            config.out,
        )
    job = TileJob(
        survey_url=config.survey_url,
        storage_options=dict(config.storage_options),
        cut=config.colour_cut,
        payload_sha256=payload.sha256,
        device=config.device,
        batch_size=config.batch_size,
        scored_url=out_fs.unstrip_protocol(scored_path),
        out_storage_options=dict(config.out_storage_options),
        run_id=run_id,
    )
    results: list[TileResult] = []
    failures: dict[str, str] = {}
    if todo:
        with connect(config.cluster, client) as active:
            provenance["cluster"] = cluster_record(active, None if client else config.cluster)
            active.register_plugin(ModelPlugin(payload, config.device))
            results, failures = _run_tiles(active, todo, job, progress=progress)
    scored = read_scored(config.out, storage_options=config.out_storage_options)
    wall = time.perf_counter() - t_start
    summary = _summary(all_tiles, done, results, failures, scored, threshold, wall)
    if len(scored) == 0:
        scored = _empty_scored(meta.n_members)
    scored.meta.update({k: v for k, v in provenance.items() if k != "status"})
    candidates = select_candidates(
        scored, threshold=threshold, dedupe_radius_arcsec=config.dedupe_radius_arcsec
    )
    summary["n_candidates"] = len(candidates)
    candidates.meta["summary"] = summary
    candidates.write_all(
        config.out, formats=config.formats, storage_options=config.out_storage_options
    )
    if config.gallery_size:
        from lenscan.gallery import write_gallery

        write_gallery(candidates[: config.gallery_size], config, survey=survey)
    provenance.update(
        status="failed-tiles" if failures else "complete",
        finished=_dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ"),
        summary=summary,
        failed_tiles=failures,
    )
    atomic_write_bytes(
        out_fs.unstrip_protocol(run_json),
        json.dumps(provenance, indent=2, default=str).encode(),
        storage_options=config.out_storage_options,
    )
    if failures:
        listing = "; ".join(f"{t}: {m}" for t, m in sorted(failures.items()))
        raise ScanError(
            f"{len(failures)} of {len(all_tiles)} tiles failed ({listing}). The candidate table "
            f"from the other tiles is written under {config.out}; re-run to retry the failed ones."
        )
    return candidates


def _model_threshold(meta) -> float:
    return float((meta.metrics or {}).get("recommended_threshold", 0.5))


def _run_tiles(
    client: Client, tiles: list[str], job: TileJob, *, progress: bool
) -> tuple[list[TileResult], dict[str, str]]:
    """Submit one task per tile and collect results as they finish."""
    from tqdm.auto import tqdm

    futures = {
        client.submit(score_tile, t, job, key=f"lenscan-score-{job.run_id}-{t}", retries=1): t
        for t in tiles
    }
    results: list[TileResult] = []
    failures: dict[str, str] = {}
    bar = tqdm(total=len(tiles), unit="tile", desc="scanning", disable=not progress)
    stamps = 0
    for future in as_completed(futures):
        tile = futures[future]
        try:
            res = future.result()
        except Exception as exc:  # one bad tile must not lose the others
            failures[tile] = f"{type(exc).__name__}: {exc}"
            log.error("tile %s failed: %s", tile, failures[tile])
        else:
            results.append(res)
            stamps += res.n_scored
            bar.set_postfix(stamps=stamps, failed=len(failures))
        bar.update(1)
    bar.close()
    return results, failures


def _summary(all_tiles, done, results, failures, scored, threshold, wall) -> dict[str, Any]:
    n_scored_now = sum(r.n_scored for r in results)
    worker_seconds = {
        k: sum(r.stage_seconds.get(k, 0.0) for r in results) for k in ("cut", "read", "score")
    }
    return {
        "tiles": len(all_tiles),
        "tiles_skipped": len(done),
        "tiles_scanned": len(results),
        "tiles_failed": len(failures),
        "sources": sum(r.n_sources for r in results),
        "selected": sum(r.n_selected for r in results),
        "scored": n_scored_now,
        "scored_total": len(scored),
        "edge_stamps": sum(r.n_edge for r in results),
        "threshold": threshold,
        "wall_seconds": round(wall, 3),
        "stamps_per_second": round(n_scored_now / wall, 2) if wall > 0 else None,
        "worker_seconds": {k: round(v, 3) for k, v in worker_seconds.items()},
    }


def _empty_scored(n_members: int) -> Table:
    cols = {"tile": np.zeros(0, dtype=str), "id": np.zeros(0, np.int64)}
    for c in ("ra", "dec", "x", "y"):
        cols[c] = np.zeros(0)
    cols["edge"] = np.zeros(0, bool)
    for k in range(n_members):
        cols[f"score_m{k}"] = np.zeros(0, np.float32)
    cols["score"] = np.zeros(0, np.float32)
    return Table(cols)
