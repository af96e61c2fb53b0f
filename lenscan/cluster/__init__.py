"""Turn a :class:`~lenscan.config.ClusterSpec` into a Dask cluster and a connected client.

One spec covers every target: a local cluster of worker processes (or dask-cuda's
``LocalCUDACluster``, one worker per GPU), a running scheduler by address or scheduler file, or
any Dask cluster manager named by its dotted path (``class:``) with ``kwargs``, then ``scale`` or
``adapt``: dask-jobqueue's ``SLURMCluster``, dask-kubernetes' ``KubeCluster``, dask-cloudprovider's
VM clusters, Dask Gateway, Coiled. The shipped specs are in the repository's ``cluster/`` folder.

Examples
--------
>>> from lenscan.cluster import connect
>>> from lenscan.config import ClusterSpec
>>> with connect(ClusterSpec(n_workers=1, threads_per_worker=1)) as client:  # doctest: +SKIP
...     print(client.dashboard_link)
"""

from __future__ import annotations

import ast
import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import dask
from distributed import Client, LocalCluster, WorkerPlugin

from lenscan._managers import EXTRAS as EXTRAS
from lenscan._managers import check_manager as check_manager
from lenscan._managers import import_manager as import_manager
from lenscan._secrets import protect_logger, safe_url
from lenscan.config import ClusterSpec

__all__ = [
    "CHECKED_PACKAGES",
    "EXTRAS",
    "IgnoreInterrupts",
    "SchedulerUnreachable",
    "VersionMismatchError",
    "as_spec",
    "check_manager",
    "check_scheduler_reachable",
    "check_versions",
    "cluster_from_cli",
    "cluster_record",
    "collect_versions",
    "connect",
    "count_gpus",
    "from_spec",
    "import_manager",
    "refuse_spawned_reimport",
    "unguarded_main_script",
    "version_mismatches",
]

log = protect_logger(logging.getLogger(__name__))

#: Packages that must have one version on the client, the scheduler and every worker.
CHECKED_PACKAGES = ("lenscan", "dask", "distributed", "torch")
_ADDRESS_KINDS = ("address", "scheduler_file")


class SchedulerUnreachable(OSError, ValueError):
    """Nothing answers at the scheduler address (a :class:`ValueError` too: a bad input)."""


class VersionMismatchError(RuntimeError):
    """Scheduler or workers run other versions of lenscan, dask, distributed or torch."""


