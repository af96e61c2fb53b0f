"""The ingest graph: discover tile files, plan one task per tile, run the tasks, summarise.

The graph is one Dask task per tile (:func:`lenscan.survey.ingest.tile_task.ingest_tile`).
Tiles already complete in the store are skipped, so ingest can be rerun after an interruption.
A problem with one tile's input fails that tile only, with a message naming the file; the
summary lists the failures.
"""

from __future__ import annotations

import os
import posixpath
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np

from lenscan.survey.ingest.catalog import (
    TileInputError,
    catalog_header_value,
    catalog_tile_ids,
    glob_catalogs,
    is_parquet,
    needed_catalog_columns,
    read_catalog_file,
)
from lenscan.survey.ingest.presets import IngestPreset, load_ingest_preset
from lenscan.survey.ingest.tile_task import TileJob, TileResult, ingest_tile
from lenscan.survey.store import SurveyStore, create_survey, open_survey, validate_tile_id

__all__ = ["IngestSummary", "discover_tiles", "ingest"]


@dataclass
class IngestSummary:
    """Outcome of :func:`ingest`.

    Attributes
    ----------
    out : str
        The store URL.
    ingested : list of str
        Tiles written by this run.
    skipped : list of str
        Tiles already complete in the store (not read again).
    failed : dict
        Tile -> message (the message names the file at fault).
    dropped_outside : dict
        Tile -> number of catalogue rows with a position outside the tile, dropped.
    dropped_no_coords : dict
        Tile -> number of catalogue rows without finite RA/Dec, dropped (tiles with any).
    n_sources : dict
        Tile -> number of catalogue rows written.
    bytes_read : int
        Bytes of FITS image files read (their size on storage).
    seconds : float
        Wall-clock time of the run.
    survey_tiles : dict
        Tile id -> the tile in the survey's own words, where they differ (HSC tile
        ``9813-4.4`` is tract 9813 patch ``4,4``: ``9813-4,4``).
    """

    out: str
    ingested: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    dropped_outside: dict[str, int] = field(default_factory=dict)
    dropped_no_coords: dict[str, int] = field(default_factory=dict)
    n_sources: dict[str, int] = field(default_factory=dict)
    bytes_read: int = 0
    seconds: float = 0.0
    survey_tiles: dict[str, str] = field(default_factory=dict)

    def _named(self, tile: str) -> str:
        words = self.survey_tiles.get(tile, tile)
        return tile if words == tile else f"{tile} ({words})"

    def add(self, result: TileResult) -> None:
        """Record one tile task's result."""
        self.bytes_read += result.bytes_read
        if result.ok:
            self.ingested.append(result.tile)
            self.n_sources[result.tile] = result.n_sources
            self.dropped_outside[result.tile] = result.dropped
            if result.no_coords:
                self.dropped_no_coords[result.tile] = result.no_coords
        else:
            self.failed[result.tile] = result.message

    @property
    def ok(self) -> bool:
        """True when no tile failed."""
        return not self.failed

    def __str__(self) -> str:
        mb = self.bytes_read / 1e6
        rate = mb / self.seconds if self.seconds > 0 else float("nan")
        lines = [
            f"ingest into {self.out}: {len(self.ingested)} tile(s) ingested, "
            f"{len(self.skipped)} skipped (already complete), {len(self.failed)} failed; "
            f"{sum(self.n_sources.values())} sources kept, "
            f"{sum(self.dropped_outside.values())} dropped outside their tile; "
            f"{mb:.1f} MB of FITS read in {self.seconds:.1f} s ({rate:.1f} MB/s)"
        ]
        if self.dropped_no_coords:
            tiles = sorted(self.dropped_no_coords)
            shown = ", ".join(tiles[:5]) + (" ..." if len(tiles) > 5 else "")
            lines.append(
                f"  {sum(self.dropped_no_coords.values())} catalogue rows without a valid RA/Dec "
                f"(NaN or infinite) were dropped, in tile(s) {shown}: fix their coordinates in "
                "the catalogue to keep them"
            )
        lines += [
            f"  FAILED {self._named(tile)}: {msg}" for tile, msg in sorted(self.failed.items())
        ]
        return "\n".join(lines)


def _band_tokens(preset: IngestPreset, bands: Sequence[str]) -> dict[str, str]:
    """File-name token -> band, the aliases (HSC ``R2``, ``I2``) included."""
    out = {}
    for b in bands:
        for token in (preset.band_tokens[b], *preset.band_aliases.get(b, ())):
            out[token] = b
    return out


