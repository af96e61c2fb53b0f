"""Planning a scan: which tiles, what is already done, and the run's identity.

Everything here runs on the client before any task is submitted, and costs a few reads however
large the survey: the tile list and write ids come from the store's tile index, what is done from
the output's ledger and one fresh listing of its parts.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import posixpath
import re
import uuid
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lenscan._io import (
    absolute_url,
    atomic_write_bytes,
    check_output_folder,
    clean_orphans,
    list_fresh,
)
from lenscan._secrets import safe_url, scrub, withheld_options
from lenscan._version import __version__
from lenscan.config import ScanConfig
from lenscan.models import (
    DEFAULT_MODEL,
    ModelMeta,
    check_compatible,
    list_bundled_models,
    read_model_meta,
    resolve_model_files,
)
from lenscan.select import COLOUR_CUTS, get_colour_cut
from lenscan.survey import SurveyStore, open_survey
from lenscan.survey.ingest.presets import survey_scan_defaults
from lenscan.survey.remote import remote_filesystem, storage_errors
from lenscan.survey_defaults import SURVEY_MODELS, default_cut_for_survey, survey_family
from lenscan.sweep.columns import TileColumn, TileIds, TileSet
from lenscan.sweep.ledger import LedgerState, load_ledger
from lenscan.sweep.worker import ModelPayload, TileJob

__all__ = [
    "ScanPlan",
    "committed_part_tiles",
    "committed_parts",
    "plan_scan",
    "prepare_output",
    "survey_defaults",
    "task_key",
    "write_run_record",
]

#: Provenance keys that must match for a run to resume another's output.
_RESUME_KEYS = (
    "survey_uuid",
    "model_sha256",
    "colour_cut",
    "stamp_size_pix",
    "dihedral_average",
    "precision",
)
_PART_NAME = re.compile(r"tile-(.+)\.parquet")
#: The same name as the last component of a listed path, for Arrow's (RE2) regex kernels.
_PART_NAME_RE2 = r"(?:^|/)tile-(?P<tile>[^/\n]+)\.parquet$"


@dataclass
class ScanPlan:
    """A scan ready to run: its settings, its tiles, and what is already done.

    The per-tile state is Arrow columns (:attr:`index`, :attr:`done`), read through views
    (:attr:`tiles`, :attr:`write_ids`, :attr:`n_sources`, :attr:`survey_tiles`): planning a
    sweep of 10^5-10^6 tiles holds no Python object per tile.
    """

    config: ScanConfig
    survey: SurveyStore
    meta: ModelMeta
    payload: ModelPayload
    threshold: float
    #: The scan's tiles, sorted by id: ``tile``, ``write_id``, ``n_sources`` (0 where unknown)
    #: and ``survey_tile`` (the survey's own name; null where it is the id).
    index: pa.Table
    run_token: str
    out_fs: fsspec.AbstractFileSystem
    out_path: str
    #: Tiles committed by an earlier run (ledger record with the current write id, and part).
    done: TileSet = field(default_factory=TileSet)
    provenance: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def tiles(self) -> TileIds:
        """The scan's tile ids, sorted (a sequence of ``str``)."""
        return TileIds(self.index["tile"], is_sorted=True)

    @cached_property
    def write_ids(self) -> TileColumn[str]:
        """Tile id -> the write id of the tile as the store holds it now."""
        return TileColumn(self.tiles, self.index["write_id"])

    @cached_property
    def n_sources(self) -> TileColumn[int]:
        """Tile id -> its catalogue's source count."""
        return TileColumn(self.tiles, self.index["n_sources"])

    @cached_property
    def survey_tiles(self) -> TileColumn[str]:
        """Tile id -> the survey's own name, for the tiles where they differ (HSC ``9813-4.4``
        is ``9813-4,4``)."""
        renamed = self.index.filter(pc.is_valid(self.index["survey_tile"]))
        return TileColumn(TileIds(renamed["tile"], is_sorted=True), renamed["survey_tile"])

    @property
    def todo(self) -> TileIds:
        """Tiles to score in this run, the most sources first (then in survey order).

        Largest first keeps the sweep's tail short: the last tasks to finish are the small
        tiles, so no worker waits long on one big tile while the others idle.
        """
        left = self.index.filter(pc.invert(pc.is_in(self.index["tile"], self.done.arrow)))
        order = np.argsort(-left["n_sources"].to_numpy(), kind="stable")
        return TileIds(left["tile"].take(pa.array(order, pa.int64())))

    @property
    def scored_path(self) -> str:
        return posixpath.join(self.out_path, "scored")

    def url(self, *parts: str) -> str:
        """Full URL of a path under the output folder."""
        return self.out_fs.unstrip_protocol(posixpath.join(self.out_path, *parts))

    def job(self) -> TileJob:
        """The settings every tile task of this run shares."""
        c = self.config
        return TileJob(
            survey_url=c.survey_url,
            storage_options=dict(c.storage_options),
            cut=get_colour_cut(c.colour_cut),
            payload_sha256=self.payload.sha256,
            device=c.device,
            batch_size=c.batch_size,
            scored_url=self.url("scored"),
            out_storage_options=dict(c.out_storage_options),
            run_token=self.run_token,
            reduce_floor=self.threshold,
            overlap_margin_arcsec=c.overlap_margin_arcsec,
            dihedral=c.dihedral_average,
            precision=c.precision,
            compile=c.compile_model,
        )


