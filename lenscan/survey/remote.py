"""Reaching object stores: network timeouts, a bounded retry, and one-line errors.

Every filesystem lenscan opens for a remote URL (``s3://``, ``gs://``, ``az://`` ...) gets a
connect timeout, a read timeout and a bounded number of retries, so that an endpoint that refuses
or never answers fails in seconds instead of hanging. Values a user sets in the storage options
win; otherwise these apply:

===========================  =======  ==============================================
environment variable         default  meaning
===========================  =======  ==============================================
``LENSCAN_CONNECT_TIMEOUT``  5        seconds to open a connection
``LENSCAN_READ_TIMEOUT``     10       seconds to wait for bytes of an answer
``LENSCAN_RETRIES``          1        retries of a failed request (after the first try)
===========================  =======  ==============================================

Failures to reach a store become :class:`StorageAccessError`, one line naming the URL and what
to do: a missing ``lenscan[cloud]`` extra, missing credentials, an endpoint that refuses or does
not answer. Storage option values (they may hold credentials) never appear in these messages.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

import fsspec
from zarr.abc.store import ByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import FsspecStore

from lenscan._io import StorageError, exception_classes

__all__ = [
    "CONNECT_TIMEOUT_ENV",
    "READ_TIMEOUT_ENV",
    "RETRIES_ENV",
    "ExplicitRangeStore",
    "StorageAccessError",
    "explain_storage_error",
    "limit_retries",
    "network_limits",
    "network_options",
    "remote_filesystem",
    "storage_errors",
    "store_class",
]

CONNECT_TIMEOUT_ENV = "LENSCAN_CONNECT_TIMEOUT"
READ_TIMEOUT_ENV = "LENSCAN_READ_TIMEOUT"
RETRIES_ENV = "LENSCAN_RETRIES"
_DEFAULTS = {CONNECT_TIMEOUT_ENV: 5.0, READ_TIMEOUT_ENV: 10.0, RETRIES_ENV: 1}

#: The fsspec package behind each remote protocol (all in the ``lenscan[cloud]`` extra).
_PACKAGES = {
    "s3": "s3fs",
    "s3a": "s3fs",
    "gs": "gcsfs",
    "gcs": "gcsfs",
    "az": "adlfs",
    "abfs": "adlfs",
    "abfss": "adlfs",
}
#: Protocols whose service takes no suffix byte range (``bytes=-N``): Azure Blob serves only
#: ``bytes=start-`` and ``bytes=start-end``, and its SDK turns a negative offset into a header
#: it rejects. Zarr asks for suffixes to read a shard's index.
_NO_SUFFIX_RANGES = {"az", "abfs", "abfss"}
_CREDENTIALS_HINT = {
    "s3fs": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or pass "
    "--storage-options '{\"anon\": true}' for a public bucket",
    "gcsfs": "set GOOGLE_APPLICATION_CREDENTIALS (or run gcloud auth application-default "
    'login), or pass --storage-options \'{"token": "anon"}\' for a public bucket',
    "adlfs": "set AZURE_STORAGE_CONNECTION_STRING (or AZURE_STORAGE_ACCOUNT_NAME and "
    "AZURE_STORAGE_ACCOUNT_KEY)",
}
# Exception class names (anywhere in the MRO or the cause chain) and what they mean. Matched by
# name so that no cloud SDK has to be imported to recognise its errors.
_NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError"}
_TIMEOUTS = {"ReadTimeoutError", "ReadTimeout", "TimeoutError", "ServerTimeoutError"}
_NO_CONNECTION = {
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ClientConnectorError",
    "ServiceRequestError",
    "ConnectionError",
}


class StorageAccessError(StorageError, OSError):
    """A store could not be reached: the message names the URL and what to do.

    A :class:`lenscan._io.StorageError`: a runtime failure (the command exits 1), not a bad
    argument.
    """


def network_limits() -> tuple[float, float, int]:
    """The connect timeout (s), read timeout (s) and retries in force (see the module doc).

    Raises
    ------
    ValueError
        Naming the environment variable when it is not a number (retries: an integer) >= 0.
    """
    values: list[float] = []
    for name, default in _DEFAULTS.items():
        text = os.environ.get(name, "").strip()
        try:
            value = float(text) if text else float(default)
        except ValueError:
            value = -1.0
        if not value >= 0 or (name == RETRIES_ENV and value != int(value)):
            raise ValueError(f"{name}={text!r}: give a number >= 0 (retries: an integer)")
        values.append(value)
    return values[0], values[1], int(values[2])


def _protocol(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else "file"


def network_options(url: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``storage_options`` with lenscan's timeouts and retry bound added for ``url``'s protocol.

    Keys the caller set are kept as they are. Local and in-memory URLs are returned unchanged.

    Examples
    --------
    >>> network_options("s3://bucket/x", {"anon": True})["config_kwargs"]["read_timeout"]
    10.0
    >>> network_options("/data/x", {})
    {}
    """
    options = dict(storage_options or {})
    connect_s, read_s, _ = network_limits()
    package = _PACKAGES.get(_protocol(url))
    if package == "s3fs":  # botocore's own settings
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("connect_timeout", connect_s)
        config.setdefault("read_timeout", read_s)
        # One attempt per call: s3fs's own loop retries (bounded by limit_retries); retrying
        # in both multiplies the time an endpoint that never answers takes to fail.
        config.setdefault("retries", {"max_attempts": 1, "mode": "standard"})
        options["config_kwargs"] = config
    elif package == "gcsfs":  # aiohttp's total timeout of one request
        options.setdefault("requests_timeout", connect_s + read_s)
    elif package == "adlfs":
        options.setdefault("connection_timeout", connect_s)
        options.setdefault("read_timeout", read_s)
        _close_adlfs_before_exit()
    return options


