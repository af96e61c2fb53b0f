"""The worker side of a scan: the model on each worker, and the task that scores one tile.

Models live on workers, never in the graph: a :class:`ModelPlugin` carries the checkpoint bytes
to each worker once; tasks find the loaded model in a per-process cache keyed by its SHA-256
(and device, precision, compile). Workers score with the model's inference form
(:func:`lenscan.models.inference.inference_model`: batch norm folded, channels-last; bf16
autocast and ``torch.compile`` when the scan asks), which gives the plain model's scores.

A tile task (:func:`score_tile`) reads the tile's catalogue, applies the cut, reads the touched
chunks in bulk, cuts and normalises the stamps, scores them, commits every scored row as one
Parquet part ``OUT/scored/tile-<id>.parquet`` and returns only what the reduce needs: counts,
timings, per-source failures and the rows that can become candidates or duplicates.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import io
import json
import os
import posixpath
import tempfile
import time
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from distributed import WorkerPlugin

from lenscan._device import resolve_device
from lenscan._io import atomic_write_bytes
from lenscan._secrets import remember_secrets, safe_storage_options, safe_text, safe_url
from lenscan.models import LensModel, load_model
from lenscan.models.architectures import architecture_problem
from lenscan.models.inference import inference_model
from lenscan.models.registry import resolve_model_files
from lenscan.models.runtimes import runtime_problem
from lenscan.select import ColourCut, colour_cut_mask, parse_colour
from lenscan.stamps import normalise_stamps
from lenscan.survey import SurveyStore, Tile, open_survey, read_model_stamps

__all__ = [
    "ModelPayload",
    "ModelPlugin",
    "TileError",
    "TileJob",
    "TileResult",
    "keep_freed_memory",
    "model_load_problem",
    "part_url",
    "score_tile",
    "worker_model",
]

#: Most sources handled per block inside a tile task (bounds worker memory on dense tiles).
SOURCE_BLOCK = 4096
#: Fewest sources per block: smaller blocks pay the per-read overheads (shard indexes) too often.
MIN_BLOCK = 128

_MODEL_CACHE: dict[str, LensModel] = {}
_SURVEY_CACHE: dict[str, SurveyStore] = {}


@dataclass(frozen=True)
class ModelPayload:
    """A checkpoint as bytes, so workers without the file (remote clusters) can load it."""

    sha256: str
    weights: bytes
    meta_json: str
    weights_suffix: str = ".safetensors"

    @classmethod
    def from_model(cls, model_ref: str) -> ModelPayload:
        weights_path, meta_path = resolve_model_files(model_ref)
        weights = weights_path.read_bytes()
        digest = hashlib.sha256(weights).hexdigest()
        return cls(digest, weights, meta_path.read_text(), weights_path.suffix)


def _cache_key(sha256: str, device: str, precision: str = "fp32", compile: bool = False) -> str:
    return f"{sha256}:{device}:{precision}:{'compiled' if compile else 'eager'}"


def worker_model(
    payload: ModelPayload, device: str, *, precision: str = "fp32", compile: bool = False
) -> LensModel:
    """Return the model for ``payload`` loaded once in this process, ready for scoring.

    The members are the inference forms of :func:`~lenscan.models.inference.inference_model`
    (batch norm folded into the convolutions, channels-last; bf16 autocast and
    ``torch.compile`` when asked), built once per worker and cached by SHA-256, device,
    precision and compile.
    """
    key = _cache_key(payload.sha256, device, precision, compile)
    model = _MODEL_CACHE.get(key)
    if model is None:
        with tempfile.TemporaryDirectory(prefix="lenscan-model-") as tmp:
            stem = os.path.join(tmp, "model")
            with open(stem + payload.weights_suffix, "wb") as fh:
                fh.write(payload.weights)
            with open(stem + ".json", "w") as fh:
                fh.write(payload.meta_json)
            plain = load_model(stem, device=resolve_device(device))
        if plain.sha256 != payload.sha256:
            raise RuntimeError("model bytes changed in transit (SHA-256 mismatch)")
        model = _MODEL_CACHE[key] = inference_model(plain, precision=precision, compile=compile)
    return model


#: glibc ``mallopt`` parameters (malloc.h) and the values :func:`keep_freed_memory` sets.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # glibc's largest on 64-bit
_TRIM_THRESHOLD_BYTES = 256 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Let this process reuse freed memory for the CNN's activations instead of mmap'ing it anew.

    Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which also turns off
    glibc's adaptive mmap threshold: every tensor over 128 KiB (each activation of a forward
    pass) is then a fresh ``mmap`` whose pages fault in and are zeroed, batch after batch. That
    halved the CPU forward in a worker (2,900 -> 1,300 stamps/s on one core) and broke the
    scaling from 1 to 2 workers (1.2-1.45x). Raising both thresholds keeps activations in
    the heap. Returns False (and changes nothing) where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
        return bool(ok and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False


def model_load_problem(meta_json: str) -> str | None:
    """Why this process cannot load the model of ``meta_json``, or None (run on each worker).

    Checks what a worker may lack without loading the weights: the package of a plug-in or
    ``timm:`` architecture, or the runtime of an exported model (onnxruntime).
    """
    meta = json.loads(meta_json)
    runtime = meta.get("runtime", "torch")
    if runtime != "torch":
        return runtime_problem(runtime)
    return architecture_problem(meta.get("architecture", ""))


class ModelPlugin(WorkerPlugin):
    """A Dask worker plugin that loads the scan's model on every worker once, when it joins."""

    def __init__(
        self, payload: ModelPayload, device: str, *, precision: str = "fp32", compile: bool = False
    ) -> None:
        self.payload = payload
        self.device = device
        self.precision = precision
        self.compile = compile
        self.name = f"lenscan-model-{payload.sha256[:16]}-{device}-{precision}-{int(compile)}"

    def setup(self, worker: Any) -> None:
        # Each Dask thread runs one tile at a time and the worker's threads match its cores:
        # one torch thread per task keeps the cores busy without oversubscribing them (with
        # torch threads = Dask threads, 2 tiles on 2 cores ran 4x slower than the CNN alone).
        torch.set_num_threads(1)
        keep_freed_memory()
        worker_model(self.payload, self.device, precision=self.precision, compile=self.compile)

    def teardown(self, worker: Any) -> None:
        key = _cache_key(self.payload.sha256, self.device, self.precision, self.compile)
        _MODEL_CACHE.pop(key, None)