def count_gpus() -> int:
    """Number of CUDA GPUs visible to this process (0 without torch CUDA support)."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # a broken CUDA install must not stop a CPU scan
        return 0


def as_spec(spec: ClusterSpec | Mapping[str, Any] | str | Path | None) -> ClusterSpec:
    """A :class:`ClusterSpec` from a spec, its plain data, a spec file path, or ``None``."""
    if spec is None:
        return ClusterSpec()
    if isinstance(spec, ClusterSpec):
        return spec
    if isinstance(spec, str | Path):
        return ClusterSpec.from_yaml(spec)
    return ClusterSpec.from_dict(spec)


def cluster_from_cli(path: str | Path, flags: Mapping[str, Any]) -> ClusterSpec:
    """The spec in file ``path`` with ``--scheduler``/``--workers``/... flag values applied."""
    spec = ClusterSpec.from_yaml(path)
    if not flags:
        return spec
    data = {**spec.to_dict(), "kwargs": spec.kwargs, **flags}
    try:
        if "scheduler" in flags:  # a running scheduler replaces what the file describes
            data = {"scheduler": flags["scheduler"], "check_versions": spec.check_versions}
        return ClusterSpec.from_dict(data)
    except ValueError as exc:
        raise ValueError(f"--cluster {path} with {sorted(flags)}: {exc}") from exc


def from_spec(spec: ClusterSpec | Mapping[str, Any] | str | Path | None = None) -> Any:
    """Start the cluster a spec describes and return its cluster manager.

    Parameters
    ----------
    spec : ClusterSpec, mapping, path or None
        The spec, its plain data (YAML's form), or a spec file such as ``cluster/slurm-cpu.yaml``.

    Returns
    -------
    distributed.deploy.Cluster
        A ``LocalCluster``, ``LocalCUDACluster`` or the manager named by ``class:``, already
        scaled or adapting as the spec says, started with ``spec.dask_config`` set (settings
        read later need it set around its use too, as :func:`connect` does). The caller closes
        it (it is a context manager).

    Raises
    ------
    ValueError
        For specs of kind ``address``/``scheduler_file`` (they name a running cluster: use
        :func:`connect`), and for invalid specs.
    """
    spec = as_spec(spec)
    kind = spec.resolved_kind
    if kind in _ADDRESS_KINDS:
        raise ValueError(
            f"a cluster spec of kind {kind!r} names a running scheduler; connect() to it"
        )
    if kind != "class":
        refuse_spawned_reimport()
        with dask.config.set(spec.dask_config):
            return _local_cluster(spec, cuda=kind == "local-cuda")
    assert spec.manager is not None  # kind "class" is only ever inferred from it
    factory = check_manager(spec.manager, spec.kwargs)
    with dask.config.set(spec.dask_config):
        try:
            cluster = factory(**spec.kwargs)
        except Exception as exc:
            hint = _spec_field_hint(spec, exc)
            if hint is None:
                raise
            raise ValueError(hint) from exc
    try:
        if isinstance(spec.scale, int):
            cluster.scale(spec.scale)
        elif spec.scale is not None:
            cluster.scale(**spec.scale)
        elif spec.adapt is not None:
            cluster.adapt(**spec.adapt)
    except Exception:
        cluster.close()
        raise
    return cluster


def _spec_field_hint(spec: ClusterSpec, exc: BaseException) -> str | None:
    """One line naming the spec field to edit when a manager refuses a site-specific value."""
    message = str(exc)
    if "is not a valid network interface" in message:
        valid = message.split("Valid network interfaces are:")[-1].strip(" .[]")
        return (
            f"cluster spec ({spec.manager}): kwargs.interface {spec.kwargs.get('interface')!r} "
            f"is not a network interface of this machine (it has {valid}): edit the "
            "`interface:` line of the spec to the network the nodes share, or null for the "
            "default"
        )
    return None


def _local_cluster(spec: ClusterSpec, *, cuda: bool = False) -> Any:
    n_gpus = count_gpus()
    use_gpu = cuda or spec.gpu is True or (spec.gpu == "auto" and n_gpus > 0)
    if use_gpu:
        if n_gpus == 0:
            raise ValueError(
                "cluster.gpu is true (or kind local-cuda) but this process sees no CUDA GPU"
            )
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            if cuda or spec.gpu is True:
                raise ValueError(
                    "cluster kind local-cuda needs dask-cuda: pip install 'lenscan[gpu]', "
                    "or set cluster.gpu to auto/false"
                ) from None
            # One worker process drives the first GPU; dask-cuda would give each GPU its own.
            log.warning(
                "%d GPU(s) found but dask-cuda is not installed (pip install 'lenscan[gpu]'): "
                "starting one worker process that uses the first GPU",
                n_gpus,
            )
            return LocalCluster(
                n_workers=1,
                threads_per_worker=spec.threads_per_worker or 1,
                processes=True,
                memory_limit=spec.memory_limit,
                dashboard_address=":0",
            )
        return LocalCUDACluster(
            n_workers=spec.n_workers,
            threads_per_worker=spec.threads_per_worker or 1,
            memory_limit=spec.memory_limit,
            dashboard_address=":0",
        )
    cores = os.cpu_count() or 1
    # Torch already parallelises each forward pass, so favour fewer, fatter workers.
    n_workers = spec.n_workers or max(1, cores // 2)
    threads = spec.threads_per_worker or max(1, cores // n_workers)
    try:
        return LocalCluster(
            n_workers=n_workers,
            threads_per_worker=threads,
            processes=True,
            memory_limit=spec.memory_limit,
            dashboard_address=":0",  # a free port: never clash with another cluster
        )
    except RuntimeError:
        script = unguarded_main_script()
        if script is None:
            raise
        # The cause is distributed's "Nanny failed to start" chain of 200 lines: leave it out.
        raise RuntimeError(_UNGUARDED.format(script=script)) from None


_UNGUARDED = (
    "lenscan's local Dask workers could not start because {script} runs the scan when it is "
    "imported (worker processes import it again): put the code that calls lenscan under "
    '`if __name__ == "__main__":` at the end of {script}'
)


def unguarded_main_script() -> str | None:
    """The path of the ``python script.py`` being run if it has no ``__main__`` guard, else None.

    Worker processes are started by *spawn*: each imports the main script again, so a script
    that scans at import time makes every worker try to start a cluster of its own.
    """
    # A spawned process runs the script as "__mp_main__" while it bootstraps.
    main = sys.modules.get("__mp_main__") or sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if not path or not str(path).endswith(".py") or not os.path.isfile(path):
        return None
    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None
    for node in tree.body:
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            return None
    return str(path)


def refuse_spawned_reimport() -> None:
    """Exit with one line if called while a spawned worker process re-imports the main script.

    Called before a scan or a local cluster starts: in that case the user's script has no
    ``if __name__ == "__main__":`` guard, and going on would start a cluster inside each worker.
    """
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        if unguarded_main_script() is not None:
            raise SystemExit(1)  # the client process finds the same script and says so
        script = getattr(sys.modules.get("__mp_main__"), "__file__", None) or "the main script"
        raise SystemExit(f"lenscan: {_UNGUARDED.format(script=script)}")


_GIL_MONITOR = "distributed.admin.system-monitor.gil.enabled"


@contextlib.contextmanager
def connect(
    spec: ClusterSpec | Mapping[str, Any] | str | Path | None = None,
    client: Client | None = None,
) -> Iterator[Client]:
    """Yield a client: the one given, one connected to a running scheduler, or a new cluster's.

    Clusters and clients this function starts are closed on exit; a client passed in is left
    open (it belongs to the caller). ``spec.dask_config`` is set for the whole block (so a
    scheduler started here, e.g. dask-jobqueue's, runs with it). For clusters that are not
    local, it first waits for
    ``spec.wait_for_workers`` workers (up to ``spec.timeout_s``) and, unless
    ``spec.check_versions`` is false, runs :func:`check_versions`. The dashboard link is logged.
    """
    if client is not None:
        yield client
        return
    spec = as_spec(spec)
    kind = spec.resolved_kind
    with contextlib.ExitStack() as stack:
        if kind in ("local", "local-cuda"):
            # The GIL-contention sampler (on whenever gilknocker is installed) costs a thread
            # waking every millisecond per process, and its native thread can abort the
            # interpreter at exit ("FATAL: exception not rethrown"); spec.dask_config may
            # turn it back on.
            stack.enter_context(dask.config.set({_GIL_MONITOR: False}))
        if spec.dask_config:
            stack.enter_context(dask.config.set(spec.dask_config))
        if kind == "address":
            address = spec.address or spec.scheduler
            check_scheduler_reachable(address)
            active = stack.enter_context(Client(address))
        elif kind == "scheduler_file":
            active = stack.enter_context(
                Client(scheduler_file=spec.scheduler_file or spec.scheduler)
            )
        else:
            cluster = stack.enter_context(from_spec(spec))
            active = stack.enter_context(Client(cluster))
            stack.callback(_quiet_shutdown, active)  # runs first on exit: before any close
        if kind in ("local", "local-cuda"):
            active.register_plugin(IgnoreInterrupts())
        if kind not in ("local", "local-cuda"):
            _wait_for_workers(active, spec, kind)
            if spec.check_versions:
                check_versions(active)
        log.info("Dask dashboard (%s cluster): %s", kind, safe_url(active.dashboard_link))
        yield active


def _stop_heartbeat(dask_worker: Any) -> None:
    dask_worker.periodic_callbacks["heartbeat"].stop()


def _quiet_shutdown(client: Client) -> None:
    """Stop the workers' heartbeats before closing a cluster started here.

    A heartbeat still in flight when a worker closes its connection pool fails and distributed
    logs it with a ``CommClosedError`` traceback: noise on every shutdown, never a fault.
    """
    with contextlib.suppress(Exception):  # a cluster already failing closes as it can
        client.run(_stop_heartbeat)


class IgnoreInterrupts(WorkerPlugin):
    """Worker processes of a local cluster ignore Ctrl-C: the client that started them stops
    them, after committing what is done (a terminal sends SIGINT to the whole process group).

    Closing the cluster then cancels the tasks in flight, which distributed reports with a
    WARNING per task ("Async instruction ... ended with CancelledError"): expected, so dropped.
    """

    name = "lenscan-ignore-interrupts"

    def setup(self, worker: Any) -> None:
        with contextlib.suppress(ValueError):  # not the main thread: nothing to change
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        state_log = logging.getLogger("distributed.worker.state_machine")
        if not any(isinstance(f, DropCancelledTasks) for f in state_log.filters):
            state_log.addFilter(DropCancelledTasks())


class DropCancelledTasks(logging.Filter):
    """Drop distributed's warning that a task ended with ``CancelledError`` (a cancelled task)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).endswith("ended with CancelledError")


def check_scheduler_reachable(address: str | None, timeout_s: float = 5.0) -> None:
    """Refuse, in seconds, a scheduler address where nothing listens.

    ``distributed.Client`` would retry for ``distributed.comm.timeouts.connect`` (30 s) and
    print two tracebacks; a plain TCP connection tells a closed port or an unknown host at once.
    Addresses of other transports (``ucx://``, ``inproc://``) are left to the client.

    Raises
    ------
    SchedulerUnreachable
        Naming the address, why it cannot be reached and what to do.
    """
    from distributed.comm import parse_address, parse_host_port

    if not address:
        return
    scheme, location = parse_address(address)
    if scheme not in ("tcp", "tls"):
        return
    try:
        host, port = parse_host_port(location)
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise SchedulerUnreachable(
            f"--scheduler {address}: no Dask scheduler answers there ({reason}); start one "
            "(`dask scheduler`) or give the address it prints"
        ) from None


def _wait_for_workers(client: Client, spec: ClusterSpec, kind: str) -> None:
    if spec.wait_for_workers == 0:
        return
    try:
        client.wait_for_workers(spec.wait_for_workers, timeout=spec.timeout_s)
    except TimeoutError as exc:
        where = f" ({spec.manager})" if spec.manager else ""
        raise TimeoutError(
            f"{spec.wait_for_workers} worker(s) did not join the {kind} cluster{where} within "
            f"{spec.timeout_s:g} s (cluster.wait_for_workers, cluster.timeout_s): check that "
            "worker jobs or pods start (squeue, kubectl get pods, the cloud console) and their logs"
        ) from exc


def collect_versions(client: Client) -> dict[str, dict[str, str | None]]:
    """Versions of :data:`CHECKED_PACKAGES` per place: ``client``, ``scheduler``, each worker."""
    raw = client.get_versions(check=False, packages=["lenscan", "torch"])
    if not isinstance(raw, dict):  # an asynchronous client returns a coroutine
        raise TypeError("collect_versions needs a synchronous distributed.Client")
    places = {"client": raw["client"], "scheduler": raw["scheduler"]}
    places.update({f"worker {a}": v for a, v in sorted(raw["workers"].items())})
    return {
        place: {p: (info or {}).get("packages", {}).get(p) for p in CHECKED_PACKAGES}
        for place, info in places.items()
    }


def version_mismatches(versions: Mapping[str, Mapping[str, str | None]]) -> list[str]:
    """Lines describing every place whose versions differ from the client's.

    The scheduler runs no tasks, so it may lack torch; every other difference counts.
    """
    mine = versions["client"]
    problems = []
    for place, theirs in versions.items():
        for package in CHECKED_PACKAGES:
            if theirs.get(package) == mine.get(package):
                continue
            if place == "scheduler" and package == "torch" and theirs.get(package) is None:
                continue
            problems.append(
                f"{place} has {package} {theirs.get(package) or '(not installed)'} but the "
                f"client has {mine.get(package) or '(not installed)'}"
            )
    return problems


def check_versions(client: Client) -> dict[str, str | None]:
    """Check that scheduler and workers run the client's lenscan, dask, distributed, torch.

    Returns
    -------
    dict
        The client's versions of :data:`CHECKED_PACKAGES`.

    Raises
    ------
    VersionMismatchError
        Listing every place and package that differs.
    """
    versions = collect_versions(client)
    problems = version_mismatches(versions)
    if problems:
        raise VersionMismatchError(
            "the cluster runs other versions than this client: "
            + "; ".join(problems)
            + ". Install the same versions everywhere (the images in cluster/ pin them with "
            "cluster/requirements.lock), or set cluster.check_versions: false to run anyway."
        )
    return versions["client"]


def cluster_record(client: Client, spec: ClusterSpec | None = None) -> dict[str, Any]:
    """What ``run.json`` records about the cluster a scan ran on (never credentials).

    Parameters
    ----------
    client : distributed.Client
        The connected client.
    spec : ClusterSpec, optional
        The spec the cluster came from; ``None`` for a client the caller passed in (kind
        ``"client"``).

    Returns
    -------
    dict
        ``kind``, ``class``, ``scheduler`` and ``dashboard`` (without user, password or query),
        ``n_workers`` and ``n_threads`` when the sweep started, ``scale``/``adapt``,
        ``versions`` (the client's lenscan, dask, distributed, torch) and ``versions_match``.
    """
    info = client.scheduler_info(n_workers=-1)
    workers = info.get("workers", {})
    versions = collect_versions(client)
    return {
        "kind": spec.resolved_kind if spec else "client",
        "class": spec.manager if spec else None,
        "scheduler": safe_url(info.get("address") or client.scheduler.address),
        "dashboard": safe_url(client.dashboard_link),
        "n_workers": len(workers),
        "n_threads": sum(w.get("nthreads", 0) for w in workers.values()),
        "scale": spec.scale if spec else None,
        "adapt": spec.adapt if spec else None,
        "versions": versions["client"],
        "versions_match": not version_mismatches(versions),
    }
