"""CNN architectures for lens finding, as registered factories.

Every architecture is a factory registered under a name with :func:`register_model` and built with
:func:`create_model`. Models take normalised stamps ``(N, in_chans, S, S)`` and return one logit per
stamp, shape ``(N,)``; they expose ``forward_features`` (the pooled feature vector) and
``forward_head`` (features -> logit), and record ``in_chans`` and ``stamp_size_pix``.

Besides the names registered here, an architecture name may be

* ``timm:<model>``: any `timm <https://huggingface.co/docs/timm>`_ model, built with
  ``pretrained=False``, ``in_chans`` from the bands and one output (needs ``lenscan[timm]``);
* a name that an installed package registers in the ``lenscan.architectures`` entry-point group
  (``[project.entry-points."lenscan.architectures"] my-net = "my_pkg.nets:my_net"``);
* ``package.module:factory``: a factory imported from an installed package.

Every factory is called as ``factory(*, in_chans, stamp_size_pix, **arch_kwargs)`` and must return
a module mapping ``(N, in_chans, S, S)`` to logits ``(N,)`` (``lenscan models check`` tests it).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from typing import Any

import torch
from torch import nn

__all__ = [
    "ENTRY_POINT_GROUP",
    "ArchitectureUnavailable",
    "JacobsCNN",
    "ResNetSmall",
    "TimmLensNet",
    "architecture_problem",
    "create_model",
    "is_architecture_name",
    "jacobs_cnn",
    "list_architectures",
    "register_model",
    "resnet_small",
]

_MODEL_FACTORIES: dict[str, Callable[..., nn.Module]] = {}

#: Entry-point group in which installed packages register architectures by name.
ENTRY_POINT_GROUP = "lenscan.architectures"
_TIMM_PREFIX = "timm:"


class ArchitectureUnavailable(ImportError):
    """An architecture name that cannot be built here: its package is not installed."""


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a model factory under ``name``.

    Parameters
    ----------
    name : str
        Architecture name stored in checkpoint metadata (``ModelMeta.architecture``).

    Returns
    -------
    callable
        A decorator that records the factory and returns it unchanged. The factory is called as
        ``factory(*, in_chans, stamp_size_pix, **arch_kwargs)``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty string, got {name!r}")

    def decorator(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODEL_FACTORIES and _MODEL_FACTORIES[name] is not factory:
            raise ValueError(f"a model architecture named {name!r} is already registered")
        _MODEL_FACTORIES[name] = factory
        return factory

    return decorator


def list_architectures() -> list[str]:
    """Names registered here and by installed packages' ``lenscan.architectures`` entry points.

    ``timm:<model>`` and ``package.module:factory`` names are accepted as well but not listed.
    """
    return sorted({*_MODEL_FACTORIES, *(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))})


def is_architecture_name(name: str) -> bool:
    """Whether ``name`` is a registered name or has the form of a timm or import-path name.

    A cheap check (nothing is imported): whether the name can actually be built is decided by
    :func:`create_model`, or on each Dask worker by :func:`architecture_problem`.
    """
    if not isinstance(name, str) or not name:
        return False
    if name.startswith(_TIMM_PREFIX):
        return len(name) > len(_TIMM_PREFIX)
    if ":" in name:
        module, _, attr = name.partition(":")
        return (
            bool(module)
            and attr.isidentifier()
            and all(part.isidentifier() for part in module.split("."))
        )
    return name in list_architectures()


def architecture_problem(name: str, **arch_kwargs: Any) -> str | None:
    """Why ``name`` cannot be built in this process, or None if it can.

    Resolves the factory (importing its package) without building the network; meant to run on
    every Dask worker before a sweep scores anything (``client.run``).
    """
    try:
        _factory(name)
    except (ArchitectureUnavailable, ValueError) as exc:
        return str(exc)
    return None


def _factory(name: str) -> Callable[..., nn.Module]:
    """The factory behind an architecture name (see the module docstring for the forms)."""
    if name in _MODEL_FACTORIES:
        return _MODEL_FACTORIES[name]
    if name.startswith(_TIMM_PREFIX):
        _import(name, "timm", extra="lenscan[timm]")
        return lambda **kw: TimmLensNet(name[len(_TIMM_PREFIX) :], **kw)
    registered = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    if name in registered:
        ep = registered[name]
        _import(name, ep.module)
        return ep.load()
    if ":" in name and is_architecture_name(name):
        module_name, _, attr = name.partition(":")
        module = _import(name, module_name)
        factory = getattr(module, attr, None)
        if not callable(factory):
            raise ValueError(
                f"architecture {name!r}: module {module_name!r} has no callable {attr!r}"
            )
        return factory
    raise ValueError(f"unknown model architecture {name!r}; known: {list_architectures()}")


def _import(name: str, module: str, *, extra: str | None = None) -> Any:
    """Import ``module`` for architecture ``name``, saying which package is missing if it fails."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing = getattr(exc, "name", None) or module
        hint = f"install {extra}" if extra else f"install the package that provides {module!r}"
        raise ArchitectureUnavailable(
            f"architecture {name!r} needs the Python package {missing!r}, which cannot be "
            f"imported here ({exc}); {hint}"
        ) from exc


