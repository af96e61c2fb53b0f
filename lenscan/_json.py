"""Plain-JSON conversion shared by the checkpoint, training and evaluation records."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["json_document_bytes", "jsonable"]


def jsonable(value: Any, where: str) -> Any:
    """Return ``value`` as plain JSON types; non-finite floats become None (JSON has no NaN).

    ``where`` names the value in the error raised for anything that is not a JSON value.

    >>> jsonable({"auc": np.float32(0.5), "n": np.int64(3), "bad": float("nan")}, "metrics")
    {'auc': 0.5, 'n': 3, 'bad': None}
    """
    if isinstance(value, Mapping):
        return {str(k): jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        v = float(value)
        return v if math.isfinite(v) else None
    if value is None or isinstance(value, str):
        return value
    raise TypeError(f"model metadata {where} holds a {type(value).__name__}, not a JSON value")


def json_document_bytes(doc: Any) -> bytes:
    """Indented strict JSON (no NaN) with a final newline, as the bytes of a file.

    >>> json_document_bytes({"a": 1})
    b'{\\n  "a": 1\\n}\\n'
    """
    return (json.dumps(doc, indent=2, allow_nan=False) + "\n").encode()
