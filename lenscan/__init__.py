"""lenscan: find strong gravitational lenses in survey images, at survey scale.

The public API (about ten names; everything else lives in submodules):

>>> import lenscan
>>> sorted(lenscan.__all__)  # doctest: +NORMALIZE_WHITESPACE
['CandidateTable', 'ColourCut', 'ScanConfig', 'create_survey', 'ingest', 'load_model',
 'make_survey', 'open_survey', 'scan', 'train']
"""

from __future__ import annotations

import importlib
from typing import Any

from lenscan._version import __version__ as __version__

# Every public name is imported on first use, so ``import lenscan`` loads neither torch nor
# distributed. The modules behind ``scan`` and ``train`` are ``lenscan.sweep`` and
# ``lenscan.training``: no function hides a module of the same name.
_EXPORTS = {
    "scan": "lenscan.sweep",
    "train": "lenscan.training",
    "open_survey": "lenscan.survey",
    "create_survey": "lenscan.survey",
    "ScanConfig": "lenscan.config",
    "ColourCut": "lenscan.select",
    "CandidateTable": "lenscan.table",
    "load_model": "lenscan.models",
    "make_survey": "lenscan.simulate",
    "ingest": "lenscan.survey.ingest",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lenscan' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