def create_model(name: str, *, in_chans: int, stamp_size_pix: int, **kwargs: Any) -> nn.Module:
    """Build a registered architecture.

    Parameters
    ----------
    name : str
        Registered architecture name (see :func:`list_architectures`).
    in_chans : int
        Number of input bands.
    stamp_size_pix : int
        Stamp side length in pixels.
    **kwargs
        Architecture options (the checkpoint's ``arch_kwargs``).

    Returns
    -------
    torch.nn.Module
        A freshly initialised model mapping ``(N, in_chans, S, S)`` to logits ``(N,)``.
    """
    factory = _factory(name)
    if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
        raise ValueError(f"in_chans must be a positive integer, got {in_chans!r}")
    size = stamp_size_pix
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise ValueError(f"stamp_size_pix must be an integer >= 8, got {stamp_size_pix!r}")
    try:
        net = factory(in_chans=in_chans, stamp_size_pix=stamp_size_pix, **kwargs)
    except TypeError as err:
        raise TypeError(f"bad options for model architecture {name!r}: {err}") from err
    if not isinstance(net, nn.Module):
        raise TypeError(f"architecture {name!r} returned a {type(net).__name__}, not an nn.Module")
    return net


def _check_input(x: torch.Tensor, in_chans: int, stamp_size_pix: int) -> None:
    if x.ndim != 4 or x.shape[1] != in_chans or x.shape[2:] != (stamp_size_pix, stamp_size_pix):
        raise ValueError(
            f"model expects stamps of shape (N, {in_chans}, {stamp_size_pix}, {stamp_size_pix}), "
            f"got {tuple(x.shape)}"
        )