@functools.cache
def _close_adlfs_before_exit() -> None:
    """Run adlfs's client-closing finalizers at exit before the event loops stop.

    adlfs closes its Azure clients in ``weakref.finalize`` callbacks; left to the interpreter's
    exit they run after the loops are gone and print a traceback per filesystem, in the client
    and in every worker. An exit hook registered after the loops' own runs before them.
    """

    def close() -> None:
        for finalizer in list(weakref.finalize._registry):  # type: ignore[attr-defined]
            held = finalizer.peek()
            if held and type(held[0]).__module__.split(".")[0] == "adlfs":
                with contextlib.suppress(Exception):
                    finalizer()

    atexit.register(close)


def remote_filesystem(
    url: str, storage_options: Mapping[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """``fsspec.core.url_to_fs`` with :func:`network_options` and :func:`limit_retries`."""
    with storage_errors(url):
        fs, path = fsspec.core.url_to_fs(url, **network_options(url, storage_options))
    return limit_retries(fs), path


def limit_retries(fs: Any) -> Any:
    """Bound s3fs's own retry loop of ``fs`` to ``LENSCAN_RETRIES`` (other filesystems as is).

    s3fs retries a timed-out request five times on top of botocore's attempts and takes no
    option for it; its instance attribute is the only handle.
    """
    if type(fs).__module__.split(".")[0] == "s3fs":
        fs.retries = network_limits()[2] + 1
    return fs


def _names(exc: BaseException) -> Iterator[tuple[str, BaseException]]:
    """(class name, exception) for every class of ``exc`` and of its causes."""
    for cls, current in exception_classes(exc):
        yield cls.__name__, current


def explain_storage_error(url: str, exc: BaseException) -> str | None:
    """One line naming ``url``, what went wrong and what to do, or ``None`` if not a store error.

    Examples
    --------
    >>> explain_storage_error("gs://b/x.zarr", ImportError("Please install gcsfs"))
    "gs://b/x.zarr: gs:// URLs need the gcsfs package: pip install 'lenscan[cloud]'"
    """
    protocol = _protocol(url)
    package = _PACKAGES.get(protocol)
    if isinstance(exc, ImportError) and package and package in str(exc):
        return f"{url}: {protocol}:// URLs need the {package} package: pip install 'lenscan[cloud]'"
    read_s = network_limits()[1]
    for name, cause in _names(exc):
        if name in _NO_CREDENTIALS:
            hint = _CREDENTIALS_HINT.get(package or "", "check the storage options")
            return f"{url}: no credentials found: {hint}"
        if name in _TIMEOUTS:
            return (
                f"{url}: the store's endpoint did not answer within {read_s:g} s ({cause}); "
                f"check the endpoint and the network ({READ_TIMEOUT_ENV} sets the timeout)"
            )
        if name in _NO_CONNECTION:
            return (
                f"{url}: cannot connect to the store's endpoint ({cause}); check the endpoint "
                f"(endpoint_url in --storage-options, AWS_ENDPOINT_URL, ...) and the network"
            )
        if name == "PermissionError":
            return f"{url}: access denied ({cause}); check the credentials and their rights"
    return None


@contextlib.contextmanager
def storage_errors(url: str) -> Iterator[None]:
    """Turn a failure to reach the store at ``url`` into a one-line :class:`StorageAccessError`.

    Other exceptions (a missing object, a bad value) pass through unchanged.
    """
    try:
        yield
    except StorageAccessError:
        raise
    except Exception as exc:
        message = explain_storage_error(url, exc)
        if message is None:
            raise
        raise StorageAccessError(message) from exc


class ExplicitRangeStore(FsspecStore):
    """A zarr ``FsspecStore`` that asks for a suffix of an object as an explicit byte range.

    For object stores without suffix ranges (Azure Blob): the object's size costs one metadata
    request more per suffix read (a shard's index, once per shard a reader opens).
    """

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        return await super().get(key, prototype, await self._explicit(key, byte_range))

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Any
    ) -> list[Buffer | None]:
        ranges = [(key, await self._explicit(key, rng)) for key, rng in key_ranges]
        return await super().get_partial_values(prototype, ranges)

    async def _explicit(self, key: str, byte_range: ByteRequest | None) -> ByteRequest | None:
        if not isinstance(byte_range, SuffixByteRequest):
            return byte_range
        path = f"{self.path.rstrip('/')}/{key.lstrip('/')}" if self.path else key
        try:
            size = int((await self.fs._info(path))["size"])
        except FileNotFoundError:
            return byte_range  # the read itself reports the missing object, as for any store
        return RangeByteRequest(max(0, size - byte_range.suffix), size)


def store_class(url: str) -> type[FsspecStore]:
    """The zarr store class for a remote ``url``: :class:`ExplicitRangeStore` where needed."""
    return ExplicitRangeStore if _protocol(url) in _NO_SUFFIX_RANGES else FsspecStore
