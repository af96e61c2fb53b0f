"""The service's one validated configuration object."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lenscan._secrets import remember_secrets
from lenscan.models import DEFAULT_MODEL

__all__ = [
    "DEVICES",
    "ServeConfig",
]

DEVICES = ("auto", "cpu", "cuda")
_POSITIVE = (
    "max_upload_bytes",
    "max_stamps",
    "max_positions",
    "max_batch_stamps",
    "max_json_stamps",
    "max_inflight",
    "max_inflight_bytes",
    "parse_workers",
)


@dataclass
class ServeConfig:
    """Settings of ``lenscan serve``, checked on construction.

    Parameters
    ----------
    models : sequence of str
        Bundled model names or checkpoint paths; the first is the default of every request.
    survey_url : str or None
        Survey store to cut stamps from for ``POST /score/positions`` (None: that endpoint
        answers 404 with a message saying how to enable it).
    storage_options : mapping
        fsspec options for ``survey_url`` (credentials, endpoint).
    device : {"auto", "cpu", "cuda"}
        Where the models run.
    max_upload_bytes : int
        Largest request body accepted; larger bodies get 413.
    max_stamps : int
        Most stamps one ``POST /score`` request may carry.
    max_json_stamps : int
        Most stamps one JSON ``POST /score`` body may carry; with the model's bands and stamp
        size it sizes the JSON body limit (:func:`lenscan.serve.jsonbody.stamp_limits`).
    max_positions : int
        Most positions (or catalogue ids) one ``POST /score/positions`` request may carry.
    batch_window_ms : float
        How long the scoring loop waits for more requests to join a batch, in milliseconds.
    max_batch_stamps : int
        Stamps per forward pass; the loop stops gathering requests once it holds this many.
    max_inflight : int
        Scoring requests held at once (reading, decoding, scoring); more get 503 with
        ``Retry-After``.
    max_inflight_bytes : int or None
        Request bodies held at once, by declared size (a streamed body counts its route's
        limit); more get 503 with ``Retry-After``. At least ``max_upload_bytes``; None: twice
        ``max_upload_bytes`` (two of the largest uploads at once), at least 128 MiB.
    parse_workers : int
        Processes that parse JSON bodies (off the event loop and its GIL).
    torch_threads : int or None
        ``torch.set_num_threads`` for the scoring thread (None: torch's default).
    """

    models: Sequence[str] = (DEFAULT_MODEL,)
    survey_url: str | None = None
    storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False)
    device: str = "cpu"
    max_upload_bytes: int = 64 * 2**20
    max_stamps: int = 4096
    max_positions: int = 10_000
    batch_window_ms: float = 5.0
    max_batch_stamps: int = 256
    max_json_stamps: int = 128
    max_inflight: int = 32
    max_inflight_bytes: int | None = None
    parse_workers: int = 1
    torch_threads: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.models, str):
            self.models = (self.models,)
        self.models = tuple(DEFAULT_MODEL if m == "default" else str(m) for m in self.models)
        if not self.models or any(not m for m in self.models):
            raise ValueError("serve: give at least one model (a bundled name or a path)")
        if self.survey_url is not None and not str(self.survey_url).strip():
            raise ValueError("serve: survey_url is empty; give a store URL or leave it unset")
        if not isinstance(self.storage_options, Mapping):
            raise ValueError("serve: storage_options must be a mapping (JSON object)")
        self.storage_options = dict(self.storage_options)
        remember_secrets(self.storage_options, self.survey_url or "")  # scrubbed from replies
        if self.device not in DEVICES:
            raise ValueError(f"serve: device must be one of {DEVICES}, got {self.device!r}")
        if self.max_inflight_bytes is None:
            self.max_inflight_bytes = max(2 * int(self.max_upload_bytes), 128 * 2**20)
        for name in _POSITIVE:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"serve: {name} must be a positive integer, got {value!r}")
        if self.max_inflight_bytes < self.max_upload_bytes:
            raise ValueError(
                f"serve: max_inflight_bytes ({self.max_inflight_bytes}) must be at least "
                f"max_upload_bytes ({self.max_upload_bytes}), or no large upload could be taken"
            )
        window = float(self.batch_window_ms)
        if not math.isfinite(window) or window < 0 or window > 10_000:
            raise ValueError(
                f"serve: batch_window_ms must be between 0 and 10000, got {self.batch_window_ms!r}"
            )
        self.batch_window_ms = window
        threads = self.torch_threads
        if threads is not None and (
            isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
        ):
            raise ValueError(f"serve: torch_threads must be a positive integer, got {threads!r}")