def _pattern_regex(pattern: str, preset: IngestPreset, bands: Sequence[str]) -> re.Pattern[str]:
    """A file-name pattern ({tilename}, {tract}, {patch}, {band}, *) as a regular expression."""
    parts = re.split(r"(\{tilename\}|\{tract\}|\{patch\}|\{band\}|\*)", pattern)
    tokens = sorted(_band_tokens(preset, bands), key=len, reverse=True)
    fields = {
        "{tilename}": f"(?P<tilename>{preset.tilename_regex})",
        "{tract}": f"(?P<tract>{preset.tract_regex})",
        "{patch}": f"(?P<patch>{preset.patch_regex})",
        "{band}": "(?P<band>" + "|".join(re.escape(t) for t in tokens) + ")",
        "*": ".*",
    }
    return re.compile("^" + "".join(fields.get(part, re.escape(part)) for part in parts) + "$")


def _match_tile(m: re.Match[str], preset: IngestPreset) -> str:
    groups = m.groupdict()
    if groups.get("tilename") is not None:
        return groups["tilename"]
    return preset.tile_id(groups["tract"], groups["patch"])


def discover_tiles(
    source: str,
    preset: IngestPreset,
    *,
    bands: Sequence[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, str]]:
    """List the tile files under ``source`` and group them by tile.

    Parameters
    ----------
    source : str
        Folder or fsspec URL, searched recursively.
    preset : IngestPreset
        File-name patterns and band tokens.
    bands : sequence of str, optional
        Bands to look for (default: all the preset's bands).
    storage_options : mapping, optional
        fsspec options for ``source``.

    Returns
    -------
    dict
        Tile id -> {band: file URL}, sorted by tile id (with ``"<band>:<plane>"`` keys for
        the plane files of presets with ``plane_patterns``). A tile/band matched by several
        patterns keeps the first pattern's file (``.fits.fz`` before ``.fits`` for DES). Tiles
        named by tract and patch get the id ``<tract>-<patch>`` (HSC ``9813-4,4`` ->
        ``9813-4.4``; ``IngestPreset.survey_tile`` gives the survey's name back).
    """
    use = list(preset.bands if bands is None else bands)
    fs, root = fsspec.core.url_to_fs(source, **dict(storage_options or {}))
    if not fs.exists(root):
        raise FileNotFoundError(f"ingest source {source} does not exist")
    if not fs.isdir(root):
        raise NotADirectoryError(f"ingest source {source} is not a folder")
    token_to_band = _band_tokens(preset, use)
    # Band files first, then the per-plane files of layouts that have them (Euclid RMS, FLAG).
    regexes: list[tuple[str | None, re.Pattern[str]]] = [
        (None, _pattern_regex(p, preset, use)) for p in preset.file_patterns
    ]
    regexes += [
        (plane, _pattern_regex(p, preset, use))
        for plane, patterns in preset.plane_patterns.items()
        for p in patterns
    ]
    found: dict[str, dict[str, tuple[int, str]]] = {}
    for path in sorted(fs.find(root)):
        name = posixpath.basename(path)
        for rank, (plane, rx) in enumerate(regexes):
            m = rx.match(name)
            if m is None:
                continue
            band = token_to_band[m.group("band")]
            key = band if plane is None else preset.plane_key(band, plane)
            slot = found.setdefault(_match_tile(m, preset), {})
            if key not in slot or rank < slot[key][0]:
                slot[key] = (rank, fs.unstrip_protocol(path))
            break
    return {t: {b: v[1] for b, v in sorted(found[t].items())} for t in sorted(found)}


def _infer_bands(preset: IngestPreset, tiles: Mapping[str, Mapping[str, str]]) -> tuple[str, ...]:
    present = {b for files in tiles.values() for b in files}
    return tuple(b for b in preset.bands if b in present)


