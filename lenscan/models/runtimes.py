"""Self-contained exported models: torch.export (``.pt2``), ONNX and TorchScript.

An exported model is one graph that maps normalised stamps ``(N, B, S, S)`` to the logits of every
ensemble member ``(N, n_members)``, stored as ``{stem}{suffix}`` beside the same JSON metadata as
a safetensors checkpoint (bands, stamp size, normalisation, threshold, card) with
``"runtime"`` naming the format. No Python class is needed to load it: a team can sweep with a
network lenscan has never seen. :class:`~lenscan.models.LensModel` scores every runtime through
the same :meth:`~lenscan.models.LensModel.score` (batching, dihedral averaging), so the sweep's
workers treat them alike.

=============  ==========  ==================================================================
runtime        suffix      loaded with
=============  ==========  ==================================================================
``torch``      .safetensors  the architecture's factory + safetensors weights (the default)
``export``     .pt2        ``torch.export.load`` (the recommended exported form)
``onnx``       .onnx       onnxruntime (``lenscan[onnx]``; CPU, or CUDA with onnxruntime-gpu)
``torchscript``  .pt       ``torch.jit.load`` (deprecated by PyTorch; read for existing models)
=============  ==========  ==================================================================
"""

from __future__ import annotations

import io
import os
import tempfile
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from lenscan.models.registry import RUNTIME_SUFFIXES

__all__ = [
    "EXPORT_FORMATS",
    "EnsembleLogits",
    "OnnxEnsemble",
    "export_bytes",
    "load_exported",
    "runtime_problem",
]

#: Formats ``lenscan models export`` writes.
EXPORT_FORMATS = ("export", "onnx", "torchscript")


class EnsembleLogits(nn.Module):
    """Members side by side: ``(N, B, S, S)`` -> logits ``(N, n_members)``."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Every member's logit of every stamp."""
        return torch.stack([m(x) for m in self.members], dim=1)


class OnnxEnsemble(nn.Module):
    """An ONNX graph run by onnxruntime, called like a torch module (tensors in and out)."""

    def __init__(self, onnx_bytes: bytes, device: torch.device) -> None:
        super().__init__()
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RuntimeError(
                    "an ONNX model on device 'cuda' needs onnxruntime's CUDA execution provider "
                    "(pip install onnxruntime-gpu); this onnxruntime has "
                    f"{ort.get_available_providers()}"
                )
            providers.insert(0, "CUDAExecutionProvider")
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        self.session = ort.InferenceSession(onnx_bytes, options, providers=providers)
        self.input_name = self.session.get_inputs()[0].name
        self.device = device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, n_members)`` as a float32 tensor on the input's device."""
        feed = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        (logits,) = self.session.run(None, {self.input_name: feed})
        return torch.from_numpy(np.asarray(logits, np.float32)).to(x.device)


def runtime_problem(runtime: str) -> str | None:
    """Why ``runtime`` cannot run in this process (a missing package), or None if it can."""
    if runtime == "onnx":
        try:
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            return (
                f"ONNX models need onnxruntime, which cannot be imported here ({exc}); "
                "install lenscan[onnx]"
            )
    return None


def load_exported(runtime: str, raw: bytes, device: torch.device) -> nn.Module:
    """The module of an exported model's bytes, on ``device``, mapping stamps to ``(N, M)``."""
    problem = runtime_problem(runtime)
    if problem:
        raise ImportError(problem)
    if runtime == "onnx":
        return OnnxEnsemble(raw, device)
    if runtime == "export":
        program = torch.export.load(io.BytesIO(raw))
        return program.module().to(device)
    if runtime == "torchscript":
        with warnings.catch_warnings():  # deprecated by PyTorch, still the format many teams hold
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(io.BytesIO(raw), map_location=device)
    raise ValueError(f"unknown model runtime {runtime!r}; known: {sorted(RUNTIME_SUFFIXES)}")


def export_bytes(members: Sequence[nn.Module], example: torch.Tensor, fmt: str) -> bytes:
    """The members of a model as one exported graph in format ``fmt`` (batch size dynamic).

    Parameters
    ----------
    members : sequence of nn.Module
        Eval-mode members on the CPU.
    example : Tensor
        A normalised example batch ``(N, B, S, S)`` with N >= 2 (traces the shapes).
    fmt : {"export", "onnx", "torchscript"}
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"export format must be one of {EXPORT_FORMATS}, got {fmt!r}")
    ensemble = EnsembleLogits(members).eval()
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad(), warnings.catch_warnings():
        # PyTorch's own exporters warn about their internals (deprecations, tracer notes).
        warnings.simplefilter("ignore")
        if fmt == "export":
            program = torch.export.export(ensemble, (example,), dynamic_shapes={"x": {0: batch}})
            buf = io.BytesIO()
            torch.export.save(program, buf)
            return buf.getvalue()
        if fmt == "torchscript":
            buf = io.BytesIO()
            torch.jit.save(torch.jit.trace(ensemble, example), buf)
            return buf.getvalue()
        return _onnx_bytes(ensemble, example, {"x": {0: batch}})


def _onnx_bytes(ensemble: nn.Module, example: torch.Tensor, dynamic: dict[str, Any]) -> bytes:
    with tempfile.TemporaryDirectory(prefix="lenscan-onnx-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        torch.onnx.export(
            ensemble, (example,), path, input_names=["stamps"], output_names=["logits"],
            dynamic_shapes=dynamic, dynamo=True, external_data=False, verbose=False,
        )  # fmt: skip
        with open(path, "rb") as fh:
            return fh.read()
