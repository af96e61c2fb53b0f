"""Running a planned scan on a Dask cluster: the only place the scoring graph is built.

One task per tile, submitted in a bounded window so that the scheduler and the client hold a
few thousand tasks at most however many tiles the survey has. Results go into the ledger as they
arrive; a tile that fails is recorded with its stage and reason, and every other tile goes on.
"""

from __future__ import annotations

import logging
import os
import posixpath
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager
from typing import Any

from distributed import Client, as_completed
from fsspec.implementations.local import LocalFileSystem
from tqdm.auto import tqdm

from lenscan._secrets import protect_logger, safe_text
from lenscan.sweep.ledger import Ledger
from lenscan.sweep.plan import ScanPlan, task_key
from lenscan.sweep.worker import ModelPlugin, TileError, model_load_problem, score_tile

__all__ = ["ModelUnavailable", "OutputNotShared", "run_tiles"]

log = protect_logger(logging.getLogger(__name__))

#: Tasks in flight per worker thread: enough to keep every thread busy between round trips.
TASKS_PER_THREAD = 4
MIN_IN_FLIGHT = 64


class OutputNotShared(RuntimeError):
    """The output folder is a local path that some workers cannot see."""


class ModelUnavailable(RuntimeError):
    """Some workers lack what the model needs (a plug-in's package, onnxruntime, timm)."""


def run_tiles(client: Client, plan: ScanPlan, *, progress: bool) -> list[dict[str, Any]]:
    """Score the plan's remaining tiles; return one failure record per tile that failed."""
    _check_output_visible(client, plan)
    _check_workers_can_load(client, plan)
    c = plan.config
    plugin = ModelPlugin(plan.payload, c.device, precision=c.precision, compile=c.compile_model)
    client.register_plugin(plugin)
    job = plan.job()
    ledger = Ledger(
        plan.out_fs,
        plan.out_path,
        plan.run_token,
        storage_options=dict(plan.config.out_storage_options),
        batch_seconds=plan.config.commit_interval_seconds,
    )
    todo = plan.todo
    window = max(MIN_IN_FLIGHT, TASKS_PER_THREAD * _total_threads(client))
    pending = iter(todo)
    tiles_of: dict[Any, str] = {}
    queue = as_completed()

    def submit_next() -> None:
        tile = next(pending, None)
        if tile is not None:
            fut = client.submit(
                score_tile, tile, job, key=task_key(plan.run_token, tile), retries=1, pure=False
            )
            tiles_of[fut.key] = tile
            queue.add(fut)

    for _ in range(window):
        submit_next()
    failures: list[dict[str, Any]] = []
    bar = tqdm(total=len(todo), unit="tile", desc="scanning", disable=not progress)
    # Ctrl-C included: the tiles that arrived are committed before the scan stops.
    with closing(bar), _commit_on_exit(ledger):
        for future in queue:
            tile = tiles_of.pop(future.key)
            try:
                ledger.add(future.result(), plan.threshold)
            except Exception as exc:  # one bad tile must not lose the others
                failures.append(_failure_record(tile, exc))
                log.error("tile %s failed: %s", tile, failures[-1]["message"])
            future.release()
            submit_next()
            bar.update(1)
            bar.set_postfix(failed=len(failures), refresh=False)
    return failures


@contextmanager
def _commit_on_exit(ledger: Ledger) -> Iterator[None]:
    try:
        yield
    finally:
        ledger.commit()


def _failure_record(tile: str, exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, TileError):
        stage, error_type, message = exc.stage, exc.error_type, exc.message
    else:  # the task never ran to the end: a worker died, the scheduler gave up, ...
        stage, error_type, message = "task", type(exc).__name__, str(exc)
    message = safe_text(message)  # a worker's message may echo a URL or an option
    return {"tile": tile, "id": -1, "stage": stage, "error_type": error_type, "message": message}


def _total_threads(client: Client) -> int:
    return sum(client.nthreads().values()) or 1


def _check_workers_can_load(client: Client, plan: ScanPlan) -> None:
    """Refuse, before any tile is scored, a model that some workers cannot build."""
    answers = client.run(model_load_problem, plan.payload.meta_json)
    problems = {worker: problem for worker, problem in answers.items() if problem}
    if problems:
        first = next(iter(problems.values()))
        raise ModelUnavailable(
            f"model {plan.meta.name!r} cannot be loaded on workers {sorted(problems)}: {first}. "
            "Install it on every worker (or in the cluster's image) and run again."
        )


def _check_output_visible(client: Client, plan: ScanPlan) -> None:
    """Refuse a local ``--out`` that the workers do not share with this client."""
    if not isinstance(plan.out_fs, LocalFileSystem):
        return
    probe = posixpath.join(plan.out_path, f".lenscan-probe-{uuid.uuid4().hex}")
    plan.out_fs.makedirs(plan.out_path, exist_ok=True)
    plan.out_fs.pipe_file(probe, b"")
    try:
        seen = client.run(os.path.exists, probe)
    finally:
        plan.out_fs.rm(probe)
    blind = sorted(w for w, ok in seen.items() if not ok)
    if blind:
        raise OutputNotShared(
            f"--out {plan.config.out} is a local path that workers {blind} cannot see: their "
            "parts would land on their own disks. Use a shared file system path or an object "
            "store URL (s3://, gs://, ...) for --out."
        )
