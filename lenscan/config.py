"""One validated configuration object per scan, loadable from YAML.

Every check happens here, at the boundary, so a sweep never starts with a typo in it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lenscan._fields import known_fields
from lenscan.select import DEFAULT_COLOUR_CUT, ColourCut, get_colour_cut
from lenscan.table import TABLE_FORMATS

DEVICES = ("auto", "cpu", "cuda")


@dataclass
class ClusterSpec:
    """Where the scan's tasks run.

    Parameters
    ----------
    scheduler : str or None
        Address of a running Dask scheduler (``tcp://host:8786``) or a path to a scheduler
        JSON file. ``None`` starts a local cluster sized to this machine.
    n_workers : int or None
        Workers for a local cluster (default: one per 2 cores, or one per GPU).
    threads_per_worker : int or None
        Threads per local worker (default: cores / workers). Torch uses as many.
    gpu : {"auto", True, False}
        Start dask-cuda's ``LocalCUDACluster`` when GPUs are present (``"auto"``), always
        (``True``) or never (``False``).
    memory_limit : str
        Memory limit per local worker (Dask syntax, e.g. ``"4GiB"``, or ``"auto"``).
    """

    scheduler: str | None = None
    n_workers: int | None = None
    threads_per_worker: int | None = None
    gpu: bool | str = "auto"
    memory_limit: str = "auto"

    def __post_init__(self) -> None:
        for name in ("n_workers", "threads_per_worker"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"cluster.{name} must be a positive integer, got {value!r}")
        if self.gpu not in ("auto", True, False):
            raise ValueError(f"cluster.gpu must be 'auto', true or false, got {self.gpu!r}")
        if self.scheduler is not None and not str(self.scheduler).strip():
            raise ValueError("cluster.scheduler is empty; give an address or leave it unset")


@dataclass
class ScanConfig:
    """Everything one sweep needs.

    Parameters
    ----------
    survey_url : str
        The lenscan survey store (any fsspec URL).
    out : str
        Output folder URL: ``scored/`` parts, ``candidates.*``, ``run.json``, ``gallery/``.
    model : str
        A bundled model name or a checkpoint path (``.safetensors``/``.json`` or stem).
    colour_cut : str or mapping
        A preset name (default ``des-jacobs19-wide``; ``des-jacobs19`` is the 2019a box) or a
        :class:`~lenscan.select.ColourCut` mapping.
    threshold : float or None
        Candidate score threshold in [0, 1]; ``None`` takes the model's recommended threshold.
    batch_size : int
        Stamps per forward pass on a worker.
    device : {"auto", "cpu", "cuda"}
        Where workers run the CNN; ``auto`` uses a GPU when the worker has one.
    tiles : list of str or None
        Scan only these tiles (default: all complete tiles in the store).
    dedupe_radius_arcsec : float
        Detections closer than this on the sky (one source seen by overlapping tiles) are
        merged into one candidate, before the threshold is applied.
    overlap_margin_arcsec : float
        Sources closer than this to a tile edge may also lie in a neighbouring tile, so their
        rows are kept for the merge whatever their score. Must be at least the width of the
        survey's tile overlaps (DES coadd tiles overlap by about 1 arcmin).
    formats : list of str
        Candidate table formats to write (``parquet`` and ``fits`` by default).
    resume : bool
        Skip tiles already scored under ``out`` by the same model, cut and survey (tiles
        rewritten in the survey since are scored again).
    commit_interval_seconds : float
        How often the client commits finished tiles to ``OUT/ledger`` (also every 500 tiles):
        the most work a killed client loses. 0 commits after every tile.
    allow_failures : bool
        Return normally when tiles or sources failed (they are still recorded in
        ``OUT/failures.parquet``); by default :func:`lenscan.scan` raises ``ScanError``.
    gallery_size : int
        Number of top candidates rendered into ``OUT/gallery`` (0 disables it).
    storage_options, out_storage_options : dict
        fsspec options for the survey and the output (credentials, endpoint URLs).
    cluster : ClusterSpec
        Where to run.
    """

    survey_url: str
    out: str
    model: str = "default"
    colour_cut: str | Mapping[str, Any] | ColourCut = DEFAULT_COLOUR_CUT
    threshold: float | None = None
    batch_size: int = 256
    device: str = "auto"
    tiles: list[str] | None = None
    dedupe_radius_arcsec: float = 1.0
    overlap_margin_arcsec: float = 120.0
    formats: list[str] = field(default_factory=lambda: ["parquet", "fits"])
    resume: bool = True
    allow_failures: bool = False
    commit_interval_seconds: float = 10.0
    gallery_size: int = 48
    storage_options: dict[str, Any] = field(default_factory=dict)
    out_storage_options: dict[str, Any] = field(default_factory=dict)
    cluster: ClusterSpec = field(default_factory=ClusterSpec)

    def __post_init__(self) -> None:
        for name in ("survey_url", "out", "model"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        self.colour_cut = get_colour_cut(self.colour_cut)
        if self.threshold is not None:
            t = float(self.threshold)
            if not (math.isfinite(t) and 0.0 <= t <= 1.0):
                raise ValueError(f"threshold must be within [0, 1], got {self.threshold!r}")
            self.threshold = t
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.tiles is not None:
            if isinstance(self.tiles, str) or not all(isinstance(t, str) for t in self.tiles):
                raise ValueError(f"tiles must be a list of tile ids, got {self.tiles!r}")
            self.tiles = list(self.tiles)
        r = float(self.dedupe_radius_arcsec)
        if not (math.isfinite(r) and r >= 0):
            raise ValueError(f"dedupe_radius_arcsec must be >= 0, got {r}")
        self.dedupe_radius_arcsec = r
        m = float(self.overlap_margin_arcsec)
        if not (math.isfinite(m) and m >= 0):
            raise ValueError(f"overlap_margin_arcsec must be >= 0, got {m}")
        self.overlap_margin_arcsec = m
        c = float(self.commit_interval_seconds)
        if not (math.isfinite(c) and c >= 0):
            raise ValueError(f"commit_interval_seconds must be >= 0, got {c}")
        self.commit_interval_seconds = c
        for name in ("resume", "allow_failures"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        bad = [f for f in self.formats if f not in TABLE_FORMATS]
        if bad or not self.formats:
            raise ValueError(f"formats must be a non-empty subset of {TABLE_FORMATS}, got {bad}")
        if not isinstance(self.gallery_size, int) or self.gallery_size < 0:
            raise ValueError(f"gallery_size must be an integer >= 0, got {self.gallery_size!r}")
        if isinstance(self.cluster, Mapping):
            cluster = known_fields(ClusterSpec, self.cluster, what="cluster fields")
            self.cluster = ClusterSpec(**cluster)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ScanConfig:
        """Build a config from plain data (unknown keys are an error)."""
        return cls(**known_fields(cls, data, what="scan config fields"))

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> ScanConfig:
        """Load a config from a YAML file; keyword ``overrides`` that are not None win."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"scan config {path} does not exist")
        with path.open() as fh:
            data = yaml.safe_load(fh) or {}
        if not isinstance(data, Mapping):
            raise ValueError(
                f"scan config {path} must be a YAML mapping, got {type(data).__name__}"
            )
        data = dict(data.get("scan", data))
        data.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"invalid scan config {path}: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form for provenance; credentials in storage options are redacted."""
        d = dataclasses.asdict(self)
        d["colour_cut"] = self.colour_cut.to_dict()
        for key in ("storage_options", "out_storage_options"):
            d[key] = _redact(d[key])
        return d


_SECRET_WORDS = ("key", "secret", "token", "password", "credential", "sas")


def _redact(options: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in options.items():
        if isinstance(v, Mapping):
            out[k] = _redact(v)
        elif any(w in k.lower() for w in _SECRET_WORDS):
            out[k] = "***"
        else:
            out[k] = v
    return out
