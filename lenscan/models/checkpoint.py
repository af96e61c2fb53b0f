"""Model checkpoints: safetensors weights plus JSON metadata, never a pickle.

A lenscan model is an ensemble of ``n_members`` networks of one architecture stored as

- ``{stem}.safetensors``: every member's ``state_dict`` in one file, keys ``m{i}.{param}``;
- ``{stem}.json``: :class:`ModelMeta` (architecture, bands, stamp size, pixel scale, normalisation,
  training provenance, metrics) plus the SHA-256 of the weights file.

The preprocessing travels with the weights: scoring normalises stamps with
``meta.normalisation`` through :func:`lenscan.stamps.normalise_stamps`, exactly as training did.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from lenscan._device import resolve_device
from lenscan._fields import known_fields
from lenscan._io import atomic_write_bytes
from lenscan._json import json_document_bytes, jsonable
from lenscan._version import __version__
from lenscan.metrics import threshold_for_false_rate
from lenscan.models.architectures import create_model, is_architecture_name, list_architectures
from lenscan.models.registry import RUNTIME_SUFFIXES, resolve_model_files
from lenscan.models.runtimes import export_bytes, load_exported
from lenscan.stamps import normalise_stamps, validate_normalisation

__all__ = [
    "FORMAT_VERSION",
    "LensModel",
    "ModelMeta",
    "build_members",
    "check_compatible",
    "combine_models",
    "export_model",
    "load_model",
    "read_model_meta",
    "save_model",
]

#: Version of the checkpoint layout written by :func:`save_model`.
FORMAT_VERSION = 1

_SAFETENSORS_FORMAT = "lenscan-model"


@dataclass(frozen=True)
class ModelMeta:
    """Metadata of a lenscan model, validated on construction.

    Parameters
    ----------
    name : str
        Model name (the bundled name, e.g. ``"lenscan-des-v1"``).
    architecture : str
        Registered architecture (see :func:`lenscan.models.list_architectures`).
    arch_kwargs : dict
        Options passed to the architecture factory.
    bands : tuple of str
        Input bands in channel order, lower-case (e.g. ``("g", "r", "i")``).
    stamp_size_pix : int
        Stamp side in pixels; the scan cuts stamps of this size.
    pixel_scale_arcsec : float
        Pixel scale the model was trained at.
    normalisation : dict
        Stamp normalisation spec (see :func:`lenscan.stamps.validate_normalisation`).
    n_members : int
        Number of ensemble members in the weights file.
    output : str
        What the networks output; only ``"logit"`` (one per stamp; probability = sigmoid).
    training : dict
        Training provenance (config, seeds, data sizes, steps, wall time, hardware).
    metrics : dict
        Evaluation metrics on held-out simulations.
    format_version : int
        Checkpoint format version; only :data:`FORMAT_VERSION` is understood.
    lenscan_version : str
        lenscan version that wrote the model.
    description : str
        Free text.
    runtime : str
        How the weights file is run: ``"torch"`` (safetensors weights of ``architecture``, the
        default), or a self-contained export: ``"export"`` (.pt2), ``"onnx"``, ``"torchscript"``
        (see :mod:`lenscan.models.runtimes`). For an export, ``architecture`` only records what
        the graph was made from.
    card : dict
        The model card: ``training_data``, ``metrics`` (on check sets), ``intended_use``,
        ``limitations``, ``licence``, ``citation``, ``authors``... (free-form JSON; shown by
        ``lenscan models show`` and recorded in each scan's ``run.json``).
    """

    name: str
    architecture: str
    arch_kwargs: dict[str, Any]
    bands: tuple[str, ...]
    stamp_size_pix: int
    pixel_scale_arcsec: float
    normalisation: dict[str, Any]
    n_members: int
    output: str = "logit"
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    lenscan_version: str = __version__
    description: str = ""
    runtime: str = "torch"
    card: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen dataclass: normalise fields in place once
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"model name must be a non-empty string, got {self.name!r}")
        if any(c in self.name for c in "/\\") or self.name.startswith("."):
            raise ValueError(f"model name {self.name!r} must not contain path separators")
        if self.runtime not in RUNTIME_SUFFIXES:
            raise ValueError(
                f"model {self.name!r}: unknown runtime {self.runtime!r}; "
                f"known: {sorted(RUNTIME_SUFFIXES)}"
            )
        if not isinstance(self.architecture, str) or not self.architecture:
            raise ValueError(f"model {self.name!r}: architecture must be a non-empty string")
        if self.runtime == "torch" and not is_architecture_name(self.architecture):
            raise ValueError(
                f"model {self.name!r}: unknown architecture {self.architecture!r}; "
                f"known: {list_architectures()}, 'timm:<model>' or 'package.module:factory'"
            )
        if not isinstance(self.arch_kwargs, Mapping):
            raise TypeError(f"model {self.name!r}: arch_kwargs must be a mapping")
        set_(self, "arch_kwargs", jsonable(dict(self.arch_kwargs), "arch_kwargs"))
        if isinstance(self.bands, str) or not isinstance(self.bands, Sequence):
            raise TypeError(f"model {self.name!r}: bands must be a sequence of band names")
        bands = tuple(self.bands)
        if not bands or any(not isinstance(b, str) or not b or b != b.lower() for b in bands):
            raise ValueError(
                f"model {self.name!r}: bands must be non-empty lower-case strings, got {bands}"
            )
        if len(set(bands)) != len(bands):
            raise ValueError(f"model {self.name!r}: duplicate bands in {bands}")
        set_(self, "bands", bands)
        size = self.stamp_size_pix
        if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 8:
            raise ValueError(f"model {self.name!r}: stamp_size_pix must be an int >= 8, got {size}")
        set_(self, "stamp_size_pix", int(size))
        scale = float(self.pixel_scale_arcsec)
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"model {self.name!r}: pixel_scale_arcsec must be > 0, got {scale}")
        set_(self, "pixel_scale_arcsec", scale)
        set_(self, "normalisation", validate_normalisation(self.normalisation))
        nm = self.n_members
        if isinstance(nm, bool) or not isinstance(nm, int | np.integer) or nm < 1:
            raise ValueError(f"model {self.name!r}: n_members must be an int >= 1, got {nm}")
        set_(self, "n_members", int(nm))
        if self.output != "logit":
            raise ValueError(f"model {self.name!r}: output must be 'logit', got {self.output!r}")
        for key in ("training", "metrics", "card"):
            value = getattr(self, key)
            if not isinstance(value, Mapping):
                raise TypeError(f"model {self.name!r}: {key} must be a mapping")
            set_(self, key, jsonable(dict(value), key))
        if self.format_version != FORMAT_VERSION:
            raise ValueError(
                f"model {self.name!r}: checkpoint format_version {self.format_version!r} is not "
                f"supported by lenscan {__version__} (supports {FORMAT_VERSION}); "
                "upgrade lenscan or re-export the model"
            )
        if not isinstance(self.lenscan_version, str) or not isinstance(self.description, str):
            raise TypeError(f"model {self.name!r}: lenscan_version and description are strings")

    @property
    def recommended_threshold(self) -> float:
        """The score threshold recorded with the model (``metrics``), 0.5 without one."""
        return float((self.metrics or {}).get("recommended_threshold", 0.5))

    def threshold_for_false_rate(self, false_per_1000: float) -> float:
        """The threshold letting ``false_per_1000`` false candidates per 1000 scored non-lenses.

        Read from the calibration curve recorded with the model (``metrics
        ["calibration_curve"]``, written by ``benchmarks/recall_bundled.py --calibrate
        --record``): the lowest threshold whose pooled false rate on the calibration surveys
        is at most ``false_per_1000``.

        Raises
        ------
        ValueError
            If the model has no calibration curve, or the rate lies beyond it.
        """
        curve = (self.metrics or {}).get("calibration_curve")
        if not curve:
            raise ValueError(
                f"model {self.name!r} has no calibration curve (metrics['calibration_curve']): "
                "give a threshold instead of a false rate, or calibrate the model with "
                "benchmarks/recall_bundled.py --calibrate --record"
            )
        try:
            return threshold_for_false_rate(curve, false_per_1000)
        except ValueError as exc:
            raise ValueError(f"model {self.name!r}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """Return the metadata as plain JSON types."""
        d = dataclasses.asdict(self)
        d["bands"] = list(self.bands)
        return d

    def to_json(self) -> str:
        """Serialise to indented JSON (strict: no NaN)."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "metadata") -> ModelMeta:
        """Build from a mapping, refusing unknown or missing keys (``source`` names the file)."""
        data = known_fields(cls, data, what="model metadata keys", source=source)
        required = {
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        missing = sorted(required - set(data))
        if missing:
            raise ValueError(f"{source}: model metadata lacks required keys {missing}")
        if "format_version" not in data:
            raise ValueError(f"{source}: model metadata has no format_version")
        try:
            return cls(**dict(data))
        except (TypeError, ValueError) as err:
            raise type(err)(f"{source}: {err}") from err

    @classmethod
    def from_json(cls, text: str, *, source: str = "metadata") -> ModelMeta:
        """Parse JSON text written by :meth:`to_json`."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{source}: model metadata is not valid JSON ({err})") from err
        return cls.from_dict(data, source=source)


def save_model(
    path_stem: str | os.PathLike[str], members: Sequence[nn.Module], meta: ModelMeta
) -> tuple[Path, Path]:
    """Write an ensemble to ``{path_stem}.safetensors`` and ``{path_stem}.json``.

    Parameters
    ----------
    path_stem : str or path-like
        Output path without suffix (a ``.safetensors``/``.json`` suffix is stripped).
    members : sequence of nn.Module
        The ensemble members, all of ``meta.architecture``.
    meta : ModelMeta
        Metadata; ``meta.n_members`` must equal ``len(members)``.

    Returns
    -------
    weights, metadata : Path
        The two files written. The weights are written first and the metadata (which records the
        weights' SHA-256) last, each via a temporary file and an atomic rename.
    """
    if not isinstance(meta, ModelMeta):
        raise TypeError(f"meta must be a ModelMeta, got {type(meta).__name__}")
    members = list(members)
    if len(members) != meta.n_members:
        raise ValueError(f"meta.n_members={meta.n_members} but {len(members)} members were given")
    stem = Path(path_stem).expanduser()
    if stem.suffix in (".safetensors", ".json"):
        stem = stem.with_suffix("")
    weights = stem.with_name(stem.name + ".safetensors")
    meta_path = stem.with_name(stem.name + ".json")
    data = st_save(
        _member_tensors(members),
        metadata={"format": _SAFETENSORS_FORMAT, "format_version": str(FORMAT_VERSION)},
    )
    atomic_write_bytes(str(weights), data)
    doc = meta.to_dict()
    doc["weights_sha256"] = hashlib.sha256(data).hexdigest()
    atomic_write_bytes(str(meta_path), json_document_bytes(doc))
    return weights, meta_path


def _member_tensors(members: Sequence[nn.Module]) -> dict[str, torch.Tensor]:
    """Every member's ``state_dict`` in one mapping, keys ``m{i}.{param}``, on the CPU."""
    tensors: dict[str, torch.Tensor] = {}
    for i, member in enumerate(members):
        if not isinstance(member, nn.Module):
            raise TypeError(f"member {i} is a {type(member).__name__}, not a torch.nn.Module")
        for key, value in member.state_dict().items():
            # clone: safetensors refuses tensors that share storage.
            tensors[f"m{i}.{key}"] = value.detach().to("cpu").contiguous().clone()
    return tensors


class LensModel:
    """A loaded ensemble: metadata, weights hash and member networks in eval mode.

    Build with :func:`load_model`. Score *normalised* stamps with :meth:`score` (use
    :meth:`normalise` on raw stamps first, which applies the model's own normalisation).

    ``members`` holds the member networks (logits ``(N,)`` each) for the ``torch`` runtime, and
    the one exported graph (logits ``(N, n_members)``) for the others.
    """

    def __init__(
        self,
        meta: ModelMeta,
        members: Sequence[nn.Module],
        *,
        sha256: str,
        path: Path | None,
        device: torch.device | None = None,
    ) -> None:
        expected = meta.n_members if meta.runtime == "torch" else 1
        if len(members) != expected:
            raise ValueError(f"model {meta.name!r}: expected {expected} member networks")
        self.meta = meta
        self.sha256 = sha256
        self.path = path
        exported = meta.runtime != "torch"  # exported graphs are inference-only already
        self.members = list(members) if exported else [m.eval() for m in members]
        self.device = device or _module_device(self.members[0])
        self._raw: bytes | None = None  # an exported model's bytes (to rebuild it elsewhere)

    @property
    def name(self) -> str:
        """The model's name."""
        return self.meta.name

    def __repr__(self) -> str:
        return (
            f"LensModel(name={self.name!r}, architecture={self.meta.architecture!r}, "
            f"n_members={self.meta.n_members}, bands={self.meta.bands}, "
            f"stamp_size_pix={self.meta.stamp_size_pix}, sha256={self.sha256[:12]}...)"
        )

    def to(self, device: str | torch.device) -> LensModel:
        """Move the members to ``device`` (``"auto"``, ``"cpu"``, ``"cuda"``...); returns self."""
        dev = resolve_device(device)
        if self.meta.runtime != "torch" and self._raw is not None:
            self.members = [load_exported(self.meta.runtime, self._raw, dev)]
        else:
            self.members = [m.to(dev).eval() for m in self.members]
        self.device = dev
        return self

    def logits(self, normalised: torch.Tensor) -> torch.Tensor:
        """Every member's logit, ``(N, n_members)``, of normalised stamps on :attr:`device`."""
        if self.meta.runtime == "torch":
            return torch.stack([m(normalised) for m in self.members], dim=1)
        return self.members[0](normalised)

    def normalise(self, stamps: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Normalise raw stamps ``(N, B, S, S)`` (counts, NaN off the tile) for :meth:`score`."""
        return normalise_stamps(stamps, self.meta.normalisation)

    def score(
        self,
        normalised: torch.Tensor | np.ndarray,
        *,
        batch_size: int = 512,
        dihedral: bool = False,
    ) -> torch.Tensor:
        """Lens probabilities of every member for normalised stamps.

        Parameters
        ----------
        normalised : Tensor or ndarray, shape (N, B, S, S)
            Stamps normalised with :meth:`normalise`, bands in ``meta.bands`` order.
        batch_size : int
            Stamps per forward pass.
        dihedral : bool
            Test-time augmentation: average each member's probability over the 8 flips and
            90-degree rotations of every stamp (8x the compute). Lens images have no preferred
            orientation, so this only averages out orientation-dependent noise of the network.

        Returns
        -------
        Tensor of float32, shape (N, n_members), on the CPU
            ``sigmoid(logit)`` of each member, in [0, 1].
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        x = torch.as_tensor(normalised)
        b, s = len(self.meta.bands), self.meta.stamp_size_pix
        if x.ndim != 4 or tuple(x.shape[1:]) != (b, s, s):
            raise ValueError(
                f"model {self.name!r} scores stamps of shape (N, {b}, {s}, {s}) "
                f"(bands {self.meta.bands}), got {tuple(x.shape)}"
            )
        out = torch.empty((x.shape[0], self.meta.n_members), dtype=torch.float32)
        with torch.inference_mode():
            for start in range(0, x.shape[0], batch_size):
                chunk = x[start : start + batch_size].to(self.device, torch.float32)
                views = _dihedral_views(chunk) if dihedral else [chunk]
                probs = [torch.sigmoid(self.logits(v).float()) for v in views]
                out[start : start + len(chunk)] = torch.stack(probs).mean(0).cpu()
        return out

    def score_mean(
        self, normalised: torch.Tensor | np.ndarray, *, batch_size: int = 512
    ) -> torch.Tensor:
        """Ensemble-mean lens probability, shape ``(N,)`` (see :meth:`score`)."""
        return self.score(normalised, batch_size=batch_size).mean(dim=1)


def _module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (CPU for one without, e.g. ONNX)."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return getattr(module, "device", torch.device("cpu"))


def _dihedral_views(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 images of ``(N, B, S, S)`` stamps under the dihedral group of the square."""
    rotations = [torch.rot90(x, k, dims=(-2, -1)) for k in range(4)]
    return rotations + [torch.flip(r, dims=(-1,)) for r in rotations]


def build_members(meta: ModelMeta, *, n: int | None = None) -> list[nn.Module]:
    """Create freshly initialised member networks for ``meta`` (``n`` defaults to n_members)."""
    count = meta.n_members if n is None else n
    return [
        create_model(
            meta.architecture,
            in_chans=len(meta.bands),
            stamp_size_pix=meta.stamp_size_pix,
            **meta.arch_kwargs,
        )
        for _ in range(count)
    ]


def combine_models(
    models: Sequence[LensModel], *, name: str, description: str = ""
) -> tuple[list[nn.Module], ModelMeta]:
    """Pool the members of several models into one larger ensemble.

    The models must agree on everything that defines a member's input and output (architecture
    and its options, bands, stamp size, pixel scale, normalisation). Their training records are
    kept (the first on top, all under ``combined_from``); metrics are dropped, since they
    describe the old ensembles: evaluate the result (``lenscan evaluate ... --record``).

    Returns
    -------
    members, meta
        Ready for :func:`save_model`.
    """
    if len(models) < 2:
        raise ValueError("combine_models needs at least two models")
    first = models[0].meta
    keys = ("architecture", "arch_kwargs", "bands", "stamp_size_pix", "pixel_scale_arcsec",
            "normalisation", "runtime")  # fmt: skip
    if first.runtime != "torch":
        raise ValueError(f"cannot combine {first.name!r}: a {first.runtime} export has no members")
    for model in models[1:]:
        diff = [k for k in keys if getattr(model.meta, k) != getattr(first, k)]
        if diff:
            raise ValueError(
                f"cannot combine {first.name!r} and {model.meta.name!r}: they differ in {diff}"
            )
    members = [m for model in models for m in model.members]
    meta = dataclasses.replace(
        first,
        name=name,
        n_members=len(members),
        description=description or first.description,
        # The first model's record stays on top (evaluation reads its training-set config);
        # every source model's record is kept under "combined_from".
        training={
            **first.training,
            "combined_from": [
                {
                    "name": m.meta.name,
                    "sha256": m.sha256,
                    "n_members": m.meta.n_members,
                    "training": m.meta.training,
                }
                for m in models
            ],
        },
        metrics={},
    )
    return members, meta


def read_model_meta(name_or_path: str | os.PathLike[str]) -> ModelMeta:
    """Read and validate only the metadata of a model (no weights loaded)."""
    _, meta_path = resolve_model_files(name_or_path)
    doc = _read_meta_doc(meta_path)
    doc.pop("weights_sha256", None)
    return ModelMeta.from_dict(doc, source=str(meta_path))


def _read_meta_doc(meta_path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{meta_path}: model metadata is not valid JSON ({err})") from err
    if not isinstance(doc, dict):
        raise ValueError(f"{meta_path}: model metadata must be a JSON object")
    return doc


def load_model(
    name_or_path: str | os.PathLike[str] | LensModel, *, device: str | torch.device = "cpu"
) -> LensModel:
    """Load a model by bundled name or path; never unpickles anything.

    Parameters
    ----------
    name_or_path : str, path-like or LensModel
        A bundled model name (:func:`lenscan.models.list_bundled_models`), or the path of a
        model's stem / ``.safetensors`` / ``.json`` file. A :class:`LensModel` is returned as is
        (moved to ``device``).
    device : str or torch.device
        ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"auto"``.

    Returns
    -------
    LensModel

    Raises
    ------
    FileNotFoundError
        If the model or one of its two files is missing.
    ValueError
        If the metadata is invalid or of another format version, the weights file is corrupt or
        does not match the metadata's hash, or tensors are missing or unexpected.

    Examples
    --------
    Score raw stamps (counts, bands in the model's order) with the bundled model:

    >>> import numpy as np
    >>> model = load_model("lenscan-des-v2")
    >>> model.meta.bands, model.meta.stamp_size_pix, model.meta.n_members
    (('g', 'r', 'i'), 48, 2)
    >>> raw = np.random.default_rng(0).normal(0.0, 1.0, (5, 3, 48, 48)).astype(np.float32)
    >>> probs = model.score(model.normalise(raw))  # one probability per stamp and member
    >>> tuple(probs.shape), bool(((probs >= 0) & (probs <= 1)).all())
    ((5, 2), True)
    """
    if isinstance(name_or_path, LensModel):
        return name_or_path.to(device)
    dev = resolve_device(device)
    weights_path, meta_path = resolve_model_files(name_or_path)
    doc = _read_meta_doc(meta_path)
    expected_sha = doc.pop("weights_sha256", None)
    meta = ModelMeta.from_dict(doc, source=str(meta_path))
    raw = weights_path.read_bytes()
    sha = hashlib.sha256(raw).hexdigest()
    if expected_sha is not None and sha != expected_sha:
        raise ValueError(
            f"{weights_path}: SHA-256 {sha[:16]}... does not match {expected_sha[:16]}... recorded "
            f"in {meta_path}; the weights file is corrupt or belongs to another model"
        )
    if meta.runtime != "torch":
        return _load_exported_model(meta, raw, sha, weights_path, dev)
    try:
        tensors = st_load(raw)
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise ValueError(f"{weights_path}: not a readable safetensors file ({err})") from err
    members = _members_from_tensors(tensors, meta, weights_path, meta_path)
    for member in members:
        member.to(dev).eval()
    return LensModel(meta, members, sha256=sha, path=weights_path)


def _load_exported_model(
    meta: ModelMeta, raw: bytes, sha: str, weights_path: Path, dev: torch.device
) -> LensModel:
    try:
        graph = load_exported(meta.runtime, raw, dev)
    except ImportError:  # a missing runtime package: its message says what to install
        raise
    except Exception as err:  # each runtime has its own parse errors
        raise ValueError(f"{weights_path}: not a readable {meta.runtime} model ({err})") from err
    model = LensModel(meta, [graph], sha256=sha, path=weights_path, device=dev)
    model._raw = raw
    return model


def export_model(
    model: str | os.PathLike[str] | LensModel, path_stem: str | os.PathLike[str], fmt: str
) -> tuple[Path, Path]:
    """Write a model as one self-contained graph (see :mod:`lenscan.models.runtimes`).

    Parameters
    ----------
    model : str, path-like or LensModel
        A ``torch``-runtime model (bundled name or path).
    path_stem : str or path-like
        Output path without suffix; writes ``{stem}.pt2``/``.onnx``/``.pt`` and ``{stem}.json``.
    fmt : {"export", "onnx", "torchscript"}

    Returns
    -------
    weights, metadata : Path
        The two files written (metadata last, recording the graph's SHA-256).
    """
    source = load_model(model, device="cpu")
    if source.meta.runtime != "torch":
        raise ValueError(f"model {source.name!r} is already a {source.meta.runtime} export")
    size, bands = source.meta.stamp_size_pix, len(source.meta.bands)
    example = source.normalise(torch.randn(2, bands, size, size))
    data = export_bytes(source.members, example, fmt)
    stem = Path(path_stem).expanduser()
    if stem.suffix in (*RUNTIME_SUFFIXES.values(), ".json"):
        stem = stem.with_suffix("")
    weights = stem.with_name(stem.name + RUNTIME_SUFFIXES[fmt])
    meta_path = stem.with_name(stem.name + ".json")
    training = {**source.meta.training, "exported_from": {"sha256": source.sha256,
                                                          "runtime": "torch"}}  # fmt: skip
    meta = dataclasses.replace(source.meta, runtime=fmt, training=training)
    atomic_write_bytes(str(weights), data)
    doc = meta.to_dict()
    doc["weights_sha256"] = hashlib.sha256(data).hexdigest()
    atomic_write_bytes(str(meta_path), json_document_bytes(doc))
    return weights, meta_path


def _members_from_tensors(
    tensors: Mapping[str, torch.Tensor], meta: ModelMeta, weights_path: Path, meta_path: Path
) -> list[nn.Module]:
    """Build ``meta``'s members and load their ``m{i}.*`` tensors, refusing any mismatch."""
    members = build_members(meta)
    used: set[str] = set()
    for i, member in enumerate(members):
        prefix = f"m{i}."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        used.update(prefix + k for k in state)
        wanted = set(member.state_dict())
        missing = sorted(wanted - set(state))
        unexpected = sorted(set(state) - wanted)
        if missing or unexpected:
            raise ValueError(
                f"{weights_path}: member {i} does not match architecture "
                f"{meta.architecture!r} {meta.arch_kwargs}: missing tensors {missing[:5]}, "
                f"unexpected tensors {unexpected[:5]}"
            )
        try:
            member.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(f"{weights_path}: member {i}: {err}") from err
    extra = sorted(set(tensors) - used)
    if extra:
        raise ValueError(
            f"{weights_path}: unexpected tensors {extra[:5]} (metadata {meta_path} says "
            f"n_members={meta.n_members})"
        )
    return members


def check_compatible(
    meta: ModelMeta | LensModel,
    *,
    bands: Sequence[str],
    pixel_scale_arcsec: float | None = None,
    rtol: float = 0.01,
) -> tuple[int, ...]:
    """Check that a survey can feed a model, before a scan starts.

    Parameters
    ----------
    meta : ModelMeta or LensModel
        The model (or its metadata).
    bands : sequence of str
        The survey's bands, in the survey's channel order.
    pixel_scale_arcsec : float, optional
        The survey's pixel scale; checked against the model's within ``rtol`` when given.
    rtol : float
        Relative tolerance on the pixel scale.

    Returns
    -------
    tuple of int
        For each model band, its index in ``bands`` (to select and order the survey's channels).

    Raises
    ------
    ValueError
        If the survey lacks one of the model's bands or has another pixel scale.
    """
    if isinstance(meta, LensModel):
        meta = meta.meta
    if isinstance(bands, str):
        raise TypeError(f"bands must be a sequence of band names, not the string {bands!r}")
    survey_bands = [str(b) for b in bands]
    missing = [b for b in meta.bands if b not in survey_bands]
    if missing:
        raise ValueError(
            f"model {meta.name!r} needs bands {list(meta.bands)} but the survey has "
            f"{survey_bands} (missing {missing}); use a model trained on the survey's bands "
            "(see `lenscan train`)"
        )
    if pixel_scale_arcsec is not None:
        scale = float(pixel_scale_arcsec)
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"survey pixel_scale_arcsec must be > 0, got {pixel_scale_arcsec}")
        if abs(scale - meta.pixel_scale_arcsec) > rtol * meta.pixel_scale_arcsec:
            raise ValueError(
                f"model {meta.name!r} was trained at {meta.pixel_scale_arcsec:g} arcsec/pixel but "
                f"the survey has {scale:g} arcsec/pixel; retrain for this survey "
                "(see `lenscan train`) or resample the images"
            )
    return tuple(survey_bands.index(b) for b in meta.bands)
