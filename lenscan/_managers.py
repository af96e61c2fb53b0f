"""Cluster managers named by dotted path: import one, and check the arguments a spec gives it.

Kept apart from :mod:`lenscan.cluster` so that the config layer can check a spec's manager
when the spec is loaded, without importing the cluster layer (no import cycle).
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Mapping
from typing import Any

from distributed import LocalCluster

__all__ = ["EXTRAS", "check_manager", "import_manager"]

_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")

#: The lenscan extra that installs each cluster manager's top-level package.
EXTRAS = {
    "dask_jobqueue": "slurm",
    "dask_kubernetes": "kubernetes",
    "kr8s": "kubernetes",
    "dask_cloudprovider": "cloud-vm",
    "aiobotocore": "cloud-vm",
    "azure": "cloud-vm",
    "googleapiclient": "cloud-vm",
    "dask_gateway": "gateway",
    "coiled": "coiled",
    "dask_cuda": "gpu",
}


def import_manager(path: str) -> Any:
    """Import the cluster manager class (or factory) at dotted ``path``.

    Raises
    ------
    ValueError
        If the path is malformed or names nothing; if its package is missing, the message
        names the lenscan extra that installs it.
    """
    if not isinstance(path, str) or not _DOTTED.fullmatch(path):
        raise ValueError(f"cluster.class must be a dotted path like module.Class, got {path!r}")
    module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        top = (getattr(exc, "name", None) or module_name).split(".")[0]
        extra = EXTRAS.get(top) or EXTRAS.get(module_name.split(".")[0])
        hint = f": pip install 'lenscan[{extra}]'" if extra else ""
        raise ValueError(f"cluster.class {path!r} cannot be imported ({exc}){hint}") from exc
    obj = getattr(module, attr, None)
    if obj is None or not callable(obj):
        raise ValueError(f"cluster.class {path!r}: module {module_name} has no callable {attr!r}")
    return obj


def _accepted_names(obj: Any) -> set[str] | None:
    """Keyword names ``obj(...)`` accepts, following ``**kwargs`` up the class hierarchy.

    dask-jobqueue clusters pass unknown keywords to their job class, so its names count too.
    ``None`` means any name may be accepted (the chain ends in an open ``**kwargs``).
    """
    names = _chain_names(obj)
    job_cls = getattr(obj, "job_cls", None)
    if names is not None and inspect.isclass(job_cls):
        job_names = _chain_names(job_cls)
        names = None if job_names is None else names | job_names
    return names


def _chain_names(obj: Any) -> set[str] | None:
    if inspect.isclass(obj):
        chain = [k.__dict__["__init__"] for k in inspect.getmro(obj) if "__init__" in k.__dict__]
    else:
        chain = [obj]
    if inspect.isclass(obj) and issubclass(obj, LocalCluster):
        return None  # LocalCluster passes its **kwargs to every worker, not to its base class
    names: set[str] = set()
    for fn in chain:
        if fn is object.__init__:
            break
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):
            return None
        names |= {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return names - {"self"}
    return None


def check_manager(path: str, kwargs: Mapping[str, Any]) -> Any:
    """Import the manager at ``path`` and check that it accepts every key of ``kwargs``.

    Returns the class or factory. Raises ``ValueError`` naming the field that is wrong.
    """
    obj = import_manager(path)
    accepted = _accepted_names(obj)
    if accepted is not None:
        unknown = sorted(set(kwargs) - accepted)
        if unknown:
            raise ValueError(
                f"cluster.kwargs: {unknown} are not arguments of {path} "
                f"(it takes: {', '.join(sorted(accepted))})"
            )
    return obj
