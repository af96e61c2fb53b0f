"""What lenscan may write about URLs and storage options: never a credential.

Outputs (``run.json``, candidate tables, failures, the gallery, model metadata), logs and
messages are shared with collaborators and attached to papers, so nothing a user passes as a
credential may reach them. Storage options are recorded by an allow-list (:data:`RECORDED_KEYS`:
what reproduces the run without its credentials); URLs lose their user info and signed query
parameters; free text (error messages, log lines) is scrubbed of both and of every secret value
this process has seen (:func:`remember_secrets`) or holds in its environment.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import urllib.parse
from collections.abc import Iterator, Mapping
from typing import Any, TypeVar

__all__ = [
    "RECORDED_KEYS",
    "REDACTED",
    "SecretFilter",
    "protect_logger",
    "remember_secrets",
    "safe_settings",
    "safe_storage_options",
    "safe_text",
    "safe_url",
    "scrub",
    "withheld_options",
]

#: What a withheld value is replaced by in free text.
REDACTED = "<redacted>"

#: Storage-option keys recorded in provenance (case-insensitive); every other key is withheld.
#: Values must be scalars; URL-valued ones lose user info and signed query parameters.
RECORDED_KEYS = frozenset(
    {
        # where the data is
        "endpoint_url", "endpoint", "endpoint_override", "account_url", "host", "port",
        "region", "region_name", "location", "account_name", "project", "bucket",
        # how it was reached, no credential
        "anon", "anonymous", "requester_pays", "use_ssl", "verify", "version_aware",
        "addressing_style", "signature_version", "use_dualstack_endpoint", "use_fips_endpoint",
        "profile",
        # tuning
        "default_block_size", "block_size", "default_fill_cache", "default_cache_type",
        "cache_type", "fixed_upload_size", "max_concurrency", "max_pool_connections",
        "max_attempts", "mode", "connect_timeout", "read_timeout", "timeout",
        "use_listings_cache", "listings_expiry_time", "skip_instance_cache",
    }
)  # fmt: skip
#: Nested option mappings searched with the same allow-list.
_RECORDED_NESTS = frozenset({"client_kwargs", "config_kwargs", "s3", "retries"})
_URL_KEYS = frozenset({"endpoint_url", "endpoint", "endpoint_override", "account_url", "host"})

#: Query parameters of signed URLs (AWS SigV2/V4, Azure SAS, GCS, CloudFront) and tokens.
_SIGNED_PARAMS = frozenset(
    {
        "signature", "expires", "googleaccessid", "key-pair-id", "policy", "awsaccesskeyid",
        "sig", "se", "sp", "sv", "sr", "st", "spr", "ss", "srt", "sdd", "si", "skoid", "sktid",
        "skt", "ske", "sks", "skv", "saoid", "suoid", "scid", "rscc", "rscd", "rsce", "rscl",
        "rsct", "token", "access_token", "id_token", "refresh_token", "code", "key", "api_key",
        "apikey", "x-api-key", "password", "pass", "pwd", "secret", "client_secret", "auth",
        "authorization", "credential", "credentials", "sas", "security-token",
    }
)  # fmt: skip
_SIGNED_PREFIXES = ("x-amz-", "x-goog-", "x-ms-")
_URL_RE = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s'\"<>(){}\[\],]+")
_ASSIGN_RE = re.compile(
    r"(?i)\b(AccountKey|SharedAccessSignature|SharedAccessKey|Pwd|sig|Signature|"
    r"X-Amz-[A-Za-z-]+|X-Goog-[A-Za-z-]+|\w*(?:secret|token|passw|credential)\w*)"
    r"=([^&;\s'\"]+)"
)
_AUTH_RE = re.compile(r"(?i)\b(Bearer|Basic|SharedKey)\s+([A-Za-z0-9._~+/=:-]{6,})")
_SECRET_ENV = re.compile(
    r"(?i)(secret|token|passw|credential|connection_string|sas_token|account_key|access_key|"
    r"api_key|private_key)"
)
_SECRET_NAME = re.compile(
    r"(?i)(key|secret|token|passw|pwd|credential|sas|auth|signature|cert|connection_string|"
    r"cookie|session)"
)
_MIN_SECRET_LEN = 6

_seen: set[str] = set()
# Re-entrant: a log record can be emitted (and filtered through safe_text) on a thread that
# holds the lock, e.g. asyncio reporting an unclosed session from a garbage collection.
_seen_lock = threading.RLock()


def safe_url(url: str) -> str:
    """``url`` without user info (``user:password@``) and without signed query parameters.

    Chained fsspec URLs (``simplecache::s3://...``) are cleaned part by part; a plain path comes
    back unchanged.

    >>> safe_url("https://user:pw@host:8443/b/x.zarr?X-Amz-Signature=abc&versionId=3")
    'https://host:8443/b/x.zarr?versionId=3'
    >>> safe_url("https://acct.blob.core.windows.net/c/x?sv=2022&sig=abc%3D")
    'https://acct.blob.core.windows.net/c/x'
    >>> safe_url("s3://bucket/survey.zarr")
    's3://bucket/survey.zarr'
    """
    if not isinstance(url, str):
        return url
    if "::" in url:
        return "::".join(safe_url(part) for part in url.split("::"))
    if "://" not in url:
        head, at, tail = url.partition("@")
        return tail if at and "/" not in head else url
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    query, fragment = _unsigned(parts.query), _unsigned(parts.fragment)
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, fragment))


def _unsigned(query: str) -> str:
    """A query string without its signed or credential parameters."""
    if "=" not in query:
        return query
    pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
    kept = [(k, v) for k, v in pairs if not _is_signed(k)]
    return query if len(kept) == len(pairs) else urllib.parse.urlencode(kept)


def _is_signed(name: str) -> bool:
    low = name.lower()
    return low in _SIGNED_PARAMS or low.startswith(_SIGNED_PREFIXES)


def safe_storage_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The storage options worth recording: :data:`RECORDED_KEYS` only, nested ones included.

    >>> safe_storage_options({"key": "AKIA", "secret": "s", "anon": False,
    ...     "client_kwargs": {"endpoint_url": "http://u:p@minio:9000", "headers": {"A": "b"}}})
    {'anon': False, 'client_kwargs': {'endpoint_url': 'http://minio:9000'}}
    """
    out: dict[str, Any] = {}
    for key, value in (options or {}).items():
        name = str(key).lower()
        if isinstance(value, Mapping):
            if name in _RECORDED_NESTS:
                nested = safe_storage_options(value)
                if nested:
                    out[str(key)] = nested
        elif name in RECORDED_KEYS and _is_scalar(value):
            out[str(key)] = safe_url(value) if name in _URL_KEYS else value
    return out


def withheld_options(options: Mapping[str, Any] | None, prefix: str = "") -> list[str]:
    """Dotted names of the storage options :func:`safe_storage_options` leaves out.

    >>> withheld_options({"key": "k", "anon": False, "client_kwargs": {"headers": {"A": 1}}})
    ['client_kwargs.headers', 'key']
    """
    names = []
    for key, value in (options or {}).items():
        name, dotted = str(key).lower(), f"{prefix}{key}"
        if isinstance(value, Mapping) and name in _RECORDED_NESTS:
            names += withheld_options(value, f"{dotted}.")
        elif isinstance(value, Mapping) or name not in RECORDED_KEYS or not _is_scalar(value):
            names.append(dotted)
    return sorted(names)


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, bool | int | float | str)