@dataclass(frozen=True)
class TileJob:
    """What a tile task needs: small, picklable, the same for every tile of a scan.

    ``reduce_floor`` and ``overlap_margin_arcsec`` decide which rows travel back to the client:
    rows scoring at least the floor (the candidate threshold), and rows close enough to the tile
    edge that a neighbouring tile may hold the same source.
    """

    survey_url: str
    storage_options: Mapping[str, Any]
    cut: ColourCut
    payload_sha256: str
    device: str
    batch_size: int
    scored_url: str
    out_storage_options: Mapping[str, Any]
    run_token: str
    reduce_floor: float
    overlap_margin_arcsec: float
    dihedral: bool = False
    precision: str = "fp32"
    compile: bool = False

    def __repr__(self) -> str:
        # Dask logs a failed task's arguments ("Compute Failed ... Task: score_tile(...)"):
        # this repr is what reaches worker logs, so it shows no credential.
        return (
            f"TileJob(survey_url={safe_url(self.survey_url)!r}, "
            f"storage_options={safe_storage_options(self.storage_options)!r}, "
            f"scored_url={safe_url(self.scored_url)!r}, "
            f"out_storage_options={safe_storage_options(self.out_storage_options)!r}, "
            f"run_token={self.run_token!r}, cut={self.cut.name!r})"
        )


@dataclass
class TileResult:
    """What a tile task returns: counts, timings, failed sources and the reduce rows."""

    tile: str
    write_id: str
    n_sources: int = 0
    n_selected: int = 0
    n_scored: int = 0
    n_edge: int = 0
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    source_failures: list[dict[str, Any]] = field(default_factory=list)
    reduce_rows: pa.Table | None = None


class TileError(RuntimeError):
    """A tile could not be scored: which tile, at which stage, and why (picklable)."""

    def __init__(self, tile: str, stage: str, error_type: str, message: str) -> None:
        super().__init__(tile, stage, error_type, message)
        self.tile, self.stage, self.error_type, self.message = tile, stage, error_type, message

    def __str__(self) -> str:
        return f"tile {self.tile}: {self.stage} failed: {self.error_type}: {self.message}"