class JacobsCNN(nn.Module):
    """A Jacobs et al. (2019)-style CNN: conv + pooling blocks, then dense layers.

    Jacobs et al. used 4 convolutional layers and dense layers on 100 x 100 DES stamps; this
    version is sized for CPU training (default ~130k parameters at 64 x 64), adds batch
    normalisation for fast convergence and ends in a single logit.

    Parameters
    ----------
    in_chans : int
        Input bands.
    stamp_size_pix : int
        Stamp side; at least ``2 ** len(channels)`` so that one pixel is left after the poolings
        (sizes that are not a multiple of it are floored at each pooling).
    channels : sequence of int
        Output channels of the conv blocks; each block is conv -> BN -> ReLU -> 2x2 max-pool.
    kernel_sizes : sequence of int, optional
        Kernel size per block (default 5 for the first, 3 after).
    hidden : int
        Width of the dense hidden layer.
    dropout : float
        Dropout before the last layer (training only).
    """

    def __init__(
        self,
        *,
        in_chans: int,
        stamp_size_pix: int,
        channels: Sequence[int] = (16, 32, 64, 64),
        kernel_sizes: Sequence[int] | None = None,
        hidden: int = 64,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        channels = [int(c) for c in channels]
        if not channels or any(c < 1 for c in channels):
            raise ValueError(f"channels must be a non-empty list of positive ints, got {channels}")
        if kernel_sizes is None:
            kernel_sizes = [5] + [3] * (len(channels) - 1)
        kernel_sizes = [int(k) for k in kernel_sizes]
        if len(kernel_sizes) != len(channels) or any(k < 1 or k % 2 == 0 for k in kernel_sizes):
            raise ValueError(
                f"kernel_sizes must be odd positive ints, one per conv block, got {kernel_sizes}"
            )
        final = stamp_size_pix // 2 ** len(channels)
        if final < 1:
            raise ValueError(
                f"stamp_size_pix={stamp_size_pix} is too small for {len(channels)} pooling blocks"
            )
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.in_chans = in_chans
        self.stamp_size_pix = stamp_size_pix
        layers: list[nn.Module] = []
        c_in = in_chans
        for c_out, k in zip(channels, kernel_sizes, strict=True):
            layers += [
                nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.num_features = c_in * final * final
        self.head = nn.Sequential(
            nn.Linear(self.num_features, int(hidden)),
            nn.ReLU(inplace=True),
            nn.Dropout(float(dropout)),
            nn.Linear(int(hidden), 1),
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Map stamps ``(N, C, S, S)`` to flattened features ``(N, num_features)``."""
        _check_input(x, self.in_chans, self.stamp_size_pix)
        return torch.flatten(self.features(x), 1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Map features ``(N, num_features)`` to logits ``(N,)``."""
        return self.head(features).squeeze(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return one logit per stamp, shape ``(N,)``."""
        return self.forward_head(self.forward_features(x))


class _BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs with a skip connection)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.act = nn.ReLU(inplace=True)
        self.shortcut: nn.Module
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class ResNetSmall(nn.Module):
    """A small ResNet: stem conv, stages of basic blocks, global average pooling, linear head.

    Parameters
    ----------
    in_chans : int
        Input bands.
    stamp_size_pix : int
        Stamp side (any size >= 8; global pooling makes the head size-independent).
    widths : sequence of int
        Channels per stage; every stage after the first halves the resolution.
    blocks_per_stage : int
        Basic blocks per stage.
    dropout : float
        Dropout before the linear head (training only).
    """

    def __init__(
        self,
        *,
        in_chans: int,
        stamp_size_pix: int,
        widths: Sequence[int] = (16, 32, 64),
        blocks_per_stage: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        widths = [int(w) for w in widths]
        if not widths or any(w < 1 for w in widths):
            raise ValueError(f"widths must be a non-empty list of positive ints, got {widths}")
        if int(blocks_per_stage) < 1:
            raise ValueError(f"blocks_per_stage must be >= 1, got {blocks_per_stage}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.in_chans = in_chans
        self.stamp_size_pix = stamp_size_pix
        # Stride-2 stem: stamps are mostly sky, halving early keeps CPU cost low.
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, widths[0], 5, stride=2, padding=2, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        blocks: list[nn.Module] = []
        c_in = widths[0]
        for i, w in enumerate(widths):
            for j in range(int(blocks_per_stage)):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(_BasicBlock(c_in, w, stride))
                c_in = w
        self.stages = nn.Sequential(*blocks)
        self.num_features = c_in
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(float(dropout))
        self.fc = nn.Linear(c_in, 1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Map stamps ``(N, C, S, S)`` to pooled features ``(N, num_features)``."""
        _check_input(x, self.in_chans, self.stamp_size_pix)
        return torch.flatten(self.pool(self.stages(self.stem(x))), 1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Map features ``(N, num_features)`` to logits ``(N,)``."""
        return self.fc(self.drop(features)).squeeze(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return one logit per stamp, shape ``(N,)``."""
        return self.forward_head(self.forward_features(x))


@register_model("jacobs-cnn")
def jacobs_cnn(*, in_chans: int, stamp_size_pix: int, **kwargs: Any) -> JacobsCNN:
    """Jacobs et al. 2019-style CNN (see :class:`JacobsCNN` for options)."""
    return JacobsCNN(in_chans=in_chans, stamp_size_pix=stamp_size_pix, **kwargs)


@register_model("resnet-small")
def resnet_small(*, in_chans: int, stamp_size_pix: int, **kwargs: Any) -> ResNetSmall:
    """Small ResNet (see :class:`ResNetSmall` for options)."""
    return ResNetSmall(in_chans=in_chans, stamp_size_pix=stamp_size_pix, **kwargs)


class TimmLensNet(nn.Module):
    """A timm model as a lens finder: ``in_chans`` bands in, one logit per stamp out.

    Built with ``pretrained=False`` (nothing is downloaded). To start from local pretrained
    weights, load them into ``.net`` before training (see docs/models.md).

    Parameters
    ----------
    timm_name : str
        A timm model name (``timm.list_models()``), e.g. ``"resnet18"``.
    in_chans, stamp_size_pix : int
        Input bands and stamp side.
    **timm_kwargs
        Passed to ``timm.create_model`` (e.g. ``drop_rate``).
    """

    def __init__(self, timm_name: str, *, in_chans: int, stamp_size_pix: int, **timm_kwargs: Any):
        super().__init__()
        import timm

        if "pretrained" in timm_kwargs or "num_classes" in timm_kwargs:
            raise TypeError("timm: architectures set pretrained=False and num_classes=1 themselves")
        try:
            self.net = timm.create_model(
                timm_name, pretrained=False, in_chans=in_chans, num_classes=1, **timm_kwargs
            )
        except RuntimeError as err:  # timm's "Unknown model"
            raise ValueError(f"timm has no model {timm_name!r} ({err})") from err
        self.in_chans = in_chans
        self.stamp_size_pix = stamp_size_pix
        self.num_features = int(getattr(self.net, "num_features", 0))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(N, num_features)``."""
        _check_input(x, self.in_chans, self.stamp_size_pix)
        net: Any = self.net  # a timm model: forward_head / get_classifier are timm's API
        return net.forward_head(net.forward_features(x), pre_logits=True)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Logits ``(N,)`` of pooled features."""
        net: Any = self.net
        return net.get_classifier()(features).squeeze(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return one logit per stamp, shape ``(N,)``."""
        _check_input(x, self.in_chans, self.stamp_size_pix)
        return self.net(x).squeeze(-1)