def task_key(run_token: str, tile_id: str) -> str:
    """Dask key of a tile task: unique per run, readable on the dashboard."""
    return f"lenscan-score-{run_token}-{tile_id}"


def plan_scan(config: ScanConfig) -> ScanPlan:
    """Check the scan's inputs and work out which tiles it has to score.

    Planning only reads; :func:`prepare_output` clears the output folder, under the lease.

    Raises
    ------
    ValueError
        Naming the input: a cut or model the survey cannot serve, unknown tiles, or an output
        folder holding another scan (another survey, model, cut or stamp size).
    """
    check_output_folder(config.out, storage_options=config.out_storage_options)
    survey = open_survey(config.survey_url, storage_options=config.storage_options)
    config = survey_defaults(config, survey)
    model_ref = DEFAULT_MODEL if config.model == "default" else config.model
    payload = ModelPayload.from_model(model_ref)
    meta = read_model_meta(model_ref)
    index, scale = _read_index(config, survey)
    _check_survey_serves(config, survey, meta, scale, TileIds(index["tile"]))
    threshold = _scan_threshold(config, meta)
    out_fs, out_path = remote_filesystem(config.out, config.out_storage_options)
    plan = ScanPlan(
        config=config,
        survey=survey,
        meta=meta,
        payload=payload,
        threshold=threshold,
        index=index,
        run_token=_run_token(),
        out_fs=out_fs,
        out_path=out_path,
    )
    plan.provenance = _provenance(plan)
    with storage_errors(config.out):  # the first reads of the output folder
        _read_output(plan)
    return plan


def _scan_threshold(config: ScanConfig, meta: ModelMeta) -> float:
    """The scan's candidate threshold: given; from a false rate; 0 for a bare ``top``; else the
    model's recommended one."""
    if config.threshold is not None:
        return config.threshold
    if config.false_rate is not None:
        return meta.threshold_for_false_rate(config.false_rate)
    if config.top is not None:
        return 0.0
    return meta.recommended_threshold


def _read_output(plan: ScanPlan) -> None:
    """What the output folder already holds: the tiles a resumed run skips (reads only)."""
    out_fs, out_path = plan.out_fs, plan.out_path
    if plan.config.resume:
        _check_resume(plan)
        state = load_ledger(out_fs, out_path, tiles=plan.tiles, rows=False)
        plan.done = _done_tiles(plan, state.current(plan.write_ids))


def prepare_output(plan: ScanPlan) -> None:
    """Clear what this run replaces under ``OUT``: only ever done holding its lease.

    Without ``resume`` the earlier ``scored/`` parts and ledger go; in any case the temporary
    files of interrupted writes (``.tmp-*``), which under the lease can only be a dead run's
    (or a stalled one's that lost the lease: :meth:`~lenscan._lease.Lease.writing` tells it).
    """
    fs, out = plan.out_fs, plan.out_path
    if not plan.config.resume:
        for sub in ("scored", "ledger"):
            if fs.exists(posixpath.join(out, sub)):
                fs.rm(posixpath.join(out, sub), recursive=True)
    for sub in ("scored", "ledger", ""):
        clean_orphans(fs, posixpath.join(out, sub) if sub else out)


def survey_defaults(config: ScanConfig, survey: SurveyStore) -> ScanConfig:
    """``config`` with the survey's own model and colour cut where it left them default.

    A store ingested from Rubin or HSC files records its survey and ingest preset, whose
    ``scan`` section names the model and cut (:func:`lenscan.survey.ingest.survey_scan_defaults`);
    DES stores and stores without that record keep the DES defaults.

    Raises
    ------
    ValueError
        One line naming the survey's model or cut that this lenscan does not have, and the
        flag (``--model``, ``--cut``) to pass instead.
    """
    defaults = survey_scan_defaults(survey.info) or _family_defaults(survey)
    changes: dict[str, Any] = {}
    missing: list[str] = []
    model = defaults.get("model")
    if config.model == "default" and model:
        if _model_exists(model):
            changes["model"] = model
        else:
            missing.append(f"model {model!r} (pass --model NAME_OR_CHECKPOINT)")
    cut = defaults.get("colour_cut")
    if config.colour_cut_is_default and cut:
        if cut in COLOUR_CUTS:
            changes["colour_cut"] = cut
        else:
            missing.append(f"colour cut {cut!r} (pass --cut NAME)")
    if missing:
        raise ValueError(
            f"survey {config.survey_url} is a {survey.survey or survey.name} store whose default "
            f"{' and '.join(missing)} this lenscan does not have; bands {list(survey.bands)}, "
            f"bundled models {list_bundled_models()}, cuts {sorted(COLOUR_CUTS)}"
        )
    return dataclasses.replace(config, **changes) if changes else config