class _Stages:
    """Times the stages of a tile task and names the stage that raised."""

    def __init__(self, tile_id: str) -> None:
        self.tile_id = tile_id
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        except TileError:
            raise
        except Exception as exc:
            message = safe_text(str(exc))  # it reaches failures.parquet and the logs
            raise TileError(self.tile_id, name, type(exc).__name__, message) from exc
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


def part_url(scored_url: str, tile_id: str) -> str:
    """URL of the committed Parquet part of one tile."""
    return posixpath.join(scored_url, f"tile-{tile_id}.parquet")


def _survey(job: TileJob) -> SurveyStore:
    """The survey opened once per worker process (opening reads the root metadata)."""
    key = json.dumps([job.survey_url, dict(job.storage_options)], sort_keys=True, default=str)
    survey = _SURVEY_CACHE.get(key)
    if survey is None:
        remember_secrets(job.storage_options, job.survey_url, job.scored_url)  # for safe_text
        remember_secrets(job.out_storage_options)
        survey = _SURVEY_CACHE[key] = open_survey(job.survey_url, job.storage_options)
    return survey


def _model(job: TileJob, payload: ModelPayload | None) -> LensModel:
    model = _MODEL_CACHE.get(_cache_key(job.payload_sha256, job.device, job.precision, job.compile))
    if model is not None:
        return model
    if payload is None:
        raise RuntimeError(
            f"model {job.payload_sha256[:12]} is not loaded on this worker "
            "(the lenscan ModelPlugin did not run here)"
        )
    return worker_model(payload, job.device, precision=job.precision, compile=job.compile)


def score_tile(tile_id: str, job: TileJob, payload: ModelPayload | None = None) -> TileResult:
    """Score one tile, commit its rows as one Parquet part, return the reduce rows.

    Parameters
    ----------
    tile_id : str
        Tile to score.
    job : TileJob
        The scan's settings.
    payload : ModelPayload, optional
        Only needed where no :class:`ModelPlugin` ran (synchronous execution).

    Raises
    ------
    TileError
        Naming the stage (model, open, catalog, cut, read, score, write) that failed.
        Sources that cannot be scored (no finite sky position, no finite pixel in the stamp)
        do not fail the tile: they are listed in ``TileResult.source_failures``.
    """
    t_start = time.perf_counter()
    stage = _Stages(tile_id)
    with stage("model"):
        model = _model(job, payload)
    with stage("open"):
        tile = _survey(job).tile(tile_id)
        _check_tile(tile, model.meta.bands)
        wcs = tile.wcs
    with stage("catalog"):
        catalog = tile.catalog()
    with stage("cut"):
        selected = np.flatnonzero(colour_cut_mask(catalog, job.cut))
    result = TileResult(
        tile=tile_id,
        write_id=str(tile.attrs.get("write_id") or ""),
        n_sources=len(catalog["id"]),
        n_selected=int(selected.size),
    )
    blocks = _score_pipelined(tile, wcs, catalog, selected, model, job, stage, result)
    rows = _concat(blocks) if blocks else _empty_rows(catalog, job.cut, model.meta.n_members)
    rows = rows.append_column("overlap_zone", pa.array(_in_overlap_zone(tile, rows, job)))
    with stage("write"):
        _write_part(rows, tile_id, result.write_id, job)
    keep = pc.or_(pc.greater_equal(rows["score"], job.reduce_floor), rows["overlap_zone"])
    result.reduce_rows = rows.filter(keep)
    result.n_scored = rows.num_rows
    result.n_edge = int(np.count_nonzero(rows["edge"].to_numpy(zero_copy_only=False)))
    result.stage_seconds = stage.seconds
    result.seconds = time.perf_counter() - t_start
    return result


def _check_tile(tile: Tile, bands: tuple[str, ...]) -> None:
    missing = [b for b in bands if b not in tile.bands]
    if missing:
        raise ValueError(f"tile has bands {list(tile.bands)}; the model needs {missing} too")
    if not tile.attrs.get("wcs_header"):
        raise ValueError("tile has no WCS header")


