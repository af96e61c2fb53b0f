"""Bounds on the work the service holds at once, and the process that parses JSON bodies.

:class:`Admission` counts the scoring requests in flight and the body bytes they declared; a
request that would exceed either bound is refused at once with 503 and ``Retry-After`` (before
its body is read), so memory stays bounded and ``GET /health`` keeps answering however many
clients send. :class:`ParserPool` runs JSON parsing in a separate process, where it cannot hold
the event loop's GIL.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from lenscan.serve.errors import Saturated

__all__ = [
    "Admission",
    "ParserPool",
]

T = TypeVar("T")


class Admission:
    """At most ``max_requests`` requests and ``max_bytes`` of declared bodies in flight.

    Used from the event loop only (no lock needed).

    Parameters
    ----------
    max_requests : int
        Scoring requests in flight (reading, decoding, waiting for or in the model).
    max_bytes : int
        Sum of their body sizes (``Content-Length``, or the route's limit for a streamed body).
    """

    def __init__(self, max_requests: int, max_bytes: int) -> None:
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.requests = 0
        self.bytes = 0
        self.refused = 0

    def acquire(self, nbytes: int) -> None:
        """Take a place for a request of ``nbytes``; :class:`Saturated` when none is free."""
        if self.requests >= self.max_requests or self.bytes + nbytes > self.max_bytes:
            self.refused += 1
            raise Saturated(
                f"the service is busy ({self.requests} requests, {self.bytes} body bytes in "
                f"flight; limits {self.max_requests} and {self.max_bytes}): retry shortly"
            )
        self.requests += 1
        self.bytes += nbytes

    def release(self, nbytes: int) -> None:
        """Give back the place taken by :meth:`acquire` ``(nbytes)``."""
        self.requests -= 1
        self.bytes -= nbytes

    @contextlib.contextmanager
    def enter(self, nbytes: int) -> Iterator[None]:
        """:meth:`acquire` for the duration of a ``with`` block."""
        self.acquire(nbytes)
        try:
            yield
        finally:
            self.release(nbytes)


def _ready() -> bool:
    return True


class ParserPool:
    """``workers`` spawned processes for parsing; rebuilt if one dies (then 503 for its job).

    Spawned, not forked: the server process holds torch's threads.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            context = multiprocessing.get_context("spawn")
            self._pool = ProcessPoolExecutor(self.workers, mp_context=context)
        return self._pool

    def start(self) -> None:
        """Start the processes now (a spawn imports numpy: not on the first request)."""
        pool = self._executor()
        for future in [pool.submit(_ready) for _ in range(self.workers)]:
            future.result(timeout=120)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a parser process; :class:`Saturated` if the process died."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor(), fn, *args)
        except BrokenProcessPool:
            self.stop(wait=False)
            raise Saturated("the JSON parser process stopped; retry shortly") from None

    def stop(self, wait: bool = True) -> None:
        """Stop the processes."""
        if self._pool is not None:
            self._pool.shutdown(wait=wait, cancel_futures=True)
            self._pool = None
