"""Concurrent requests batched onto one model: an asyncio queue feeding one scoring loop.

Each request puts its normalised stamps on the model's queue and awaits a future. One loop per
model takes the first waiting request, lets others join for a short window (or takes whatever is
already queued when the model was busy), concatenates them into one batch and runs the forward
pass in a worker thread, so the event loop keeps accepting requests meanwhile. One thread owns
torch, so batches never compete with each other for the cores.
"""

from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from lenscan.models import LensModel

__all__ = [
    "ModelBatcher",
]


@dataclass
class _Request:
    stamps: torch.Tensor
    future: asyncio.Future


class ModelBatcher:
    """Batch the scoring of concurrent requests onto one loaded model.

    Parameters
    ----------
    model : LensModel
        The loaded model.
    executor : ThreadPoolExecutor
        The thread that runs torch (shared by every model of the service).
    window_s : float
        How long to wait for more requests after the first one of a batch.
    max_batch_stamps : int
        Stop gathering once a batch holds this many stamps; also the forward-pass batch size.
    """

    def __init__(
        self,
        model: LensModel,
        executor: ThreadPoolExecutor,
        *,
        window_s: float,
        max_batch_stamps: int,
    ) -> None:
        self.model = model
        self.executor = executor
        self.window_s = window_s
        self.max_batch_stamps = max_batch_stamps
        self.batches = 0
        self.stamps_scored = 0
        self.requests = 0
        self._queue: asyncio.Queue[_Request] = asyncio.Queue()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Start the scoring loop on the running event loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Stop the loop; requests still queued fail with a RuntimeError."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while not self._queue.empty():
            req = self._queue.get_nowait()
            if not req.future.done():
                req.future.set_exception(RuntimeError("the service is shutting down"))

    async def score(self, normalised: torch.Tensor) -> np.ndarray:
        """Member probabilities ``(n, n_members)`` of normalised stamps, batched with others."""
        if self._task is None:
            raise RuntimeError("the scoring loop is not running (ModelBatcher.start)")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Request(normalised, future))
        return await future

    async def _gather(self) -> list[_Request]:
        first = await self._queue.get()
        if self._queue.empty() and self.window_s > 0:
            await asyncio.sleep(self.window_s)  # let concurrent requests join this batch
        batch, n = [first], len(first.stamps)
        while n < self.max_batch_stamps and not self._queue.empty():
            req = self._queue.get_nowait()
            batch.append(req)
            n += len(req.stamps)
        return [r for r in batch if not r.future.done()]  # drop requests whose client left

    def _forward(self, parts: list[torch.Tensor]) -> np.ndarray:
        stamps = parts[0] if len(parts) == 1 else torch.cat(parts)
        return self.model.score(stamps, batch_size=self.max_batch_stamps).numpy()

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            if not batch:
                continue
            try:
                scores = await loop.run_in_executor(
                    self.executor, self._forward, [r.stamps for r in batch]
                )
            except Exception as exc:  # a failed forward pass fails its requests, not the loop
                for req in batch:
                    if not req.future.done():
                        req.future.set_exception(exc)
                continue
            self.batches += 1
            self.requests += len(batch)
            self.stamps_scored += len(scores)
            start = 0
            for req in batch:
                end = start + len(req.stamps)
                if not req.future.done():
                    req.future.set_result(scores[start:end])
                start = end