def _block_size(job: TileJob) -> int:
    """Stamps per pipelined block: the forward batch, within [MIN_BLOCK, SOURCE_BLOCK]."""
    return int(min(max(job.batch_size, MIN_BLOCK), SOURCE_BLOCK))


def _score_pipelined(tile, wcs, catalog, selected, model, job, stage, result) -> list[dict]:
    """Score the selected sources block by block, preparing block k + 1 during forward k.

    Blocks follow the sources' position on the tile (so each block touches few chunks); the
    rows come back in catalogue order. A background thread reads, masks and normalises the
    next block while this thread runs the model (both release the GIL), so reading overlaps
    the forward pass; scores are those of one plain pass over the same stamps.
    """
    if selected.size == 0:
        return []
    with stage("wcs"):
        ra = np.asarray(catalog["ra"], dtype=np.float64)[selected]
        dec = np.asarray(catalog["dec"], dtype=np.float64)[selected]
        # Stamps are centred on the WCS position of the source, not on stored pixel columns.
        x, y = (np.asarray(v, dtype=np.float64) for v in wcs.world_to_pixel_values(ra, dec))
    ok = np.isfinite(x) & np.isfinite(y)
    _record_failures(
        result,
        catalog,
        selected[~ok],
        "wcs",
        "NonFiniteSkyPosition",
        "no finite pixel position from the WCS for this ra, dec",
    )
    where = np.flatnonzero(ok)
    where = where[np.lexsort((x[where], y[where]))]  # along the tile, row of chunks by row
    size = _block_size(job)
    spans = [where[k : k + size] for k in range(0, where.size, size)]

    def prepare(span: np.ndarray) -> tuple | None:
        return _prepare_block(
            tile,
            catalog,
            selected[span],
            ra[span],
            dec[span],
            x[span],
            y[span],
            model,
            stage,
            result,
        )

    blocks, order = [], []
    for prepared in _prefetched(spans, prepare, depth=_reader_threads(model.device)):
        if prepared is None:
            continue
        idx, ra_b, dec_b, x_b, y_b, edge, normalised, masked = prepared
        with stage("score"):
            normalised = _to_model_device(normalised, model.device)
            scores = model.score(normalised, batch_size=job.batch_size, dihedral=job.dihedral)
            scores = scores.cpu().numpy()
        blocks.append(
            _rows(tile.id, catalog, idx, ra_b, dec_b, x_b, y_b, edge, scores, job.cut, masked)
        )
        order.append(idx)
    if not blocks:
        return []
    back = np.argsort(np.concatenate(order), kind="stable")  # rows in catalogue order
    return [{k: np.concatenate([b[k] for b in blocks])[back] for k in blocks[0]}]


def _reader_threads(device: torch.device) -> int:
    """Blocks prepared ahead of the forward pass, each on its own thread.

    One on CPU: a single-threaded worker's forward already keeps its core busy, and more
    readers would only steal it. On a GPU worker, one per core the worker may use (at most 8),
    so that reading, decoding and normalising keep the GPU fed.
    """
    if device.type == "cpu":
        return 1
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))


