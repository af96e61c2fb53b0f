"""Train lens-finding CNN ensembles on simulated stamps made on the fly.

``train(config)`` trains each ensemble member in turn on batches drawn by
:func:`lenscan.simulate.make_training_batch` on the training device, normalised with the model's
own normalisation (:func:`lenscan.stamps.normalise_stamps`, the same call the scan makes), with a
fixed held-out validation set, a JSON-lines training log, checkpoints and resumption. The result
is a model in the lenscan checkpoint format (:mod:`lenscan.models.checkpoint`).

Run directory layout (``config.output``)::

    train_config.json        the validated config of the run
    train_log.jsonl          one JSON object per log point (member, step, loss, lr, val AUC...)
    state/member{i}.safetensors + .json   resumable training state per member (weights,
                                          optimizer moments, RNG state; never a pickle)
    {name}.safetensors + {name}.json      the final model (all members)
    evaluation/              roc.png and evaluation.json, when eval_size > 0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors.torch import load_file
from safetensors.torch import save as st_save
from torch import nn

from lenscan._device import resolve_device
from lenscan._fields import known_fields
from lenscan._io import atomic_write_bytes
from lenscan._json import jsonable
from lenscan._secrets import safe_storage_options, safe_url
from lenscan._version import __version__
from lenscan.datasets import (
    band_indices,
    build_training_set,
    load_real_cutouts,
    make_batch,
)
from lenscan.metrics import roc_auc
from lenscan.models.architectures import list_architectures
from lenscan.models.checkpoint import (
    LensModel,
    ModelMeta,
    build_members,
    load_model,
    save_model,
)
from lenscan.stamps import validate_normalisation

__all__ = [
    "TrainConfig",
    "TrainResult",
    "add_train_arguments",
    "build_training_survey",
    "export_model",
    "run_train_cli",
    "train",
]

_DEVICES = ("auto", "cpu", "cuda")


# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------
def _pos_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"train config: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _pos_float(value: Any, name: str, *, allow_zero: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"train config: {name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"train config: {name} must be {'>=' if allow_zero else '>'} 0, got {v}")
    return v


@dataclass(frozen=True)
class TrainConfig:
    """Validated configuration of a training run (load with :meth:`from_yaml`).

    Parameters
    ----------
    name : str
        Name of the trained model (file stem and ``ModelMeta.name``).
    output : str
        Run directory (checkpoints, log, final model).
    architecture : str
        Registered architecture, e.g. ``"jacobs-cnn"`` or ``"resnet-small"``.
    arch_kwargs : dict
        Architecture options.
    n_members : int
        Ensemble members (each trained from its own seed on its own simulated data).
    seed : int
        Base seed; member ``i`` uses ``seeds[i]`` (default ``seed + i``).
    seeds : tuple of int, optional
        Explicit per-member seeds.
    bands : tuple of str
        Bands fed to the model, in channel order; must be rendered by the training set's preset.
    stamp_size_pix : int
        Stamp side; overrides the training set's stamp size.
    training_set : dict
        Arguments of :class:`lenscan.simulate.TrainingSetConfig` (class fractions, population,
        preset, survey_url for the real-galaxy classes, ...).
    normalisation : dict
        Stamp normalisation recorded in the model (see :func:`lenscan.stamps.normalise_stamps`).
    steps : int
        Optimisation steps per member.
    batch_size : int
        Stamps per step.
    lr, weight_decay : float
        AdamW learning rate (peak, cosine-decayed after ``warmup_steps``) and weight decay.
    warmup_steps : int
        Linear warm-up steps.
    val_size : int
        Held-out validation stamps (fixed set, simulated once from ``val_seed``).
    val_every : int
        Steps between validations (one "epoch" in the log).
    checkpoint_every : int
        Steps between checkpoints.
    device : {"auto", "cpu", "cuda"}
        Training device; ``auto`` picks CUDA when available.
    mixed_precision : bool
        bf16 autocast on CUDA (ignored on CPU).
    augment : bool
        Random flips and 90-degree rotations (lensing images have no preferred orientation).
    replay_size : int
        0: every step trains on ``batch_size`` freshly simulated stamps. Otherwise a ring buffer
        of this many simulated (normalised) stamps: each step simulates ``fresh_per_step`` new
        stamps into it and trains on them plus a random draw from the buffer, so that the
        simulator's cost on a CPU is shared by several steps.
    fresh_per_step : int, optional
        New stamps per step with a replay buffer (default ``batch_size // 4``).
    init_from : str, optional
        Model (name or path) whose members initialise this run's members (fine-tuning).
    grades : str, optional
        Merged visual grades (``lenscan grades merge --candidates``): A/B candidates join the
        lenses, N the non-lenses, as a ``graded_fraction`` of every batch (fine-tuning on the
        survey's own false positives); the file's SHA-256 goes into the model metadata.
    graded_fraction : float
        Share of each batch drawn from the graded candidates (the rest stays simulated).
    eval_size : int
        Stamps of the post-training evaluation recorded in the model's metrics (0: skip).
    eval_seed : int
        Seed of that evaluation set.
    num_threads : int, optional
        torch intra-op threads on CPU (default: torch's choice).
    description : str
        Free text stored in the model metadata.

    Examples
    --------
    Options are checked when the config is built (load a run's file with :meth:`from_yaml`):

    >>> config = TrainConfig(name="tiny", output="runs/tiny", n_members=2, steps=200, seed=5)
    >>> config.member_seeds
    (5, 6)
    >>> TrainConfig(name="tiny", output="runs/tiny", batch_size=0)
    Traceback (most recent call last):
    ...
    ValueError: train config: batch_size must be an integer >= 1, got 0
    """

    name: str
    output: str
    architecture: str = "jacobs-cnn"
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    n_members: int = 2
    seed: int = 0
    seeds: tuple[int, ...] | None = None
    bands: tuple[str, ...] = ("g", "r", "i")
    stamp_size_pix: int = 64
    training_set: dict[str, Any] = field(default_factory=dict)
    normalisation: dict[str, Any] = field(
        default_factory=lambda: {"method": "asinh_mad", "softening_sigma": 3.0}
    )
    steps: int = 1000
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    val_size: int = 1000
    val_seed: int = 999_983
    val_every: int = 100
    checkpoint_every: int = 100
    device: str = "auto"
    mixed_precision: bool = True
    augment: bool = True
    replay_size: int = 0
    fresh_per_step: int | None = None
    init_from: str | None = None
    grades: str | None = None
    graded_fraction: float = 0.25
    eval_size: int = 0
    eval_seed: int = 20261125
    num_threads: int | None = None
    description: str = ""

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if not isinstance(self.name, str) or not self.name or any(c in self.name for c in "/\\"):
            raise ValueError(f"train config: name must be a plain non-empty string: {self.name!r}")
        if not isinstance(self.output, str | os.PathLike) or not os.fspath(self.output):
            raise ValueError("train config: output must be a directory path")
        set_(self, "output", os.fspath(self.output))
        if self.architecture not in list_architectures():
            raise ValueError(
                f"train config: unknown architecture {self.architecture!r}; "
                f"known: {list_architectures()}"
            )
        if not isinstance(self.arch_kwargs, Mapping):
            raise ValueError("train config: arch_kwargs must be a mapping")
        set_(self, "arch_kwargs", dict(self.arch_kwargs))
        n = _pos_int(self.n_members, "n_members")
        set_(self, "seed", _pos_int(self.seed, "seed", 0))
        if self.seeds is not None:
            seeds = tuple(_pos_int(s, "seeds[]", 0) for s in self.seeds)
            if len(seeds) != n or len(set(seeds)) != n:
                raise ValueError(
                    f"train config: seeds must be {n} distinct integers (one per member), got "
                    f"{list(self.seeds)}"
                )
            set_(self, "seeds", seeds)
        if isinstance(self.bands, str) or not self.bands:
            raise ValueError(
                f"train config: bands must be a list of band names, got {self.bands!r}"
            )
        set_(self, "bands", tuple(str(b) for b in self.bands))
        set_(self, "stamp_size_pix", _pos_int(self.stamp_size_pix, "stamp_size_pix", 8))
        if not isinstance(self.training_set, Mapping):
            raise ValueError("train config: training_set must be a mapping")
        set_(self, "training_set", dict(self.training_set))
        set_(self, "normalisation", validate_normalisation(self.normalisation))
        for key in ("steps", "batch_size", "val_every", "checkpoint_every"):
            set_(self, key, _pos_int(getattr(self, key), key))
        set_(self, "val_size", _pos_int(self.val_size, "val_size", 10))
        if self.fresh_per_step is not None:
            set_(self, "fresh_per_step", _pos_int(self.fresh_per_step, "fresh_per_step"))
            if self.fresh_per_step > self.batch_size:
                raise ValueError(
                    f"train config: fresh_per_step ({self.fresh_per_step}) must be <= batch_size "
                    f"({self.batch_size})"
                )
        keys = ("warmup_steps", "val_seed", "eval_seed", "eval_size")
        for key in (*keys, "replay_size"):
            set_(self, key, _pos_int(getattr(self, key), key, 0))
        if 0 < self.replay_size < self.batch_size:
            raise ValueError(
                f"train config: replay_size must be 0 or >= batch_size, got {self.replay_size}"
            )
        if 0 < self.eval_size < 10:
            raise ValueError(f"train config: eval_size must be 0 or >= 10, got {self.eval_size}")
        set_(self, "lr", _pos_float(self.lr, "lr"))
        set_(self, "weight_decay", _pos_float(self.weight_decay, "weight_decay", allow_zero=True))
        if self.device not in _DEVICES:
            raise ValueError(f"train config: device must be one of {_DEVICES}, got {self.device!r}")
        for key in ("mixed_precision", "augment"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"train config: {key} must be true or false")
        if self.num_threads is not None:
            set_(self, "num_threads", _pos_int(self.num_threads, "num_threads"))
        if self.eval_seed == self.val_seed:
            raise ValueError("train config: eval_seed must differ from val_seed")
        if self.init_from is not None and not isinstance(self.init_from, str):
            raise ValueError("train config: init_from must be a model name or path")
        if self.grades is not None and not isinstance(self.grades, str):
            raise ValueError("train config: grades must be the path of a merged grades table")
        if not 0.0 < float(self.graded_fraction) < 1.0:
            raise ValueError(
                f"train config: graded_fraction must be in (0, 1), got {self.graded_fraction}"
            )
        # Build the training set once here so that bad simulation options fail at load time.
        build_training_set(self.training_set, stamp_size_pix=self.stamp_size_pix, bands=self.bands)

    @property
    def member_seeds(self) -> tuple[int, ...]:
        """Seed of each member."""
        return self.seeds or tuple(self.seed + i for i in range(self.n_members))

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dictionary (what the model metadata records), never a credential."""
        d = jsonable(dataclasses.asdict(self), "train config")
        spec = d["training_set"]
        if spec.get("survey_url"):
            spec["survey_url"] = safe_url(spec["survey_url"])
        if isinstance(spec.get("storage_options"), dict):
            spec["storage_options"] = safe_storage_options(spec["storage_options"])
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "train config") -> TrainConfig:
        """Build from a mapping, refusing unknown keys (``source`` names the file)."""
        data = known_fields(cls, data, what="training options", source=source)
        try:
            return cls(**dict(data))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: {err}") from err

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str], **overrides: Any) -> TrainConfig:
        """Load a YAML training config; ``overrides`` replace top-level keys.

        A relative ``output`` stays relative to the current directory.
        """
        import yaml

        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"training config {p} not found")
        try:
            data = yaml.safe_load(p.read_text())
        except yaml.YAMLError as err:
            raise ValueError(f"{p}: not valid YAML ({err})") from err
        if not isinstance(data, Mapping):
            raise ValueError(f"{p}: expected a mapping of training options at the top level")
        data = {**data, **{k: v for k, v in overrides.items() if v is not None}}
        return cls.from_dict(data, source=str(p))


