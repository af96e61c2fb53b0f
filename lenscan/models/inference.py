"""Inference-only forms of a loaded model: the same scores, computed faster.

A scan's workers and the model-only benchmark score through :func:`inference_model`, which
returns a copy of a :class:`~lenscan.models.LensModel` whose members are rebuilt for scoring:

* ``fp32``: each convolution absorbs the batch normalisation that follows it (the running
  statistics of eval mode become the conv's weight and bias) and the weights go channels-last.
  On CPU a batch norm on channels-last activations is a slow path; without it the bundled
  model scores ~1.7x the stamps/s of the plain channels-last model on one core, with the plain
  model's scores to float rounding (~1e-6; ``benchmarks/bench_model.py``).
* ``bf16``: bfloat16 autocast around that member (opt-in: scores move within bf16 rounding).
* ``compile=True``: the member under ``torch.compile`` (compiled once per process, on its
  first batch; meant for GPU workers).

Nothing here changes what a model computes beyond float rounding; the members keep taking
normalised stamps ``(N, B, S, S)`` and returning logits ``(N,)``.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

if TYPE_CHECKING:
    from lenscan.models.checkpoint import LensModel

__all__ = ["PRECISIONS", "Autocast", "fold_batchnorm", "inference_member", "inference_model"]

#: Scoring precisions: ``fp32`` (the default, scores as trained) and ``bf16`` autocast (opt-in).
PRECISIONS = ("fp32", "bf16")


class Autocast(nn.Module):
    """Run ``inner`` under bfloat16 autocast on its device and return float32 logits."""

    def __init__(self, inner: nn.Module, device_type: str) -> None:
        super().__init__()
        self.inner = inner
        self.device_type = device_type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of ``x`` computed in bfloat16, returned as float32."""
        with torch.autocast(device_type=self.device_type, dtype=torch.bfloat16):
            return self.inner(x).float()


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """Fold every ``Conv2d`` followed by ``BatchNorm2d`` in a ``Sequential`` into one conv.

    Works in place on ``module`` (in eval mode: the running statistics are folded) and returns
    it. Pairs held as separate attributes (a residual block's ``conv1``/``bn1``) are left as
    they are; :func:`torch.jit.freeze` folds those in the traced graph.

    Examples
    --------
    >>> seq = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU()).eval()
    >>> [type(m).__name__ for m in fold_batchnorm(seq)]
    ['Conv2d', 'ReLU']
    """
    for child in module.children():
        fold_batchnorm(child)
    if isinstance(module, nn.Sequential):
        layers = list(module)
        folded: list[nn.Module] = []
        k = 0
        while k < len(layers):
            conv, nxt = layers[k], layers[k + 1] if k + 1 < len(layers) else None
            if isinstance(conv, nn.Conv2d) and isinstance(nxt, nn.BatchNorm2d):
                folded.append(fuse_conv_bn_eval(conv, nxt))
                k += 2
            else:
                folded.append(conv)
                k += 1
        module._modules.clear()
        for j, layer in enumerate(folded):
            module.add_module(str(j), layer)
    return module


def inference_member(
    member: nn.Module,
    *,
    device_type: str = "cpu",
    precision: str = "fp32",
    compile: bool = False,
) -> nn.Module:
    """One member rebuilt for scoring (see the module docstring); ``member`` is not changed.

    Parameters
    ----------
    member : torch.nn.Module
        A member network in eval mode, on its device.
    device_type : str
        The member's device type (``"cpu"``, ``"cuda"``), for autocast.
    precision : {"fp32", "bf16"}
        Scoring precision.
    compile : bool
        Wrap the result in ``torch.compile`` (compiled on first call; GPU workers).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    net = copy.deepcopy(member).eval()
    net = fold_batchnorm(net).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    out: nn.Module = Autocast(net, device_type) if precision == "bf16" else net
    return torch.compile(out) if compile else out  # type: ignore[return-value]


def inference_model(
    model: LensModel, *, precision: str = "fp32", compile: bool = False
) -> LensModel:
    """A copy of ``model`` whose members are :func:`inference_member` forms of its own.

    Score it with :meth:`~lenscan.models.LensModel.score` as usual, on channels-last stamps
    (``x.contiguous(memory_format=torch.channels_last)``) for the full speed.

    Parameters
    ----------
    model : LensModel
        A loaded model (on the device it will score on).
    precision : {"fp32", "bf16"}
        ``fp32`` gives the plain model's scores to float rounding; ``bf16`` (autocast) is
        faster on GPUs and on CPUs with native bfloat16, scores within bf16 rounding.
    compile : bool
        ``torch.compile`` each member (compiled once per process, on its first batch).

    Returns
    -------
    LensModel
        A new model object sharing ``meta``, ``sha256`` and ``path`` with ``model``; an exported
        model (``meta.runtime`` other than ``torch``) is returned as it is.
    """
    if model.meta.runtime != "torch":
        return model  # an exported graph: its own runtime optimises it
    device_type = torch.device(model.device).type
    fast = copy.copy(model)
    fast.members = [
        inference_member(m, device_type=device_type, precision=precision, compile=compile)
        for m in model.members
    ]
    return fast