def remember_secrets(options: Mapping[str, Any] | None, *urls: str) -> None:
    """Note the withheld values of ``options`` and ``urls``, so :func:`safe_text` removes them.

    Called with every set of storage options and URLs a run uses: an exception message that
    echoes one (a connection string, a header, a URL's signature) is scrubbed before it is
    logged or written.
    """
    found = set(_withheld_values(options or {}))
    for url in urls:
        found.update(_url_secrets(url))
    with _seen_lock:
        _seen.update(found)


def _url_secrets(url: str) -> Iterator[str]:
    for part in str(url).split("::"):
        parts = urllib.parse.urlsplit(part)
        userinfo = parts.netloc.rpartition("@")[0]
        for piece in (userinfo, *userinfo.split(":")):
            yield from _secret_pieces(urllib.parse.unquote(piece))
        for query in (parts.query, parts.fragment):
            for name, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
                if _is_signed(name):
                    yield from _secret_pieces(value)


def _withheld_values(options: Mapping[str, Any]) -> Iterator[str]:
    for key, value in options.items():
        if isinstance(value, Mapping):
            yield from _withheld_values(value)
        elif isinstance(value, list | tuple):
            yield from _withheld_values({str(i): v for i, v in enumerate(value)})
        elif str(key).lower() not in RECORDED_KEYS and not _is_local_path(value):
            yield from _secret_pieces(str(value))


