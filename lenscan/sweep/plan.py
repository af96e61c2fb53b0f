"""Planning a scan: which tiles, what is already done, and the run's identity.

Everything here runs on the client before any task is submitted, and costs a few reads however
large the survey: the tile list and write ids come from the store's tile index, what is done from
the output's ledger and one fresh listing of its parts.
"""

from __future__ import annotations

import datetime as _dt
import json
import posixpath
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

import fsspec

from lenscan._io import atomic_write_bytes, check_output_folder, clean_orphans, list_fresh
from lenscan._version import __version__
from lenscan.config import ScanConfig
from lenscan.models import DEFAULT_MODEL, ModelMeta, check_compatible, read_model_meta
from lenscan.select import get_colour_cut
from lenscan.survey import SurveyStore, open_survey
from lenscan.survey.remote import remote_filesystem, storage_errors
from lenscan.sweep.ledger import LedgerState, load_ledger
from lenscan.sweep.worker import ModelPayload, TileJob

__all__ = ["ScanPlan", "committed_parts", "plan_scan", "task_key", "write_run_record"]

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


@dataclass
class ScanPlan:
    """A scan ready to run: its settings, its tiles, and what is already done."""

    config: ScanConfig
    survey: SurveyStore
    meta: ModelMeta
    payload: ModelPayload
    threshold: float
    tiles: list[str]
    write_ids: dict[str, str]
    done: set[str]
    run_token: str
    out_fs: fsspec.AbstractFileSystem
    out_path: str
    provenance: dict[str, Any] = field(default_factory=dict)
    n_sources: dict[str, int] = field(default_factory=dict)

    @property
    def todo(self) -> list[str]:
        """Tiles to score in this run, the most sources first (then in survey order).

        Largest first keeps the sweep's tail short: the last tasks to finish are the small
        tiles, so no worker waits long on one big tile while the others idle.
        """
        left = [t for t in self.tiles if t not in self.done]
        return sorted(left, key=lambda t: -self.n_sources.get(t, 0))

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

    Raises
    ------
    ValueError
        Naming the input: a cut or model the survey cannot serve, unknown tiles, or an output
        folder holding another scan (another survey, model, cut or stamp size).
    """
    check_output_folder(config.out, storage_options=config.out_storage_options)
    model_ref = DEFAULT_MODEL if config.model == "default" else config.model
    payload = ModelPayload.from_model(model_ref)
    meta = read_model_meta(model_ref)
    survey = open_survey(config.survey_url, storage_options=config.storage_options)
    index = survey.tile_index()
    tiles = _select_tiles(config, survey, sorted(index))
    _check_survey_serves(config, survey, meta, index, tiles)
    threshold = config.threshold if config.threshold is not None else meta.recommended_threshold
    out_fs, out_path = remote_filesystem(config.out, config.out_storage_options)
    plan = ScanPlan(
        config=config,
        survey=survey,
        meta=meta,
        payload=payload,
        threshold=threshold,
        tiles=tiles,
        write_ids={t: str(index[t]["write_id"]) for t in tiles},
        n_sources={t: int(index[t].get("n_sources", 0)) for t in tiles},
        done=set(),
        run_token=_run_token(),
        out_fs=out_fs,
        out_path=out_path,
    )
    plan.provenance = _provenance(plan)
    with storage_errors(config.out):  # the first reads of the output folder
        _read_output(plan)
    return plan


def _read_output(plan: ScanPlan) -> None:
    """What the output folder already holds: resume from it, or clear it (``resume=False``)."""
    out_fs, out_path = plan.out_fs, plan.out_path
    if plan.config.resume:
        _check_resume(plan)
        state = load_ledger(out_fs, out_path, tiles=plan.tiles).current(plan.write_ids)
        plan.done = _done_tiles(plan, state)
    else:
        for sub in ("scored", "ledger"):
            if out_fs.exists(posixpath.join(out_path, sub)):
                out_fs.rm(posixpath.join(out_path, sub), recursive=True)
    for sub in ("scored", "ledger", ""):
        clean_orphans(out_fs, posixpath.join(out_path, sub) if sub else out_path)


def _select_tiles(config: ScanConfig, survey: SurveyStore, all_tiles: list[str]) -> list[str]:
    if config.tiles is None:
        return all_tiles
    unknown = sorted(set(config.tiles) - set(all_tiles))
    if unknown:
        raise ValueError(f"tiles {unknown} are not complete tiles of {config.survey_url}")
    wanted = set(config.tiles)
    return [t for t in all_tiles if t in wanted]


def _check_survey_serves(config, survey, meta, index, tiles) -> None:
    missing = [b for b in config.colour_cut.bands if b not in survey.bands]
    if missing:
        raise ValueError(
            f"colour cut {config.colour_cut.name!r} needs bands {missing} that survey "
            f"{config.survey_url} does not have (bands: {list(survey.bands)})"
        )
    # Refuse a model that cannot read this survey before any work starts.
    scale = index[tiles[0]]["pixel_scale_arcsec"] if tiles else None
    try:
        check_compatible(meta, bands=survey.bands, pixel_scale_arcsec=scale)
    except ValueError as exc:
        raise ValueError(f"survey {config.survey_url}: {exc}") from exc


def _run_token() -> str:
    # A timestamp to read, a random part so two runs started in the same second never share keys.
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{uuid.uuid4().hex[:12]}"


def _provenance(plan: ScanPlan) -> dict[str, Any]:
    c = plan.config
    return {
        "survey_url": c.survey_url,
        # Stores written by lenscan 0.1 have no uuid: their URL is all that identifies them.
        "survey_uuid": plan.survey.uuid or f"url:{c.survey_url}",
        "model_sha256": plan.payload.sha256,
        "colour_cut": get_colour_cut(c.colour_cut).to_dict(),
        "stamp_size_pix": plan.meta.stamp_size_pix,
        "dihedral_average": c.dihedral_average,
        "precision": c.precision,
        "lenscan_version": __version__,
        "model_name": plan.meta.name,
        "model_members": plan.meta.n_members,
        "threshold": plan.threshold,
        "config": c.to_dict(),
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
                f"{plan.config.out} already holds a scan with a different {key} "
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


def _done_tiles(plan: ScanPlan, state: LedgerState) -> set[str]:
    """Tiles whose current write is in the ledger and whose part exists (fresh listing)."""
    parts = committed_parts(plan.out_fs, plan.scored_path)
    return {t for t in state.tiles if t in parts}


def write_run_record(plan: ScanPlan, **fields: Any) -> None:
    """Write ``OUT/run.json``: the run's provenance plus ``fields`` (status, summary, ...)."""
    record = {**plan.provenance, **fields}
    atomic_write_bytes(
        plan.url("run.json"),
        json.dumps(record, indent=2, default=str).encode(),
        storage_options=plan.config.out_storage_options,
    )
