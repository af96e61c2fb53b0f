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
from lenscan._secrets import remember_secrets, safe_settings, safe_storage_options, safe_url
from lenscan.select import DEFAULT_COLOUR_CUT, ColourCut, get_colour_cut
from lenscan.table import TABLE_FORMATS

__all__ = [
    "CLUSTER_KINDS",
    "DEVICES",
    "ClusterSpec",
    "ScanConfig",
]

DEVICES = ("auto", "cpu", "cuda")


CLUSTER_KINDS = ("local", "local-cuda", "address", "scheduler_file", "class")
_SCALE_KEYS = ("n", "jobs", "cores", "memory")
_ADAPT_KEYS = (
    "minimum", "maximum", "minimum_jobs", "maximum_jobs", "minimum_cores", "maximum_cores",
    "minimum_memory", "maximum_memory", "interval", "wait_count", "target_duration",
)  # fmt: skip
_LOCAL_ONLY = ("n_workers", "threads_per_worker")


@dataclass
class ClusterSpec:
    """Where the scan's tasks run: one spec for any Dask cluster (see ``cluster/*.yaml``).

    In YAML the manager's dotted path is written ``class:``; :meth:`from_dict` maps it to
    ``manager``. Exactly one of ``address``, ``scheduler_file``, ``scheduler`` and ``class``
    may be given; with none, the cluster is a local one.

    Parameters
    ----------
    kind : {"local", "local-cuda", "address", "scheduler_file", "class"} or None
        What to start or connect to; ``None`` infers it from the other fields.
    address : str or None
        Address of a running Dask scheduler (``tcp://host:8786``).
    scheduler_file : str or None
        A scheduler JSON file written by ``dask scheduler --scheduler-file``.
    scheduler : str or None
        Either of the two above (a path ending in ``.json`` is a scheduler file); the
        ``--scheduler`` flag sets it.
    manager : str or None
        Dotted path of a Dask cluster manager class or factory (YAML key ``class``), e.g.
        ``dask_jobqueue.SLURMCluster``, ``dask_kubernetes.operator.KubeCluster``.
    kwargs : dict
        Keyword arguments for the manager. Never put credentials here: use the machines' own
        identity (instance roles, workload identity) or the manager's config files.
    scale : int or dict or None
        After start, ``cluster.scale(n)`` or ``cluster.scale(**scale)`` (e.g. ``{jobs: 4}``).
    adapt : dict or None
        After start, ``cluster.adapt(**adapt)`` (e.g. ``{minimum_jobs: 1, maximum_jobs: 8}``).
    n_workers : int or None
        Workers for a local cluster (default: one per 2 cores, or one per GPU).
    threads_per_worker : int or None
        Threads per local worker (default: cores / workers). Torch uses as many.
    gpu : {"auto", True, False}
        For ``local``: start dask-cuda's ``LocalCUDACluster`` when GPUs are present
        (``"auto"``), always (``True``, the same as kind ``local-cuda``) or never (``False``).
    memory_limit : str
        Memory limit per local worker (Dask syntax, e.g. ``"4GiB"``, or ``"auto"``).
    wait_for_workers : int
        Before the sweep starts, wait until this many workers have joined (not for local).
    timeout_s : float
        How long to wait for them (SLURM jobs may queue) before failing with a clear error.
    check_versions : bool
        Refuse workers whose lenscan, dask, distributed or torch differ from the client's.
    dask_config : dict
        Dask settings for this process while the cluster runs (``{"distributed.scheduler.
        allowed-failures": 10}``); they reach schedulers started here (local, dask-jobqueue),
        not remote ones.

    Examples
    --------
    The kind follows from the one target given:

    >>> ClusterSpec(address="tcp://10.0.0.1:8786").resolved_kind
    'address'
    >>> ClusterSpec(scheduler="scheduler.json").resolved_kind
    'scheduler_file'
    >>> ClusterSpec(n_workers=2, gpu=False).resolved_kind
    'local'
    """

    kind: str | None = None
    address: str | None = None
    scheduler_file: str | None = None
    scheduler: str | None = None
    manager: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    scale: int | dict[str, Any] | None = None
    adapt: dict[str, Any] | None = None
    n_workers: int | None = None
    threads_per_worker: int | None = None
    gpu: bool | str = "auto"
    memory_limit: str = "auto"
    wait_for_workers: int = 1
    timeout_s: float = 600.0
    check_versions: bool = True
    dask_config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in _LOCAL_ONLY:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"cluster.{name} must be a positive integer, got {value!r}")
        if self.gpu not in ("auto", True, False):
            raise ValueError(f"cluster.gpu must be 'auto', true or false, got {self.gpu!r}")
        for name in ("address", "scheduler_file", "scheduler", "manager"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                label = "class" if name == "manager" else name
                raise ValueError(f"cluster.{label} must be a non-empty string, got {value!r}")
        if not isinstance(self.wait_for_workers, int) or self.wait_for_workers < 0:
            raise ValueError(
                f"cluster.wait_for_workers must be an integer >= 0, got {self.wait_for_workers!r}"
            )
        if not isinstance(self.timeout_s, int | float) or not self.timeout_s > 0:
            raise ValueError(f"cluster.timeout_s must be a number > 0, got {self.timeout_s!r}")
        if not isinstance(self.check_versions, bool):
            raise ValueError(
                f"cluster.check_versions must be true or false, got {self.check_versions!r}"
            )
        if not isinstance(self.dask_config, Mapping) or not all(
            isinstance(k, str) and k for k in self.dask_config
        ):
            raise ValueError(
                f"cluster.dask_config must map Dask setting names to values, got "
                f"{self.dask_config!r}"
            )
        self.dask_config = dict(self.dask_config)
        kind = self.resolved_kind  # checks that at most one target is given
        self._check_kind_fields(kind)
        if kind == "class":
            from lenscan._managers import check_manager  # imports the class: fails early

            assert self.manager is not None  # kind "class" is only ever inferred from it
            check_manager(self.manager, self.kwargs)

    @property
    def resolved_kind(self) -> str:
        """The kind of cluster this spec describes (``kind`` or inferred from the fields)."""
        fields = {
            "address": self.address,
            "scheduler_file": self.scheduler_file,
            "scheduler": self.scheduler,
            "class": self.manager,
        }
        given = [k for k, v in fields.items() if v is not None]
        if len(given) > 1:
            raise ValueError(
                f"cluster: give only one of address, scheduler_file, scheduler and "
                f"class, got {given}"
            )
        if self.scheduler is not None and given == ["scheduler"]:
            inferred = "scheduler_file" if self.scheduler.endswith(".json") else "address"
        elif given:
            inferred = given[0]
        else:
            inferred = "local-cuda" if self.gpu is True else "local"
        if self.kind is None:
            return inferred
        if self.kind not in CLUSTER_KINDS:
            raise ValueError(f"cluster.kind must be one of {CLUSTER_KINDS}, got {self.kind!r}")
        if self.kind != inferred and not (self.kind == "local-cuda" and inferred == "local"):
            needs = {"address": "address", "scheduler_file": "scheduler_file", "class": "class"}
            hint = (
                f" (kind {self.kind} needs cluster.{needs[self.kind]})"
                if self.kind in needs
                else ""
            )
            raise ValueError(
                f"cluster.kind is {self.kind!r} but the fields describe a "
                f"{inferred!r} cluster{hint}"
            )
        return self.kind

    def _check_kind_fields(self, kind: str) -> None:
        if kind != "class":
            for name in ("scale", "adapt"):
                if getattr(self, name) is not None:
                    raise ValueError(f"cluster.{name} applies to a cluster manager (class:) only")
            if self.kwargs:
                raise ValueError("cluster.kwargs applies to a cluster manager (class:) only")
        if kind not in ("local", "local-cuda"):
            for name in _LOCAL_ONLY:
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"cluster.{name} applies to local clusters only; for a "
                        f"kind {kind!r} size it with scale/adapt or the manager"
                    )
        if not isinstance(self.kwargs, Mapping) or not all(isinstance(k, str) for k in self.kwargs):
            raise ValueError(
                f"cluster.kwargs must be a mapping of argument names, got {self.kwargs!r}"
            )
        self.kwargs = dict(self.kwargs)
        if self.scale is not None and self.adapt is not None:
            raise ValueError("cluster: give scale or adapt, not both")
        if self.scale is not None:
            self.scale = _check_sizes("scale", self.scale, _SCALE_KEYS, allow_int=True)
        if self.adapt is not None:
            self.adapt = _check_sizes("adapt", self.adapt, _ADAPT_KEYS, allow_int=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str | None = None) -> ClusterSpec:
        """Build a spec from plain data (YAML's ``class:`` is the ``manager`` field)."""
        if not isinstance(data, Mapping):
            prefix = f"{source}: " if source else ""
            raise ValueError(f"{prefix}cluster must be a mapping, got {type(data).__name__}")
        data = dict(data)
        if "class" in data:
            if "manager" in data:
                raise ValueError("cluster: give class or manager, not both")
            data["manager"] = data.pop("class")
        return cls(**known_fields(cls, data, what="cluster fields", source=source))

    @classmethod
    def from_yaml(cls, path: str | Path) -> ClusterSpec:
        """Load a cluster spec file (``cluster/*.yaml``); a top-level ``cluster:`` is allowed."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"cluster spec {path} does not exist")
        with path.open() as fh:
            data = yaml.safe_load(fh) or {}
        if isinstance(data, Mapping) and set(data) == {"cluster"}:
            data = data["cluster"]
        try:
            return cls.from_dict(data, source=str(path))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"invalid cluster spec {path}: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        """Plain data for provenance (``run.json``), never a credential.

        Manager kwargs and Dask settings are free-form: values under credential-like names are
        withheld and every string is scrubbed (:func:`lenscan._secrets.safe_settings`).
        """
        d = dataclasses.asdict(self)
        d["class"] = d.pop("manager")
        d["kind"] = self.resolved_kind
        for key in ("address", "scheduler_file", "scheduler"):
            d[key] = safe_url(d[key]) if d[key] else d[key]
        d["kwargs"] = safe_settings(d["kwargs"])
        d["dask_config"] = safe_settings(d["dask_config"])
        return d


def _check_sizes(name: str, value: Any, keys: tuple[str, ...], *, allow_int: bool) -> Any:
    if allow_int and isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"cluster.{name} must be >= 0, got {value}")
        return value
    if not isinstance(value, Mapping):
        kinds = "an integer or a mapping" if allow_int else "a mapping"
        raise ValueError(f"cluster.{name} must be {kinds}, got {value!r}")
    unknown = sorted(set(value) - set(keys))
    if unknown:
        raise ValueError(f"cluster.{name}: unknown keys {unknown}; known: {list(keys)}")
    for k, v in value.items():
        if isinstance(v, int | float) and not isinstance(v, bool) and v < 0:
            raise ValueError(f"cluster.{name}.{k} must be >= 0, got {v}")
    return dict(value)


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
        A preset name or a :class:`~lenscan.select.ColourCut` mapping. ``"default"`` (the
        default) is the survey's own cut, as its store records it (Rubin, HSC), else
        ``des-jacobs19-wide`` (``des-jacobs19`` is the 2019a box); ``colour_cut_is_default``
        says whether it was left to the survey.
    threshold : float or None
        Candidate score threshold in [0, 1]; ``None`` takes the model's recommended threshold
        (for the bundled models: the one keeping 0.9 of bright lenses on their calibration
        surveys, ``docs/training.md``), or the one ``false_rate`` names.
    false_rate : float or None
        Instead of a threshold, the false candidates per 1000 scored non-lenses to allow: the
        threshold is read from the calibration curve recorded with the model
        (:meth:`~lenscan.models.ModelMeta.threshold_for_false_rate`). Not with ``threshold``.
    top : int or None
        An inspection budget: keep only the ``top`` highest-scoring candidates. Alone, it keeps
        the ``top`` best whatever their score (threshold 0: every scored row reaches the
        reduce); with ``threshold`` or ``false_rate``, at most ``top`` of those passing it.
    batch_size : int
        Stamps per forward pass on a worker.
    dihedral_average : bool
        Score each stamp as the mean over its 8 dihedral views (rotations and flips): about 8x
        the CNN time, fewer false candidates (``docs/training.md``).
    device : {"auto", "cpu", "cuda"}
        Where workers run the CNN; ``auto`` uses a GPU when the worker has one.
    precision : {"fp32", "bf16"}
        ``bf16`` scores under bfloat16 autocast: faster on GPUs, scores within bf16 rounding.
    compile_model : bool
        ``torch.compile`` the model once per worker (GPU workers; the first batch compiles).
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
    known_lenses : str or None
        Known lenses to flag among the candidates (``known_*`` columns, counts in the summary):
        ``"lenscat"`` (the bundled lenscat catalogue, the default), a table path or URL (FITS,
        Parquet, CSV, ECSV, VOTable, HATS), or None to skip.
    known_radius_arcsec : float
        Match radius for known lenses (default 3").
    hats_scored : bool
        Also import every scored row into the HATS catalogue ``OUT/scored.hats`` (hats-import on
        the sweep's cluster; ``formats`` may hold ``hats`` for the candidate table).
    break_lease : bool
        Take over the lease on ``out`` even if its holder looks alive (``--break-lease``: for a
        run known to be dead on another host). A lease whose holder has died is taken over
        without it once it expires (see :mod:`lenscan._lease`, ``docs/reliability.md``).
    lease_ttl_seconds : float
        The lease's time to live: a run that has not renewed it for this long (it renews every
        quarter of it) is taken to be dead and its output folder may be taken over.
    storage_options, out_storage_options : dict
        fsspec options for the survey and the output (credentials, endpoint URLs).
    cluster : ClusterSpec or mapping or path
        Where to run: a spec, its plain data, or a cluster spec file (``cluster/*.yaml``).

    Examples
    --------
    >>> config = ScanConfig(survey_url="s3://bucket/des.zarr", out="s3://bucket/run1",
    ...                     cluster={"n_workers": 2})
    >>> config.colour_cut.name, config.formats, config.cluster.resolved_kind
    ('des-jacobs19-wide', ['parquet', 'fits'], 'local')
    >>> ScanConfig(survey_url="des.zarr", out="run1", batch_size=0)
    Traceback (most recent call last):
    ...
    ValueError: batch_size must be a positive integer, got 0
    """

    survey_url: str
    out: str
    model: str = "default"
    colour_cut: str | Mapping[str, Any] | ColourCut = "default"
    threshold: float | None = None
    false_rate: float | None = None
    top: int | None = None
    batch_size: int = 256
    dihedral_average: bool = False
    device: str = "auto"
    precision: str = "fp32"
    compile_model: bool = False
    tiles: list[str] | None = None
    dedupe_radius_arcsec: float = 1.0
    overlap_margin_arcsec: float = 120.0
    formats: list[str] = field(default_factory=lambda: ["parquet", "fits"])
    resume: bool = True
    allow_failures: bool = False
    commit_interval_seconds: float = 10.0
    gallery_size: int = 48
    known_lenses: str | None = "lenscat"
    known_radius_arcsec: float = 3.0
    hats_scored: bool = False
    break_lease: bool = False
    lease_ttl_seconds: float = 120.0
    # Never in a repr: a config printed or logged must not show credentials.
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)
    out_storage_options: dict[str, Any] = field(default_factory=dict, repr=False)
    cluster: ClusterSpec = field(default_factory=ClusterSpec)

    def __post_init__(self) -> None:
        for name in ("survey_url", "out", "model"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        # The scan's plan swaps in the survey's own cut (and model) when these are left default.
        self.colour_cut_is_default = isinstance(self.colour_cut, str) and (
            self.colour_cut == "default"
        )
        if self.colour_cut_is_default:
            self.colour_cut = DEFAULT_COLOUR_CUT
        self.colour_cut = get_colour_cut(self.colour_cut)
        self._check_selection()
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
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
        ttl = float(self.lease_ttl_seconds)
        if not (math.isfinite(ttl) and ttl > 0):
            raise ValueError(f"lease_ttl_seconds must be a number > 0, got {ttl}")
        self.lease_ttl_seconds = ttl
        if isinstance(self.known_lenses, str) and self.known_lenses.strip().lower() == "none":
            self.known_lenses = None
        if self.known_lenses is not None and (
            not isinstance(self.known_lenses, str) or not self.known_lenses.strip()
        ):
            raise ValueError(
                f"known_lenses must be a catalogue name or path, got {self.known_lenses!r}"
            )
        k = float(self.known_radius_arcsec)
        if not (math.isfinite(k) and k > 0):
            raise ValueError(f"known_radius_arcsec must be > 0, got {self.known_radius_arcsec!r}")
        self.known_radius_arcsec = k
        for name in (
            "resume",
            "allow_failures",
            "dihedral_average",
            "compile_model",
            "hats_scored",
            "break_lease",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        bad = [f for f in self.formats if f not in TABLE_FORMATS]
        if bad or not self.formats:
            raise ValueError(f"formats must be a non-empty subset of {TABLE_FORMATS}, got {bad}")
        if not isinstance(self.gallery_size, int) or self.gallery_size < 0:
            raise ValueError(f"gallery_size must be an integer >= 0, got {self.gallery_size!r}")
        if isinstance(self.cluster, str | Path):
            self.cluster = ClusterSpec.from_yaml(self.cluster)
        elif isinstance(self.cluster, Mapping):
            self.cluster = ClusterSpec.from_dict(self.cluster)
        for name in ("storage_options", "out_storage_options"):
            if not isinstance(getattr(self, name), Mapping):
                raise ValueError(f"{name} must be a mapping, got {getattr(self, name)!r:.40}")
        # Whatever is withheld from the record is also scrubbed from messages and logs.
        remember_secrets(self.storage_options, self.survey_url, self.out, self.model)
        remember_secrets(self.out_storage_options)

    def _check_selection(self) -> None:
        """Validate ``threshold``, ``false_rate`` and ``top``: how the candidates are chosen."""
        if self.threshold is not None:
            t = float(self.threshold)
            if not (math.isfinite(t) and 0.0 <= t <= 1.0):
                raise ValueError(f"threshold must be within [0, 1], got {self.threshold!r}")
            self.threshold = t
        if self.false_rate is not None:
            if self.threshold is not None:
                raise ValueError("give threshold or false_rate, not both")
            if isinstance(self.false_rate, bool) or not isinstance(self.false_rate, int | float):
                raise ValueError(f"false_rate must be a number >= 0, got {self.false_rate!r}")
            rate = float(self.false_rate)
            if not (math.isfinite(rate) and rate >= 0):
                raise ValueError(f"false_rate must be a number >= 0 per 1000, got {rate!r}")
            self.false_rate = rate
        if self.top is not None and (
            isinstance(self.top, bool) or not isinstance(self.top, int) or self.top < 1
        ):
            raise ValueError(f"top must be a positive integer, got {self.top!r}")

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
        """Plain-data form for provenance, never a credential.

        Storage options are recorded by an allow-list (endpoint without user info, region,
        anonymous access, requester pays, tuning: what reproduces the run without its
        credentials; :func:`lenscan._secrets.safe_storage_options`), URLs without user info or
        signed query parameters.
        """
        d = dataclasses.asdict(self)
        d["colour_cut"] = get_colour_cut(self.colour_cut).to_dict()  # a ColourCut already
        d["cluster"] = self.cluster.to_dict()
        for key in ("survey_url", "out", "model", "known_lenses"):
            d[key] = safe_url(d[key]) if d[key] else d[key]
        for key in ("storage_options", "out_storage_options"):
            d[key] = safe_storage_options(d[key])
        return d