def _to_model_device(normalised: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Stamps on the model's device: from pinned memory without blocking on a GPU."""
    if device.type == "cpu":
        return normalised
    moved = normalised.to(device, non_blocking=normalised.is_pinned())
    return moved.contiguous(memory_format=torch.channels_last)


def _prefetched(items: list, prepare, depth: int = 1) -> Iterator:
    """``prepare(item)`` for each item in order, ``depth`` items ahead on ``depth`` threads.

    While the caller works on item k, items k + 1 ... k + depth are being prepared. An
    exception raised by ``prepare`` reaches the caller at the item that raised it.
    """
    if not items:
        return
    with ThreadPoolExecutor(max_workers=depth, thread_name_prefix="lenscan-prefetch") as pool:
        ahead = deque(pool.submit(prepare, item) for item in items[:depth])
        following = iter(items[depth:])
        while ahead:
            current = ahead.popleft().result()
            item = next(following, None)
            if item is not None:
                ahead.append(pool.submit(prepare, item))
            yield current


def _prepare_block(tile, catalog, idx, ra, dec, x, y, model, stage, result) -> tuple | None:
    """Read, mask and normalise one block; sources with no finite pixel are recorded, dropped."""
    meta = model.meta
    with stage("read"):
        stamps, edge, masked = read_model_stamps(tile, x, y, meta.stamp_size_pix, bands=meta.bands)
    ok = np.isfinite(stamps).any(axis=(1, 2, 3))
    _record_failures(
        result,
        catalog,
        idx[~ok],
        "read",
        "NoFinitePixels",
        "the stamp holds no finite pixel (masked, blank or missing data)",
    )
    if not ok.all():
        idx, ra, dec, x, y, edge, stamps, masked = (
            a[ok] for a in (idx, ra, dec, x, y, edge, stamps, masked)
        )
    if idx.size == 0:
        return None
    with stage("normalise"):
        normalised = normalise_stamps(torch.from_numpy(stamps), meta.normalisation)
        normalised = normalised.contiguous(memory_format=torch.channels_last)
        if model.device.type == "cuda":  # a pinned staging copy, made on this reader thread
            normalised = normalised.pin_memory()
    return idx, ra, dec, x, y, edge, normalised, masked


def _record_failures(result, catalog, idx, stage: str, error_type: str, message: str) -> None:
    ids = np.asarray(catalog["id"], dtype=np.int64)[idx]
    result.source_failures.extend(
        {
            "tile": result.tile,
            "id": int(i),
            "stage": stage,
            "error_type": error_type,
            "message": safe_text(message),
        }
        for i in ids
    )


def _photometry_columns(catalog: Mapping[str, np.ndarray]) -> list[str]:
    return [c for c in catalog if c.startswith(("mag_", "magerr_"))]


def _rows(tile_id, catalog, idx, ra, dec, x, y, edge, scores, cut, masked) -> dict[str, np.ndarray]:
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
        a, b = parse_colour(colour)
        row[f"colour_{a}_{b}"] = (row[f"mag_{a}"] - row[f"mag_{b}"]).astype(np.float32)
    for col, dtype in (("flags", np.int32), ("extended_class", np.int16)):
        if col in catalog:
            row[col] = np.asarray(catalog[col], dtype=dtype)[idx]
    row["edge"] = np.asarray(edge, dtype=bool)
    row["masked_fraction"] = np.asarray(masked, dtype=np.float32)
    for k in range(scores.shape[1]):
        row[f"score_m{k}"] = scores[:, k].astype(np.float32)
    row["score"] = scores.mean(axis=1).astype(np.float32)
    return row


def _empty_rows(catalog, cut: ColourCut, n_members: int) -> pa.Table:
    """A part with the full schema and no rows: an empty tile is still committed as done."""
    none = np.zeros(0, dtype=np.int64)
    zeros = np.zeros(0)
    row = _rows(
        "",
        catalog,
        none,
        zeros,
        zeros,
        zeros,
        zeros,
        np.zeros(0, bool),
        np.zeros((0, n_members), np.float32),
        cut,
        np.zeros(0, np.float32),
    )
    return _concat([row])


def _concat(blocks: list[dict[str, np.ndarray]]) -> pa.Table:
    merged = {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}
    merged["tile"] = merged["tile"].astype(str)
    return pa.table(merged)


def _in_overlap_zone(tile: Tile, rows: pa.Table, job: TileJob) -> np.ndarray:
    """True for rows close enough to the tile edge to lie in a neighbouring tile too."""
    margin = job.overlap_margin_arcsec / tile.pixel_scale_arcsec
    ny, nx = tile.shape_yx
    x = rows["x"].to_numpy()
    y = rows["y"].to_numpy()
    # Pixel centres run from 0 to n - 1; the tile's outer boundary is half a pixel beyond.
    to_edge = np.minimum.reduce([x + 0.5, nx - 0.5 - x, y + 0.5, ny - 0.5 - y])
    return to_edge < margin


def _write_part(rows: pa.Table, tile_id: str, write_id: str, job: TileJob) -> None:
    meta = {"tile": tile_id, "tile_write_id": write_id, "run_token": job.run_token}
    table = rows.replace_schema_metadata({"lenscan_part": json.dumps(meta)})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write_bytes(
        part_url(job.scored_url, tile_id), buf.getvalue(), storage_options=job.out_storage_options
    )
