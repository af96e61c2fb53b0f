"""JSON request bodies parsed within limits that bound memory *before* anything is built.

``json.loads`` builds one Python object per JSON value: 60 MB of ``[],`` become 20 million
lists and 2 GB, and the parse holds the GIL throughout. So before parsing, :func:`check_body`
looks at the raw bytes only (numpy, a few MB of scratch): the body size, the nesting depth, the
number of arrays, and an upper bound on the number of values ``json.loads`` could create (every
value but the first follows a ``[``, ``,`` or ``:``, every object member a ``{`` or ``,``).
Brackets and separators inside strings count too, so the bounds can only over-count; a body
within them costs at most about 100 bytes per allowed value to parse.

The service runs :func:`parse_stamps_body` in a separate process (no torch there: this module
imports only json and numpy), so parsing never holds the event loop's GIL.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from lenscan.serve.errors import InputError

__all__ = [
    "JSON_BYTES_PER_NUMBER",
    "MAX_JSON_DEPTH",
    "JSONLimits",
    "check_body",
    "decode_json",
    "json_stamps",
    "parse_stamps_body",
    "positions_limits",
    "stamp_limits",
]

JSON_BYTES_PER_NUMBER = 32
"""Bytes a JSON number may take, separator and spaces included (``-2.2250738585072014e-308, ``
is 26): with the stamp count, it sizes the JSON body limit."""

MAX_JSON_DEPTH = 6
"""Deepest nesting accepted: the body object, then stamps ``(n, band, y, x)``, plus one level so
that a 5-dimensional upload still gets the message naming its shape."""

_SLACK_VALUES = 1024  # keys, "model", "bands" and their entries
_OPEN = (ord("["), ord("{"))
_CLOSE = (ord("]"), ord("}"))
_CHUNK = 2**20


@dataclass(frozen=True)
class JSONLimits:
    """What one JSON body may hold; every bound is checked on the raw bytes before parsing.

    Parameters
    ----------
    max_bytes : int
        Body size.
    max_values : int
        JSON values (numbers, strings, arrays, objects) the body may create.
    max_arrays : int
        Arrays (``[``) in the body.
    max_numbers : int
        Numbers in the parsed stamps array (its size).
    max_depth : int
        Nesting depth of arrays and objects.
    """

    max_bytes: int
    max_values: int
    max_arrays: int
    max_numbers: int
    max_depth: int = MAX_JSON_DEPTH


def stamp_limits(max_stamps: int, n_bands: int, stamp_size: int, max_bytes: int) -> JSONLimits:
    """Limits of a ``POST /score`` JSON body: ``max_stamps`` stamps ``(n_bands, S, S)``.

    The byte limit is ``max_stamps * n_bands * S**2 * JSON_BYTES_PER_NUMBER`` plus 64 KiB, and
    at most ``max_bytes`` (the upload limit). Uploads naming extra planes (``bands``) share the
    same number budget, so they carry fewer stamps.
    """
    numbers = max_stamps * n_bands * stamp_size**2
    arrays = 1 + max_stamps * (1 + n_bands * (1 + stamp_size))
    return JSONLimits(
        max_bytes=min(max_bytes, numbers * JSON_BYTES_PER_NUMBER + 2**16),
        max_values=numbers + arrays + _SLACK_VALUES,
        max_arrays=arrays + _SLACK_VALUES,
        max_numbers=numbers,
    )


def positions_limits(max_positions: int, max_bytes: int) -> JSONLimits:
    """Limits of a ``POST /score/positions`` body: ``max_positions`` positions or ids.

    A position ``{"ra": 40.123456789012345, "dec": -30.12345678901234}`` takes about 60 bytes
    and five values; 3 x ``JSON_BYTES_PER_NUMBER`` bytes each plus 64 KiB is allowed.
    """
    return JSONLimits(
        max_bytes=min(max_bytes, max_positions * 3 * JSON_BYTES_PER_NUMBER + 2**16),
        max_values=5 * max_positions + _SLACK_VALUES,
        max_arrays=max_positions + _SLACK_VALUES,
        max_numbers=2 * max_positions,
    )


def _depth(raw: np.ndarray) -> int:
    """Deepest nesting of ``[``/``{`` in the bytes, in 1 MiB chunks (bounded scratch)."""
    depth = deepest = 0
    for start in range(0, raw.size, _CHUNK):
        chunk = raw[start : start + _CHUNK]
        opens = (chunk == _OPEN[0]) | (chunk == _OPEN[1])
        step = opens.astype(np.int8) - ((chunk == _CLOSE[0]) | (chunk == _CLOSE[1]))
        run = np.cumsum(step, dtype=np.int64) + depth
        deepest, depth = max(deepest, int(run.max())), int(run[-1])
    return deepest


def check_body(data: bytes, limits: JSONLimits, what: str = "the JSON body") -> None:
    """Refuse a JSON body that no legal request could be, looking at its bytes only.

    Raises
    ------
    InputError
        413 for a body, an array count or a value count over the limits; 400 for nesting
        deeper than ``limits.max_depth``.
    """
    if len(data) > limits.max_bytes:
        raise InputError(
            f"{what} ({len(data)} bytes) is larger than the limit of {limits.max_bytes} bytes "
            "for JSON; send many stamps as a .npy or FITS file",
            status=413,
        )
    raw = np.frombuffer(data, np.uint8)
    depth = _depth(raw)
    if depth > limits.max_depth:
        raise InputError(
            f"{what} is nested too deeply ({depth} levels; at most {limits.max_depth})", 400
        )
    counts = np.bincount(raw, minlength=256)
    arrays = int(counts[ord("[")])
    values = 1 + int(counts[[ord(","), ord(":"), ord("["), ord("{")]].sum())
    for n, limit, name in (
        (arrays, limits.max_arrays, "arrays"),
        (values, limits.max_values, "values"),
    ):
        if n > limit:
            raise InputError(
                f"{what} holds up to {n} JSON {name}; a request this service accepts holds at "
                f"most {limit}",
                status=413,
            )


def decode_json(data: bytes) -> dict[str, Any]:
    """Parse a JSON request body that must be an object (check it with :func:`check_body`)."""
    try:
        doc = json.loads(data)
    except RecursionError:
        raise InputError("the JSON body is nested too deeply to parse", status=400) from None
    except ValueError as err:  # JSONDecodeError, bad UTF-8, integers of over 4300 digits
        raise InputError(f"the request body is not valid JSON ({err})", status=400) from None
    if not isinstance(doc, dict):
        raise InputError(
            f'the JSON body must be an object such as {{"stamps": [...]}}, got {type(doc).__name__}'
        )
    return doc


def json_stamps(doc: dict[str, Any], *, max_elements: int) -> np.ndarray:
    """The ``stamps`` member of a JSON body as a float64 array (nested lists of numbers)."""
    unknown = sorted(set(doc) - {"stamps", "bands", "model"})
    if unknown:
        raise InputError(f"unknown JSON fields {unknown}; known: ['bands', 'model', 'stamps']")
    if "stamps" not in doc:
        raise InputError('the JSON body needs "stamps": nested lists (n, band, y, x) of numbers')
    try:
        arr = np.asarray(doc["stamps"], dtype=np.float64)
    except (ValueError, TypeError, OverflowError) as err:
        raise InputError(
            f'"stamps" must be nested lists (n, band, y, x) of numbers of equal lengths ({err})'
        ) from None
    if arr.size > max_elements:
        raise InputError(
            f'"stamps" holds {arr.size} values (shape {arr.shape}); this service accepts at most '
            f"{max_elements} per JSON request (send more stamps as a .npy or FITS file)",
            status=413,
        )
    return arr


def parse_stamps_body(data: bytes, limits: JSONLimits) -> tuple[np.ndarray, Any, Any]:
    """A ``POST /score`` JSON body -> ``(stamps float64, "model" field, "bands" field)``.

    Checks the bytes against ``limits`` first (:func:`check_body`), then parses. Runs in the
    service's parser process; raises :class:`InputError` for bad bodies.
    """
    check_body(data, limits)
    doc = decode_json(data)
    model = doc.get("model")
    if model is not None and not isinstance(model, str):
        raise InputError(f'"model" must be a model name (a string), got {model!r:.80}')
    return json_stamps(doc, max_elements=limits.max_numbers), model, doc.get("bands")
