"""The trained model as a web service (``lenscan serve``, extra ``lenscan[serve]``).

- ``GET /health``, ``GET /models``: liveness, counters, and each model's bands, stamp size,
  pixel scale, normalisation, recommended threshold, provenance and SHA-256;
- ``POST /score``: stamps as JSON arrays or a ``.npy``/FITS upload; per-member and ensemble
  scores;
- ``POST /score/positions`` (with a survey): sky positions or catalogue ids, cut from the store
  exactly as the scan cuts them, scored, with their tile and edge flag.

Requests are checked (bands, stamp size, finite pixels, positions inside the survey, body size,
readable files) and refused with a 4xx and a message; concurrent requests are batched onto each
model by one scoring loop. See ``docs/service.md``.

>>> from lenscan.serve import ServeConfig, create_app
>>> config = ServeConfig(models=["lenscan-des-v1"], survey_url="des.zarr")
>>> app = create_app(config)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lenscan.serve.cli import add_serve_arguments, run_serve_cli
    from lenscan.serve.config import ServeConfig

__all__ = ["ServeConfig", "add_serve_arguments", "create_app", "run_serve_cli"]

# Imported on first use: the JSON parser process imports lenscan.serve.jsonbody, and must not
# load torch (lenscan.serve.config imports lenscan.models) on the way.
_LAZY = {
    "ServeConfig": "lenscan.serve.config",
    "add_serve_arguments": "lenscan.serve.cli",
    "run_serve_cli": "lenscan.serve.cli",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def create_app(config: ServeConfig | None = None) -> Any:
    """Build the FastAPI app (:func:`lenscan.serve.app.create_app`); needs ``lenscan[serve]``."""
    from lenscan.serve.app import create_app as _create_app

    return _create_app(config)
