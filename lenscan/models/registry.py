"""Registry of the models bundled with lenscan and resolution of model names to files.

A model is two files with a common stem: ``{stem}.json`` (metadata, see
:class:`lenscan.models.checkpoint.ModelMeta`) and its weights, ``{stem}.safetensors`` or, for a
self-contained export, ``{stem}.pt2`` / ``.onnx`` / ``.pt`` (the metadata's ``runtime`` says
which). A bundled model is addressed by its name (the stem of its files in
``lenscan/models/bundled/``); any other model by a path to its stem, weights or ``.json`` file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = [
    "BUNDLED_DIR",
    "DEFAULT_MODEL",
    "RUNTIME_SUFFIXES",
    "list_bundled_models",
    "resolve_model_files",
]

#: Directory holding the models shipped with the package.
BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"

#: Name of the bundled ensemble used when no model is given.
DEFAULT_MODEL = "lenscan-des-v3"

_META_SUFFIX = ".json"
#: Weights-file suffix of each model runtime (see :mod:`lenscan.models.runtimes`).
RUNTIME_SUFFIXES = {
    "torch": ".safetensors",
    "export": ".pt2",
    "onnx": ".onnx",
    "torchscript": ".pt",
}


def list_bundled_models() -> list[str]:
    """Return the names of the bundled models (both files present), sorted."""
    if not BUNDLED_DIR.is_dir():
        return []
    return sorted(
        p.stem
        for p in BUNDLED_DIR.glob(f"*{_META_SUFFIX}")
        if any(p.with_suffix(suffix).is_file() for suffix in RUNTIME_SUFFIXES.values())
    )


def resolve_model_files(name_or_path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Find the weights and metadata files of a model.

    Parameters
    ----------
    name_or_path : str or path-like
        A bundled model name (see :func:`list_bundled_models`), or the path of a model's stem,
        ``.safetensors`` file or ``.json`` file.

    Returns
    -------
    weights, meta : Path
        The weights file (suffix from the metadata's ``runtime``) and ``{stem}.json``. Both exist.

    Raises
    ------
    FileNotFoundError
        If neither a bundled model nor the files exist; the message lists the bundled models.
    """
    if not isinstance(name_or_path, str | os.PathLike):
        raise TypeError(f"model must be a name or a path, got {type(name_or_path).__name__}")
    text = os.fspath(name_or_path)
    if not text:
        raise ValueError("model name or path is empty")
    bundled = list_bundled_models()
    suffixes = (*RUNTIME_SUFFIXES.values(), _META_SUFFIX)
    looks_like_path = os.sep in text or "/" in text or text.endswith(suffixes)
    if not looks_like_path and text in bundled:
        stem = BUNDLED_DIR / text
    else:
        path = Path(text).expanduser()
        stem = path.with_suffix("") if path.suffix in suffixes else path
        if not looks_like_path and not stem.with_name(stem.name + _META_SUFFIX).exists():
            raise FileNotFoundError(
                f"no model named {text!r}: bundled models are {bundled or 'none'}; "
                "or give the path of a model's .json (or weights) file"
            )
    meta = stem.with_name(stem.name + _META_SUFFIX)
    if not meta.is_file():
        raise FileNotFoundError(
            f"model metadata file {meta} not found; a lenscan model is a weights file "
            "(.safetensors, .pt2, .onnx or .pt) plus a .json metadata file with the same stem"
        )
    weights = stem.with_name(stem.name + _weights_suffix(meta))
    if not weights.is_file():
        raise FileNotFoundError(f"model weights file {weights} not found (metadata: {meta})")
    return weights, meta


def _weights_suffix(meta_path: Path) -> str:
    """The weights suffix of the runtime a metadata file names (``torch`` when it names none)."""
    try:
        runtime = json.loads(meta_path.read_text()).get("runtime", "torch")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return RUNTIME_SUFFIXES["torch"]  # the metadata's own reader reports what is wrong
    return RUNTIME_SUFFIXES.get(runtime, RUNTIME_SUFFIXES["torch"])