def _family_defaults(survey: SurveyStore) -> dict[str, str]:
    """Stores without an ingest preset's record (``make_survey``'s ``synthetic-lsst``): the
    model and cut of the survey their name belongs to (:mod:`lenscan.survey_defaults`)."""
    family = survey_family(survey.survey or survey.name)
    if family is None or family not in SURVEY_MODELS:
        return {}  # DES and unknown surveys: the scan's DES defaults
    name = survey.survey or survey.name
    return {"model": SURVEY_MODELS[family], "colour_cut": default_cut_for_survey(name)}


def _model_exists(name_or_path: str) -> bool:
    """A bundled model, or the checkpoint files a preset YAML points to."""
    try:
        resolve_model_files(name_or_path)
    except (FileNotFoundError, ValueError):
        return False
    return True


#: The index columns a plan keeps, and their types.
_INDEX_SCHEMA = pa.schema(
    [
        ("tile", pa.string()),
        ("write_id", pa.string()),
        ("n_sources", pa.int64()),
        ("survey_tile", pa.string()),
    ]
)


def _read_index(config: ScanConfig, survey: SurveyStore) -> tuple[pa.Table, float | None]:
    """The scan's tiles as :attr:`ScanPlan.index` columns (sorted by id) and their pixel scale.

    Read as columns and kept as columns: planning a survey of 10^5-10^6 tiles holds their
    bytes, not a Python object per tile and field.
    """
    table = survey.tile_index_table(columns=[*_INDEX_SCHEMA.names, "pixel_scale_arcsec"])
    if table is None or table.num_rows == 0:
        _select_tiles(config, survey, pa.table({"tile": pa.array([], pa.string())}))
        return _INDEX_SCHEMA.empty_table(), None
    if not _is_sorted(table["tile"]):  # consolidated indexes are: no copy of 10^6 rows then
        table = table.sort_by("tile")
    table = _select_tiles(config, survey, table)
    tile = table["tile"].cast(pa.string())
    # Indexes consolidated before survey_tile existed lack that column: the id is the name.
    named = table["survey_tile"].cast(pa.string()) if "survey_tile" in table.column_names else None
    if named is None:
        named = pa.nulls(table.num_rows, pa.string())
    else:
        named = pc.if_else(pc.fill_null(pc.not_equal(named, tile), False), named, None)
    index = pa.table(
        [tile, table["write_id"].cast(pa.string()),
         pc.fill_null(table["n_sources"], 0).cast(pa.int64()), named],
        schema=_INDEX_SCHEMA,
    )  # fmt: skip
    scale = table["pixel_scale_arcsec"][0].as_py() if table.num_rows else None
    return index.combine_chunks(), scale


def _is_sorted(ids: pa.ChunkedArray) -> bool:
    """Strictly increasing (sorted, no duplicates)."""
    n = len(ids)
    return n < 2 or bool(pc.all(pc.less(ids.slice(0, n - 1), ids.slice(1))).as_py())


def _select_tiles(config: ScanConfig, survey: SurveyStore, table: pa.Table) -> pa.Table:
    if config.tiles is None:
        return table
    wanted = pa.array(list(config.tiles), pa.string())
    unknown = sorted(set(wanted.filter(pc.invert(pc.is_in(wanted, table["tile"]))).to_pylist()))
    if unknown:
        raise ValueError(f"tiles {unknown} are not complete tiles of {safe_url(config.survey_url)}")
    return table.filter(pc.is_in(table["tile"], wanted))


def _check_survey_serves(config, survey, meta, scale, tiles) -> None:
    missing = [b for b in config.colour_cut.bands if b not in survey.bands]
    if missing:
        raise ValueError(
            f"colour cut {config.colour_cut.name!r} needs bands {missing} that survey "
            f"{safe_url(config.survey_url)} does not have (bands: {list(survey.bands)})"
        )
    _check_cut_columns(config, survey, tiles)
    # Refuse a model that cannot read this survey before any work starts.
    try:
        check_compatible(meta, bands=survey.bands, pixel_scale_arcsec=scale)
    except ValueError as exc:
        raise ValueError(f"survey {safe_url(config.survey_url)}: {exc}") from exc