# --------------------------------------------------------------------------------------
# Training state (safetensors + JSON; never a pickle)
# --------------------------------------------------------------------------------------
def _write_text(path: Path, text: str) -> None:
    """Write a run file atomically (parallel member processes write the same run files)."""
    atomic_write_bytes(str(path), text.encode())


def _save_state(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    info: Mapping[str, Any],
) -> None:
    """Write weights, AdamW moments and RNG state (safetensors) plus ``info`` (JSON)."""
    tensors = {
        f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()
    }
    opt = optimizer.state_dict()
    for pid, st in opt["state"].items():
        for key, value in st.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"opt.{pid}.{key}"] = t.detach().cpu().contiguous().clone()
    tensors["rng.generator"] = generator.get_state().cpu().clone()
    tensors["rng.torch"] = torch.get_rng_state().clone()
    atomic_write_bytes(str(path.with_suffix(".safetensors")), st_save(tensors))
    _write_text(path.with_suffix(".json"), json.dumps(jsonable(info, "state"), indent=2))


def _load_state(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator
) -> dict[str, Any]:
    weights = path.with_suffix(".safetensors")
    info = json.loads(path.with_suffix(".json").read_text())
    tensors = load_file(str(weights))
    model.load_state_dict(
        {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True
    )
    opt = optimizer.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    opt["state"] = state
    optimizer.load_state_dict(opt)
    generator.set_state(tensors["rng.generator"])
    torch.set_rng_state(tensors["rng.torch"])
    return info


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """Outcome of :func:`train`.

    ``model_path`` and ``meta`` are None when only some members were trained (``members=``)
    and others are still incomplete; :func:`export_model` assembles the model later.
    """

    model_path: Path | None
    meta: ModelMeta | None
    log_path: Path
    history: list[dict[str, Any]]
    wall_time_s: float
    steps_per_member: list[int]
    evaluation: dict[str, Any] | None = None

    def load(self, *, device: str = "cpu") -> LensModel:
        """Load the trained model."""
        if self.model_path is None:
            raise ValueError("this run did not produce a model yet (some members are incomplete)")
        return load_model(self.model_path, device=device)


def _lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 5% of the peak."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(config.steps - config.warmup_steps, 1)
    frac = min((step - config.warmup_steps) / span, 1.0)
    return config.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random dihedral transform (flip, 90-degree rotation) per stamp."""
    n = x.shape[0]
    k = torch.randint(0, 8, (n,), generator=generator, device=generator.device).to(x.device)
    out = torch.where((k >= 4).view(-1, 1, 1, 1), torch.flip(x, dims=(3,)), x)
    rotated = out.clone()
    for r in (1, 2, 3):
        sel = (k % 4) == r
        if bool(sel.any()):
            rotated[sel] = torch.rot90(out[sel], r, dims=(2, 3))
    return rotated


class _StampSource:
    """Training stamps: fresh simulations every step, or a replay buffer fed by fresh ones."""

    def __init__(
        self, config: TrainConfig, ts: Any, real: Any, bidx: Sequence[int], dev: torch.device
    ) -> None:
        self.config, self.ts, self.real, self.bidx, self.dev = config, ts, real, bidx, dev
        self.size = config.replay_size
        self.fresh = config.fresh_per_step or max(1, config.batch_size // 4)
        self.filled = 0
        self.ptr = 0
        self.n_simulated = 0
        if self.size:
            b, s = len(config.bands), config.stamp_size_pix
            # float16 storage halves the buffer's memory; normalised stamps are O(1) asinh values.
            self.buf_x = torch.empty((self.size, b, s, s), dtype=torch.float16, device=dev)
            self.buf_y = torch.empty((self.size,), dtype=torch.float32, device=dev)

    def _simulate(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        batch, x = make_batch(
            self.ts,
            n,
            generator=gen,
            device=self.dev,
            real_cutouts=self.real,
            band_idx=self.bidx,
            normalisation=self.config.normalisation,
        )
        self.n_simulated += n
        return x.to(self.dev), batch.labels.float().to(self.dev)

    def _insert(self, x: torch.Tensor, y: torch.Tensor) -> None:
        idx = (self.ptr + torch.arange(len(x), device=self.dev)) % self.size
        self.buf_x[idx] = x.to(torch.float16)
        self.buf_y[idx] = y
        self.ptr = (self.ptr + len(x)) % self.size
        self.filled = min(self.filled + len(x), self.size)

    def next(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(x, y)`` for one step of ``batch_size`` stamps."""
        bs = self.config.batch_size
        if not self.size:
            return self._simulate(bs, gen)
        while self.filled < self.size:  # first call: fill the buffer
            x, y = self._simulate(min(256, self.size - self.filled), gen)
            self._insert(x, y)
        x_new, y_new = self._simulate(self.fresh, gen)
        idx = torch.randint(0, self.filled, (bs - self.fresh,), generator=gen, device=gen.device)
        idx = idx.to(self.dev)
        x = torch.cat([x_new, self.buf_x[idx].float()])
        y = torch.cat([y_new, self.buf_y[idx]])
        self._insert(x_new, y_new)
        return x, y


def _validate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> dict[str, float]:
    model.eval()
    logits = []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            logits.append(model(x[i : i + batch]).float())
    model.train()
    lg = torch.cat(logits)
    loss = nn.functional.binary_cross_entropy_with_logits(lg, y).item()
    scores = torch.sigmoid(lg).cpu().numpy()
    labels = y.cpu().numpy().astype(int)
    return {"val_loss": loss, "val_auc": roc_auc(labels, scores)}


def _hardware(device: torch.device) -> dict[str, Any]:
    hw: dict[str, Any] = {
        "device": str(device),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        hw["gpu"] = torch.cuda.get_device_name(device)
    return hw


def _meta_template(config: TrainConfig, pixel_scale_arcsec: float) -> ModelMeta:
    return ModelMeta(
        name=config.name,
        architecture=config.architecture,
        arch_kwargs=config.arch_kwargs,
        bands=config.bands,
        stamp_size_pix=config.stamp_size_pix,
        pixel_scale_arcsec=pixel_scale_arcsec,
        normalisation=config.normalisation,
        n_members=config.n_members,
        description=config.description,
    )


def _check_run_dir(config: TrainConfig, *, resume: bool) -> tuple[Path, Path]:
    """Create the run directory, refuse to resume a different config; return (out, log)."""
    out = Path(config.output)
    state_dir = out / "state"
    state_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "train_config.json"
    log_path = out / "train_log.jsonl"
    cfg_dict = config.to_dict()
    if resume and cfg_path.exists():
        old = json.loads(cfg_path.read_text())
        diff = sorted(
            k for k in set(old) | set(cfg_dict) if k != "steps" and old.get(k) != cfg_dict.get(k)
        )
        if diff:
            raise ValueError(
                f"{cfg_path}: the run in {out} was started with a different config (keys {diff}); "
                "use another output directory or resume=False"
            )
    if not resume:
        for p in state_dir.glob("member*"):
            p.unlink()
        if log_path.exists():
            log_path.unlink()
    _write_text(cfg_path, json.dumps(cfg_dict, indent=2))
    return out, log_path


def _validation_set(
    config: TrainConfig, ts: Any, real: Any, bidx: Sequence[int], dev: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed validation set: the same for every member, simulated from ``val_seed``."""
    vgen = torch.Generator(device=dev).manual_seed(config.val_seed)
    xs, ys = [], []
    for i in range(0, config.val_size, 256):
        vb, vx = make_batch(
            ts,
            min(256, config.val_size - i),
            generator=vgen,
            device=dev,
            real_cutouts=real,
            band_idx=bidx,
            normalisation=config.normalisation,
        )
        xs.append(vx)
        ys.append(vb.labels.float().to(dev))
    val_x, val_y = torch.cat(xs), torch.cat(ys)
    if val_y.min() == val_y.max():
        raise ValueError(
            "the validation set has a single class; check training_set.class_fractions"
        )
    return val_x, val_y


def train(
    config: TrainConfig,
    *,
    resume: bool = True,
    progress: bool = True,
    members: Sequence[int] | None = None,
    after_export: Callable[[Path, TrainConfig, str, bool], dict[str, Any]] | None = None,
) -> TrainResult:
    """Train an ensemble on simulations made on the fly and save it as a lenscan model.

    Parameters
    ----------
    config : TrainConfig
        The run's configuration.
    resume : bool
        Continue from the checkpoints in ``config.output/state`` when they exist (the config must
        be the same, except ``steps``, which may grow). With False, existing state is ignored
        and overwritten.
    progress : bool
        Show a tqdm progress bar.
    members : sequence of int, optional
        Train only these members (e.g. one per process or GPU, in parallel, same ``output``);
        the model is written once every member has reached ``config.steps``.
    after_export : callable, optional
        ``after_export(model_stem, config, device, progress) -> dict``, called once the model is
        written when ``config.eval_size > 0`` (``lenscan train`` passes
        :func:`lenscan.evaluate.evaluate_after_training`); its result is
        ``TrainResult.evaluation``.

    Returns
    -------
    TrainResult
        Path of the saved model (``{output}/{name}``), its metadata, the training log.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    todo = _members_to_train(config, members)
    t_start = time.perf_counter()
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    dev = resolve_device(config.device)
    out, log_path = _check_run_dir(config, resume=resume)
    build_training_survey(config, progress=progress)
    run = _prepare_run(config, dev)
    _train_members(config, todo, run, resume=resume, progress=progress, log_path=log_path)
    history = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    steps = [_member_step(out, i) for i in range(config.n_members)]
    if any(s < config.steps for s in steps):
        return TrainResult(None, None, log_path, history, time.perf_counter() - t_start, steps)
    stem, meta = export_model(config, val_set=(run.val[0].cpu(), run.val[1].cpu()))
    evaluation = None
    if config.eval_size and after_export is not None:
        # The held-out evaluation lives in lenscan.evaluate, which this module does not import:
        # the caller (``lenscan train``) passes it in.
        evaluation = after_export(stem, config, str(dev), progress)
        meta = load_model(stem).meta
    return TrainResult(
        model_path=stem,
        meta=meta,
        log_path=log_path,
        history=history,
        wall_time_s=time.perf_counter() - t_start,
        steps_per_member=steps,
        evaluation=evaluation,
    )


def build_training_survey(config: TrainConfig, *, progress: bool = True) -> str | None:
    """Build ``training_set.survey_url`` from ``training_set.build_survey`` if it holds no survey.

    Returns the URL built, or None when there was nothing to build (no ``build_survey``, or the
    survey is already there: later runs reuse it).
    """
    ts = config.training_set
    spec, url = ts.get("build_survey"), ts.get("survey_url")
    if not spec or not url:
        return None
    from lenscan.survey import SurveyFormatError, open_survey

    try:
        open_survey(url, storage_options=ts.get("storage_options"))
        return None
    except (SurveyFormatError, FileNotFoundError):
        pass
    from lenscan.simulate import make_survey

    if progress:  # with the progress bar that follows, on stderr
        print(f"building the training survey {url} (once; later runs reuse it)", file=sys.stderr)
    make_survey(url, **spec, storage_options=ts.get("storage_options"), progress=progress)
    return url


def _members_to_train(config: TrainConfig, members: Sequence[int] | None) -> list[int]:
    """The member indices to train (all by default), checked to be distinct and in range."""
    todo = list(range(config.n_members)) if members is None else [int(m) for m in members]
    bad = [m for m in todo if not 0 <= m < config.n_members]
    if bad or len(set(todo)) != len(todo):
        raise ValueError(f"members must be distinct indices in [0, {config.n_members}), got {todo}")
    return todo


@dataclass
class _RunInputs:
    """What every member of a run shares: simulator, real cutouts, validation set, init."""

    ts: Any
    bidx: Sequence[int]
    real: Any
    meta0: ModelMeta
    dev: torch.device
    val: tuple[torch.Tensor, torch.Tensor]
    graded: Any = None
    init_members: list[nn.Module] | None = None


def _prepare_run(config: TrainConfig, dev: torch.device) -> _RunInputs:
    """Build the training set, the validation set, graded examples and the initial members."""
    ts = build_training_set(
        config.training_set, stamp_size_pix=config.stamp_size_pix, bands=config.bands
    )
    bidx = band_indices(ts, config.bands)
    real = load_real_cutouts(ts, seed=config.seed)
    meta0 = _meta_template(config, ts.preset.pixel_scale_arcsec)
    val = _validation_set(config, ts, real, bidx, dev)
    return _RunInputs(
        ts=ts,
        bidx=bidx,
        real=real,
        meta0=meta0,
        dev=dev,
        val=val,
        graded=_graded_examples(config),
        init_members=_init_members(config),
    )


def _graded_examples(config: TrainConfig) -> Any:
    """The visually graded candidates to fine-tune on (``config.grades``), or None."""
    if config.grades is None:
        return None
    from lenscan.grades import load_graded_examples

    return load_graded_examples(
        config.grades, bands=config.bands, stamp_size_pix=config.stamp_size_pix,
        normalisation=config.normalisation,
    )  # fmt: skip


def _init_members(config: TrainConfig) -> list[nn.Module] | None:
    """The members of ``config.init_from`` that initialise this run's members, or None."""
    if config.init_from is None:
        return None
    source = load_model(config.init_from)
    if source.meta.runtime != "torch":
        raise ValueError(
            f"init_from {config.init_from!r} is a {source.meta.runtime} export, which cannot be "
            "trained; start from the model it was exported from (training.exported_from)"
        )
    init_members = source.members
    if len(init_members) < config.n_members:
        raise ValueError(
            f"init_from {config.init_from!r} has {len(init_members)} members, "
            f"fewer than n_members={config.n_members}"
        )
    return init_members


def _train_members(
    config: TrainConfig,
    todo: Sequence[int],
    run: _RunInputs,
    *,
    resume: bool,
    progress: bool,
    log_path: Path,
) -> None:
    """Train the members ``todo`` one after the other under one progress bar and log."""
    from tqdm.auto import tqdm

    total = len(todo) * config.steps
    with (
        tqdm(total=total, desc=f"train {config.name}", unit="step", disable=not progress) as bar,
        log_path.open("a") as log,
    ):
        for i in todo:
            _train_member(
                config,
                i,
                meta0=run.meta0,
                ts=run.ts,
                real=run.real,
                bidx=run.bidx,
                dev=run.dev,
                val=run.val,
                init=None if run.init_members is None else run.init_members[i],
                resume=resume,
                bar=bar,
                log=log,
                graded=run.graded,
            )


def _member_step(out: Path, i: int) -> int:
    path = out / "state" / f"member{i}.json"
    return int(json.loads(path.read_text())["step"]) if path.exists() else 0


class _BatchSource(Protocol):
    """Where a member's training batches come from (:class:`_StampSource` or ``GradedMix``)."""

    @property
    def n_simulated(self) -> int:
        """Stamps simulated so far."""
        ...

    def next(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` of one batch."""
        ...


@dataclass
class _MemberProgress:
    """Counters of one member's training, restored from its checkpoint's ``info``."""

    step: int
    n_seen: int
    n_simulated0: int
    best_val_auc: float | None
    #: ``time.perf_counter()`` origin, shifted back by the time spent before a resume.
    t0: float
    running: list[float] = field(default_factory=list)

    @classmethod
    def from_info(cls, info: Mapping[str, Any]) -> _MemberProgress:
        return cls(
            step=int(info.get("step", 0)),
            n_seen=int(info.get("n_seen", 0)),
            n_simulated0=int(info.get("n_simulated", 0)),
            best_val_auc=info.get("best_val_auc"),
            t0=time.perf_counter() - float(info.get("elapsed_s", 0.0)),
        )

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.t0


def _train_member(
    config: TrainConfig,
    i: int,
    *,
    meta0: ModelMeta,
    ts: Any,
    real: Any,
    bidx: Sequence[int],
    dev: torch.device,
    val: tuple[torch.Tensor, torch.Tensor],
    init: nn.Module | None,
    resume: bool,
    bar: Any,
    log: Any,
    graded: Any = None,
) -> None:
    """Train member ``i`` up to ``config.steps``, checkpointing to ``output/state``."""
    seed = config.member_seeds[i]
    amp = config.mixed_precision and dev.type == "cuda"
    model, opt, gen = _member_networks(config, seed, meta0, dev, init)
    state_path = Path(config.output) / "state" / f"member{i}"
    info: dict[str, Any] = {}
    if resume and state_path.with_suffix(".json").exists():
        info = _load_state(state_path, model, opt, gen)
    prog = _MemberProgress.from_info(info)
    bar.update(min(prog.step, config.steps))
    source = _member_source(config, ts, real, bidx, dev, graded)
    rec: dict[str, Any] = {}
    while prog.step < config.steps:
        lr, loss, n = _train_step(config, prog.step, model, opt, source, gen, amp=amp)
        prog.step += 1
        prog.n_seen += n
        prog.running.append(loss)
        bar.update(1)
        last = prog.step == config.steps
        if prog.step % config.val_every == 0 or last:
            rec = _validation_record(config, i, lr, model, val, prog, source)
            log.write(json.dumps(jsonable(rec, "log")) + "\n")
            log.flush()
            bar.set_postfix(member=i, loss=f"{rec['loss']:.3f}", val_auc=f"{rec['val_auc']:.4f}")
        if prog.step % config.checkpoint_every == 0 or last:
            final_auc = rec["val_auc"] if last else None
            info = _checkpoint_info(i, seed, prog, source, final_auc, dev, amp, real)
            _save_state(state_path, model, opt, gen, info)


def _member_networks(
    config: TrainConfig, seed: int, meta0: ModelMeta, dev: torch.device, init: nn.Module | None
) -> tuple[nn.Module, torch.optim.Optimizer, torch.Generator]:
    """A member's network (seeded, or copied from ``init``), its AdamW and its generator."""
    torch.manual_seed(seed)
    model = build_members(meta0, n=1)[0].to(dev)
    if init is not None:
        model.load_state_dict(init.state_dict())
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    gen = torch.Generator(device=dev).manual_seed(seed * 7919 + 17)
    return model, opt, gen


def _member_source(
    config: TrainConfig,
    ts: Any,
    real: Any,
    bidx: Sequence[int],
    dev: torch.device,
    graded: Any,
) -> _BatchSource:
    """Simulated batches, with a share of graded candidates when ``graded`` is given."""
    source = _StampSource(config, ts, real, bidx, dev)
    if graded is None:
        return source
    from lenscan.grades import GradedMix

    return GradedMix(source, graded, config.graded_fraction)


def _train_step(
    config: TrainConfig,
    step: int,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    source: _BatchSource,
    gen: torch.Generator,
    *,
    amp: bool,
) -> tuple[float, float, int]:
    """One optimisation step on one batch; returns ``(lr, loss, stamps)``."""
    lr = _lr_at(step, config)
    for group in opt.param_groups:
        group["lr"] = lr
    x, y = source.next(gen)
    if config.augment:
        x = _augment(x, gen)
    dev_type = x.device.type
    with torch.autocast(device_type=dev_type, dtype=torch.bfloat16, enabled=amp):
        logits = model(x)
    loss = nn.functional.binary_cross_entropy_with_logits(logits.float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return lr, loss.item(), len(y)


def _validation_record(
    config: TrainConfig,
    i: int,
    lr: float,
    model: nn.Module,
    val: tuple[torch.Tensor, torch.Tensor],
    prog: _MemberProgress,
    source: _BatchSource,
) -> dict[str, Any]:
    """Validate member ``i`` and return its log record; resets the running loss."""
    rec = {
        "member": i,
        "step": prog.step,
        "epoch": math.ceil(prog.step / config.val_every),
        "loss": float(np.mean(prog.running)),
        "lr": lr,
        **_validate(model, val[0], val[1], 256),
        "n_seen": prog.n_seen,
        "n_simulated": prog.n_simulated0 + source.n_simulated,
        "elapsed_s": prog.elapsed_s(),
    }
    prog.running = []
    auc = rec["val_auc"]
    prog.best_val_auc = auc if prog.best_val_auc is None else max(prog.best_val_auc, auc)
    return rec


def _checkpoint_info(
    i: int,
    seed: int,
    prog: _MemberProgress,
    source: _BatchSource,
    final_val_auc: float | None,
    dev: torch.device,
    amp: bool,
    real: Any,
) -> dict[str, Any]:
    """The JSON half of a member's checkpoint: counters, provenance and hardware."""
    return {
        "member": i,
        "seed": seed,
        "step": prog.step,
        "n_seen": prog.n_seen,
        "n_simulated": prog.n_simulated0 + source.n_simulated,
        "elapsed_s": prog.elapsed_s(),
        "best_val_auc": prog.best_val_auc,
        "final_val_auc": final_val_auc,
        "hardware": _hardware(dev),
        "mixed_precision": amp,
        "real_cutouts": 0 if real is None else len(real),
    }


def export_model(
    config: TrainConfig,
    *,
    allow_partial: bool = False,
    val_set: tuple[torch.Tensor, torch.Tensor] | None = None,
    stem: str | os.PathLike[str] | None = None,
) -> tuple[Path, ModelMeta]:
    """Assemble the members' latest checkpoints of a run into a lenscan model.

    Parameters
    ----------
    config : TrainConfig
        The run's configuration (``config.output`` holds ``state/member{i}.*``).
    allow_partial : bool
        Accept members that have not reached ``config.steps`` (their steps are recorded).
    val_set : (Tensor, Tensor), optional
        Normalised validation stamps and labels for the ensemble's ``val_auc`` metric.
    stem : path, optional
        Output stem (default ``{output}/{name}``).

    Returns
    -------
    stem, meta : Path, ModelMeta
    """
    ts = build_training_set(
        config.training_set, stamp_size_pix=config.stamp_size_pix, bands=config.bands
    )
    meta0 = _meta_template(config, ts.preset.pixel_scale_arcsec)
    members, infos = _load_member_checkpoints(config, meta0, allow_partial=allow_partial)
    metrics: dict[str, Any] = {}
    if val_set is not None:
        metrics = _validate_ensemble(members, *val_set)
    meta = dataclasses.replace(meta0, training=_training_record(config, infos), metrics=metrics)
    target = Path(config.output) / config.name if stem is None else Path(stem)
    save_model(target, members, meta)
    return target, meta


def _load_member_checkpoints(
    config: TrainConfig, meta0: ModelMeta, *, allow_partial: bool
) -> tuple[list[nn.Module], list[dict[str, Any]]]:
    """Each member's latest weights (in eval mode) and checkpoint ``info``, in member order."""
    members: list[nn.Module] = []
    infos: list[dict[str, Any]] = []
    for i in range(config.n_members):
        path = Path(config.output) / "state" / f"member{i}"
        if not path.with_suffix(".json").exists():
            raise FileNotFoundError(f"{path}.json: member {i} has no checkpoint yet")
        info = json.loads(path.with_suffix(".json").read_text())
        if info["step"] < config.steps and not allow_partial:
            raise ValueError(
                f"{path}.json: member {i} is at step {info['step']} of {config.steps}; "
                "finish training or pass allow_partial=True"
            )
        tensors = load_file(str(path.with_suffix(".safetensors")))
        model = build_members(meta0, n=1)[0]
        model.load_state_dict(
            {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True
        )
        members.append(model.eval())
        infos.append(info)
    return members, infos


def _training_record(config: TrainConfig, infos: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The model's ``training`` provenance: config, seeds, data sizes, wall time, hardware."""
    member_info = [
        {
            k: info.get(k)
            for k in ("seed", "step", "n_seen", "n_simulated", "elapsed_s", "final_val_auc")
        }
        for info in infos
    ]
    training: dict[str, Any] = {
        "config": config.to_dict(),
        "seeds": list(config.member_seeds),
        "steps_per_member": [info["step"] for info in infos],
        "batch_size": config.batch_size,
        "stamps_seen_per_member": [info["n_seen"] for info in infos],
        "stamps_simulated_per_member": [info["n_simulated"] for info in infos],
        "val_size": config.val_size,
        "val_seed": config.val_seed,
        "members": member_info,
        "wall_time_s": sum(float(info["elapsed_s"]) for info in infos),
        "hardware": infos[0].get("hardware"),
        "mixed_precision": infos[0].get("mixed_precision"),
        "real_cutouts": infos[0].get("real_cutouts"),
        "lenscan_version": __version__,
        "trained_on": "simulations (lenscan.simulate)",
    }
    if config.grades is not None:
        from lenscan.grades import file_sha256

        training["trained_on"] += " and visually graded survey candidates"
        training["grades"] = {"file": config.grades, "sha256": file_sha256(config.grades)}
    return training


def _validate_ensemble(
    members: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor
) -> dict[str, Any]:
    probs = []
    with torch.inference_mode():
        for m in members:
            m.eval()
            probs.append(
                torch.cat([torch.sigmoid(m(x[i : i + 256]).float()) for i in range(0, len(x), 256)])
            )
    mean = torch.stack(probs).mean(0).numpy()
    return {"val_auc": roc_auc(y.numpy().astype(int), mean), "val_size": len(y)}


# --------------------------------------------------------------------------------------
# CLI helpers (wired into ``lenscan train`` by lenscan.cli)
# --------------------------------------------------------------------------------------
def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``lenscan train`` arguments to ``parser``."""
    parser.add_argument("config", help="training config YAML (see workflows/train-*.yaml)")
    parser.add_argument("--output", default=None, help="run directory (overrides the config)")
    parser.add_argument("--steps", type=int, default=None, help="steps per member (overrides)")
    parser.add_argument("--device", default=None, choices=_DEVICES, help="training device")
    parser.add_argument("--fresh", action="store_true", help="ignore existing checkpoints")
    parser.add_argument(
        "--members",
        type=int,
        nargs="+",
        default=None,
        help="train only these ensemble members (run one process per member in parallel)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--grades", default=None, help="merged grades (lenscan grades merge) to fine-tune on"
    )


def run_train_cli(
    args: argparse.Namespace,
    after_export: Callable[[Path, TrainConfig, str, bool], dict[str, Any]] | None = None,
) -> int:
    """Run ``lenscan train`` from parsed arguments; prints where the model went, returns 0."""
    config = TrainConfig.from_yaml(
        args.config, output=args.output, steps=args.steps, device=args.device, grades=args.grades
    )
    result = train(
        config,
        resume=not args.fresh,
        progress=not args.no_progress,
        members=args.members,
        after_export=after_export,
    )
    if result.model_path is None or result.meta is None:
        print(
            f"members trained to steps {result.steps_per_member} of {config.steps}; run again "
            "without --members (or after the other members finish) to write the model"
        )
        return 0
    print(f"model written to {result.model_path}.safetensors (+ .json)")
    print(f"training log: {result.log_path}; wall time {result.wall_time_s:.0f} s")
    print(f"validation AUC (ensemble): {result.meta.metrics.get('val_auc'):.4f}")
    if result.evaluation is not None:
        print(f"held-out AUC: {result.evaluation['auc']:.4f}")
    return 0