def _is_local_path(value: Any) -> bool:
    """A file that exists here (a cache folder, a credentials file's path): not a secret."""
    return isinstance(value, str) and os.path.isabs(value) and os.path.exists(value)


def _secret_pieces(value: str) -> Iterator[str]:
    """``value`` and the parts that may be echoed alone: ``AccountKey=...``, ``Bearer ...``."""
    if len(value) >= _MIN_SECRET_LEN and value.lower() not in ("true", "false", "none"):
        yield value
    for regex in (_ASSIGN_RE, _AUTH_RE):
        for m in regex.finditer(value):
            if len(m.group(2)) >= _MIN_SECRET_LEN:
                yield m.group(2)


def _environment_secrets() -> set[str]:
    return {
        piece
        for name, value in os.environ.items()
        if _SECRET_ENV.search(name)
        for piece in _secret_pieces(value)
    }


def safe_text(text: str) -> str:
    """``text`` (a message, a log line) with URLs cleaned and every known secret removed.

    >>> safe_text("https://me:hunter2@host/x?sig=abc failed (AccountKey=Zm9v; Bearer abcdef1)")
    'https://host/x failed (AccountKey=<redacted>; Bearer <redacted>)'
    """
    if not isinstance(text, str) or not text:
        return text
    text = _URL_RE.sub(lambda m: safe_url(m.group(0)), text)
    text = _ASSIGN_RE.sub(lambda m: f"{m.group(1)}={REDACTED}", text)
    text = _AUTH_RE.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    with _seen_lock:
        known = set(_seen)
    known |= _environment_secrets()
    for secret in sorted(known, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def safe_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Free-form settings (cluster-manager kwargs, Dask config) fit to record.

    Their keys are too many to allow-list: values under credential-like names are withheld and
    every string is :func:`scrub`-bed (URLs cleaned, known secrets removed).

    >>> safe_settings({"queue": "gpu", "password": "pw", "env": ["export TOKEN=abc"]})
    {'queue': 'gpu', 'password': '<redacted>', 'env': ['export TOKEN=<redacted>']}
    """
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if _SECRET_NAME.search(str(key)):
            out[key] = REDACTED
        elif isinstance(value, Mapping):
            out[key] = safe_settings(value)
        else:
            out[key] = scrub(value)
    return out


def scrub(value: Any) -> Any:
    """``value`` (plain data: mappings, lists, strings) with :func:`safe_text` on every string."""
    if isinstance(value, str):
        return safe_text(value)
    if isinstance(value, Mapping):
        return {k: scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub(v) for v in value]
    return value


class SecretFilter(logging.Filter):
    """Scrubs every record it sees with :func:`safe_text` (message and traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):  # keep the arguments: formatters may unpack them
            record.args = tuple(safe_text(a) if isinstance(a, str) else a for a in record.args)
        message = record.getMessage()
        clean = safe_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = safe_text(record.exc_text)
        return True


_Target = TypeVar("_Target", logging.Logger, logging.Handler)


def protect_logger(target: _Target) -> _Target:
    """Attach one :class:`SecretFilter` to a logger or handler; return it.

    A logger's filter sees only records logged to that logger itself, so each lenscan module
    that logs protects its own logger; the ``lenscan`` command protects its handlers too.
    """
    if not any(isinstance(f, SecretFilter) for f in target.filters):
        target.addFilter(SecretFilter())
    return target