def _check_cut_columns(config, survey, tiles) -> None:
    """A cut's column conditions (Euclid's) need those catalogue columns in the tiles."""
    needed = config.colour_cut.columns
    if not needed or not tiles:
        return
    have = set(survey.tile(tiles[0]).catalog_columns)
    absent = [c for c in needed if c not in have]
    if absent:
        raise ValueError(
            f"colour cut {config.colour_cut.name!r} reads catalogue columns {absent} that the "
            f"tiles of survey {config.survey_url} do not have (tile {tiles[0]}); pass --cut NAME"
        )


def _run_token() -> str:
    # A timestamp to read, a random part so two runs started in the same second never share keys.
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{uuid.uuid4().hex[:12]}"


def _provenance(plan: ScanPlan) -> dict[str, Any]:
    c = plan.config
    config = c.to_dict()
    # Absolute local paths: `lenscan gallery OUT` reads them from any directory.
    config["survey_url"] = safe_url(absolute_url(c.survey_url))  # no user info, no signature
    config["out"] = safe_url(absolute_url(c.out))
    return {
        "survey_url": config["survey_url"],
        # Stores written by lenscan 0.1 have no uuid: their URL is all that identifies them.
        "survey_uuid": plan.survey.uuid or f"url:{config['survey_url']}",
        "model_sha256": plan.payload.sha256,
        "colour_cut": get_colour_cut(c.colour_cut).to_dict(),
        "stamp_size_pix": plan.meta.stamp_size_pix,
        "dihedral_average": c.dihedral_average,
        "precision": c.precision,
        "lenscan_version": __version__,
        "model_name": plan.meta.name,
        "model_members": plan.meta.n_members,
        "model_runtime": plan.meta.runtime,
        "model_card": plan.meta.card,
        "threshold": plan.threshold,
        "config": config,
        # Names only: which options (credentials, headers) the run needed but never records.
        "storage_options_withheld": withheld_options(c.storage_options),
        "out_storage_options_withheld": withheld_options(c.out_storage_options),
        "run_token": plan.run_token,
        "started": plan.run_token.split("-")[0],
        "tiles_planned": len(plan.tiles),
    }


def _check_resume(plan: ScanPlan) -> None:
    run_json = posixpath.join(plan.out_path, "run.json")
    try:
        previous = json.loads(plan.out_fs.cat_file(run_json))
    except FileNotFoundError:
        return
    previous.setdefault("survey_uuid", f"url:{previous.get('survey_url')}")
    previous.setdefault("dihedral_average", False)
    previous.setdefault("precision", "fp32")
    for key in _RESUME_KEYS:
        if previous.get(key) != plan.provenance[key]:
            raise ValueError(
                f"{safe_url(plan.config.out)} already holds a scan with a different {key} "
                f"({previous.get(key)!r} != {plan.provenance[key]!r}); use another --out, or "
                "resume=False (--no-resume) to rescore every tile"
            )


def committed_parts(fs: fsspec.AbstractFileSystem, scored_path: str) -> dict[str, str]:
    """Map tile id -> path of its committed part, from a fresh listing (temp files never match)."""
    parts = {}
    for path in list_fresh(fs, scored_path):
        m = _PART_NAME.fullmatch(posixpath.basename(path))
        if m:
            parts[m.group(1)] = path
    return parts


def committed_part_tiles(fs: fsspec.AbstractFileSystem, scored_path: str) -> pa.Array:
    """The tile ids of the committed parts under ``scored_path`` (fresh listing), as Arrow.

    The listing becomes one Arrow string array at once: 10^5-10^6 parts cost their bytes, not a
    Python string and dict entry each.
    """
    paths = pa.array(list_fresh(fs, scored_path), pa.string())
    found = pc.extract_regex(paths, _PART_NAME_RE2)
    return pc.struct_field(found.filter(pc.is_valid(found)), "tile")


def _done_tiles(plan: ScanPlan, state: LedgerState) -> TileSet:
    """Tiles whose current write is in the ledger and whose part exists (fresh listing)."""
    ids = state.tile_ids
    return TileSet(ids.filter(pc.is_in(ids, committed_part_tiles(plan.out_fs, plan.scored_path))))


def write_run_record(plan: ScanPlan, **fields: Any) -> None:
    """Write ``OUT/run.json``: the run's provenance plus ``fields`` (status, summary, ...)."""
    record = scrub({**plan.provenance, **fields})  # failure messages may echo a URL
    atomic_write_bytes(
        plan.url("run.json"),
        json.dumps(record, indent=2, default=str).encode(),
        storage_options=plan.config.out_storage_options,
    )