def _protocol(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def ingest(  # long-function: numpydoc of 15 parameters; the body is its 6 steps
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    preset: str | IngestPreset = "des-dr2",
    catalog: str | os.PathLike[str] | None = None,
    client: Any = None,
    storage_options: Mapping[str, Any] | None = None,
    source_storage_options: Mapping[str, Any] | None = None,
    tiles: Sequence[str] | None = None,
    bands: Sequence[str] | None = None,
    expected_shape_yx: tuple[int, int] | str | None = "preset",
    chunk_pix: int = 128,
    shard_pix: int | None = 2048,
    n_workers: int | None = None,
    quantise: str | None = "source",
) -> IngestSummary:
    """Convert coadd FITS tiles and their catalogue into a lenscan survey store.

    Parameters
    ----------
    source : str or path
        Folder or fsspec URL holding the tile files (searched recursively).
    out : str or path
        Store URL; created if absent, otherwise opened to add tiles (its bands must match).
    preset : str or IngestPreset
        Ingest preset name (``"des-dr2"``), YAML path, or a loaded preset.
    catalog : str or path
        The object catalogue (FITS or Parquet): one file for all tiles, rows grouped by the
        preset's tile column (``TILENAME``), or a template with ``{tilename}`` for one file per
        tile (e.g. ``"cats/{tilename}_cat.parquet"``). Required.
    client : distributed.Client, "sync" or None
        Where to run the one-task-per-tile graph. None starts a ``LocalCluster`` (worker
        processes with one thread each; threads in this process if ``source`` or ``out`` is
        ``memory://``, which only exists inside one process). ``"sync"`` runs the tasks one
        after the other in this process.
    storage_options, source_storage_options : mapping, optional
        fsspec options for ``out`` and for ``source`` / ``catalog``.
    tiles : sequence of str, optional
        Only these tile names.
    bands : sequence of str, optional
        Bands to ingest, in store order. Default: the store's bands if it exists, else the
        preset's bands that occur among the files found.
    expected_shape_yx : tuple, None or "preset"
        Image shape every band must have. ``"preset"`` (default) uses the preset's
        ``image.shape_yx`` (10000 x 10000 for DES DR2); None accepts any shape.
    chunk_pix, shard_pix : int
        Chunking of the store's planes (see ``SurveyStore.write_tile``); pixels are read from
        the FITS files and written in blocks of ``shard_pix`` rows, never a whole tile at once.
        128 px chunks in 2048 px shards: ``benchmarks/RESULTS.md`` (targets 2, 3 and 7).
    n_workers : int, optional
        Workers of the LocalCluster started when ``client`` is None (default: one per CPU,
        at most one per tile).
    quantise : {"source", None}
        ``"source"`` (default): a tile whose science HDUs fpack stored quantised (lossy, as
        DES does) is stored quantised too, with a power-of-two step no larger than the finest
        source step (every pixel within half a source step of the FITS values; see
        ``docs/survey-format.md``); lossless sources stay lossless. None: always lossless.

    Returns
    -------
    IngestSummary
        Tiles ingested, skipped (already complete) and failed (with messages naming files),
        sources dropped outside their tile, bytes read and time taken.

    Examples
    --------
    >>> summary = ingest("s3://bucket/des/tiles", "s3://bucket/lenscan/des.zarr",
    ...                  catalog="s3://bucket/des/dr2_main.parquet")  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    source, out = os.fspath(source), os.fspath(out)
    p = preset if isinstance(preset, IngestPreset) else load_ingest_preset(preset)
    catalog = _check_ingest_args(p, catalog, bands, quantise)
    shape = _expected_shape(p, expected_shape_yx)
    src_opts = dict(source_storage_options or {})
    store, found = _store_and_tiles(source, out, p, storage_options, src_opts, tiles, bands)
    summary = IngestSummary(out=out)
    summary.survey_tiles = {t: p.survey_tile(t) for t in found if p.survey_tile(t) != t}
    per_tile_rows, catalog_error = _catalog_by_tile(catalog, p, store.bands, src_opts)
    assigned = per_tile_rows is not None and bool(p.catalog_tile_keyword)
    job = TileJob(
        tile="",
        files={},
        bands=store.bands,
        preset=p,
        expected_shape_yx=shape,
        out=out,
        storage_options=dict(storage_options) if storage_options else None,
        source_storage_options=src_opts or None,
        catalog_file=catalog,
        catalog_rows=None,
        chunk_pix=chunk_pix,
        shard_pix=shard_pix,
        quantise=quantise,
        catalog_assigned=assigned,
    )
    jobs = _plan_jobs(job, found, store, summary, per_tile_rows, catalog_error)
    for res in _run_jobs(jobs, client=client, n_workers=n_workers, source=source, out=out):
        summary.add(res)
    summary.ingested.sort()
    if summary.ingested:
        open_survey(out, storage_options, mode="a").consolidate_index()
    summary.seconds = time.perf_counter() - t0
    return summary


def _check_ingest_args(
    p: IngestPreset, catalog: Any, bands: Sequence[str] | None, quantise: Any
) -> str:
    """Validate the catalogue, bands and quantise arguments; return the catalogue path."""
    if catalog is None:
        raise ValueError(
            "ingest needs a catalogue: pass catalog= (a FITS or Parquet file with "
            f"{_tile_columns(p)}, or a '{{tilename}}' template for one file per tile)"
        )
    if bands is not None:
        unknown = [b for b in bands if b not in p.bands]
        if unknown:
            raise ValueError(f"bands {unknown} are not in ingest preset {p.name!r} ({p.bands})")
    if quantise not in ("source", None):
        raise ValueError(f"ingest quantise must be 'source' or None, got {quantise!r}")
    return os.fspath(catalog)


def _tile_columns(p: IngestPreset) -> str:
    if p.uses_tract_patch:
        return f"{p.catalog_tract_column} and {p.catalog_patch_column} columns"
    return f"a {p.catalog_tile_column} column"


def _expected_shape(p: IngestPreset, expected: Any) -> tuple[int, int] | None:
    if isinstance(expected, str):
        if expected != "preset":
            raise ValueError(
                f"expected_shape_yx must be (ny, nx), None or 'preset', got {expected!r}"
            )
        return p.shape_yx
    return None if expected is None else (int(expected[0]), int(expected[1]))


def _store_and_tiles(
    source: str,
    out: str,
    p: IngestPreset,
    storage_options: Mapping[str, Any] | None,
    src_opts: dict[str, Any],
    tiles: Sequence[str] | None,
    bands: Sequence[str] | None,
) -> tuple[SurveyStore, dict[str, dict[str, str]]]:
    """Open (or create) the store and find the tiles' files. An existing store fixes the bands."""
    store: SurveyStore | None
    try:
        store = open_survey(out, storage_options, mode="a")
    except ValueError:
        store = None
    if store is not None and bands is not None and tuple(bands) != store.bands:
        raise ValueError(f"store {out} has bands {store.bands}, but bands={tuple(bands)} was asked")
    found = discover_tiles(
        source, p, bands=store.bands if store is not None else bands, storage_options=src_opts
    )
    if tiles is not None:
        wanted = [str(t) for t in tiles]
        absent = [t for t in wanted if t not in found]
        found = {t: found.get(t, {}) for t in wanted}
        if absent and len(absent) == len(wanted):
            raise FileNotFoundError(f"none of tiles {absent} has files in {source}")
    if not found:
        raise FileNotFoundError(
            f"no tile files matching {list(p.file_patterns)} under {source} (preset {p.name!r})"
        )
    if store is None:
        use_bands = tuple(bands or _infer_bands(p, found))
        try:
            store = create_survey(
                out,
                name=p.survey_name,
                bands=use_bands,
                storage_options=storage_options,
                survey=p.survey,
                info=_store_info(p),
            )
        except FileExistsError:
            # Another process created it meanwhile, or it is something else: let open decide.
            store = open_survey(out, storage_options, mode="a")
    return store, found


def _store_info(p: IngestPreset) -> dict[str, Any]:
    """What a new store records of its ingest preset (the scan reads ``scan_defaults``)."""
    scan = {"model": p.scan_model, "colour_cut": p.scan_colour_cut}
    return {
        "ingest_preset": p.name,
        "file_format": p.format,
        "scan_defaults": {k: v for k, v in scan.items() if v},
    }


def _catalog_by_keyword(
    catalog: str, p: IngestPreset, bands: Sequence[str], src_opts: dict[str, Any]
) -> tuple[dict[str, dict[str, np.ndarray]] | None, str | None]:
    """Per-tile FITS catalogues (a file, or a ``*`` pattern of files) assigned to their tiles
    by the header keyword naming the tile (Euclid ``TILEID``); (None, None) for a catalogue
    without it (one spanning tiles: each task keeps its tile's inner footprint)."""
    try:
        paths = glob_catalogs(catalog, src_opts) if "*" in catalog else [catalog]
        keyword = p.catalog_tile_keyword
        assert keyword is not None
        tiles = [catalog_header_value(path, keyword, src_opts) for path in paths]
        if all(t is None for t in tiles) and len(paths) == 1:
            return None, None
        lacking = [path for path, t in zip(paths, tiles, strict=True) if t is None]
        if lacking:
            return None, f"catalogue {lacking[0]}: no {keyword} header naming its tile"
        needed = needed_catalog_columns(p, bands)
        out = {str(t): read_catalog_file(path, needed, storage_options=src_opts)
               for path, t in zip(paths, tiles, strict=True)}  # fmt: skip
    except TileInputError as err:
        return None, str(err)
    return out, None


def _catalog_by_tile(
    catalog: str, p: IngestPreset, bands: Sequence[str], src_opts: dict[str, Any]
) -> tuple[dict[str, dict[str, np.ndarray]] | None, str | None]:
    """A single FITS catalogue, read once here and split by tile (or the error reading it).

    Parquet files and per-tile files are read by the tasks (Parquet with a row filter on the
    tile column): (None, None).
    """
    if "{tilename}" in catalog or is_parquet(catalog):
        return None, None
    if p.catalog_tile_keyword and not (p.catalog_tile_column or p.uses_tract_patch):
        return _catalog_by_keyword(catalog, p, bands, src_opts)
    try:
        rows = read_catalog_file(
            catalog,
            needed_catalog_columns(p, bands),
            tile_column=p.catalog_tile_column,
            storage_options=src_opts,
        )
        tile_col = catalog_tile_ids(rows, p)
    except TileInputError as err:
        return None, str(err)
    except (TypeError, ValueError) as err:
        return None, f"catalogue {catalog}: tile / tract / patch columns unreadable ({err})"
    order = np.argsort(tile_col, kind="stable")
    names, starts = np.unique(tile_col[order], return_index=True)
    bounds = [*starts[1:], len(order)]
    per_tile = {
        str(nm): {c: v[order[a:b]] for c, v in rows.items()}
        for nm, a, b in zip(names, starts, bounds, strict=True)
    }
    return per_tile, None


def _plan_jobs(
    template: TileJob,
    found: Mapping[str, Mapping[str, str]],
    store: SurveyStore,
    summary: IngestSummary,
    per_tile_rows: Mapping[str, dict[str, np.ndarray]] | None,
    catalog_error: str | None,
) -> list[TileJob]:
    """One job per tile to ingest; invalid, complete and uncatalogued tiles go to ``summary``."""
    from dataclasses import replace

    needed = needed_catalog_columns(template.preset, template.bands)
    jobs = []
    for tile, files in found.items():
        try:
            validate_tile_id(tile)
        except ValueError as err:
            summary.failed[tile] = str(err)
            continue
        if store.has_tile(tile):
            summary.skipped.append(tile)
            continue
        if catalog_error is not None:
            summary.failed[tile] = catalog_error
            continue
        rows_here = None
        if per_tile_rows is not None:
            rows_here = per_tile_rows.get(tile)
            if rows_here is None:  # no catalogue rows for this tile: an empty catalogue
                rows_here = {c: np.zeros(0, dtype=np.float64) for c in needed}
                rows_here[template.preset.catalog_columns["id"]] = np.zeros(0, dtype=np.int64)
        jobs.append(replace(template, tile=tile, files=dict(files), catalog_rows=rows_here))
    return jobs


def _run_jobs(
    jobs: list[TileJob], *, client: Any, n_workers: int | None, source: str, out: str
) -> list[TileResult]:
    if not jobs:
        return []
    if isinstance(client, str):
        if client != "sync":
            raise ValueError(f"client must be a distributed.Client, 'sync' or None, got {client!r}")
        return [ingest_tile(job) for job in jobs]
    from distributed import Client, LocalCluster, as_completed

    own = None
    if client is None:
        in_process = "memory" in (_protocol(source), _protocol(out))
        workers = n_workers or max(1, min(len(jobs), os.cpu_count() or 1))
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=not in_process,
            dashboard_address=":0",
        )
        own = (cluster, Client(cluster))
        client = own[1]
    try:
        futures = {
            client.submit(
                ingest_tile, job, pure=False, key=f"ingest-{job.tile}-{os.urandom(4).hex()}"
            ): job
            for job in jobs
        }
        results = []
        for fut in as_completed(futures):
            job = futures[fut]
            try:
                results.append(fut.result())
            except Exception as err:  # e.g. the worker died (out of memory)
                results.append(
                    TileResult(job.tile, False, f"task failed: {type(err).__name__}: {err}")
                )
        return results
    finally:
        if own is not None:
            own[1].close()
            own[0].close()
