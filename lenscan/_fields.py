"""One check for every config and metadata loader: plain data in, only known fields allowed."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


def known_fields(cls: type, data: Any, *, what: str, source: str | None = None) -> dict[str, Any]:
    """Return ``data`` as a dict, refusing non-mappings and keys that are not fields of ``cls``.

    Parameters
    ----------
    cls : dataclass type
        The config or metadata class.
    data : mapping
        Plain data (from YAML or JSON).
    what : str
        What the keys are, for messages (``"training options"``, ``"scan config fields"``).
    source : str, optional
        The file the data came from; prefixes the message.
    """
    prefix = f"{source}: " if source else ""
    if not isinstance(data, Mapping):
        raise ValueError(f"{prefix}{what} must be a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{prefix}unknown {what} {unknown}; known: {sorted(names)}")
    return dict(data)
