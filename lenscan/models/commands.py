"""``lenscan models``: list, show, check and export models.

``check`` is the first thing to run on a model from elsewhere: it loads it (any runtime), scores
a synthetic batch, checks what comes out against the metadata and prints stamps/s here.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from lenscan.models.checkpoint import LensModel, export_model, load_model
from lenscan.models.registry import DEFAULT_MODEL, list_bundled_models
from lenscan.models.runtimes import EXPORT_FORMATS

__all__ = ["add_models_arguments", "check_model", "run_models_cli"]


def add_models_arguments(p: argparse.ArgumentParser) -> None:
    """The ``models`` subcommands (``list`` when none is given)."""
    sub = p.add_subparsers(dest="models_command")
    sub.add_parser("list", help="list the bundled models (the default)")
    show = sub.add_parser("show", help="a model's metadata and model card")
    show.add_argument("model", help="bundled model name or path of a model's .json")
    check = sub.add_parser("check", help="load a model, score a synthetic batch, time it")
    check.add_argument("model", help="bundled model name or path of a model's .json")
    check.add_argument("--batch", type=int, default=256, help="stamps per batch (default 256)")
    check.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    export = sub.add_parser("export", help="write a model as one self-contained graph")
    export.add_argument("model", help="bundled model name or path of a model's .json")
    export.add_argument("--format", choices=EXPORT_FORMATS, required=True,
                        help="export: torch.export .pt2; onnx; torchscript (.pt)")  # fmt: skip
    export.add_argument("--out", help="output path without suffix (default: ./NAME-FORMAT)")


def run_models_cli(args: argparse.Namespace) -> int:
    """Run the ``models`` subcommand named in ``args``."""
    command = getattr(args, "models_command", None) or "list"
    if command == "show":
        return _show(load_model(args.model))
    if command == "check":
        report = check_model(args.model, batch=args.batch, device=args.device)
        print(_format_check(report))
        return 0 if report["ok"] else 1
    if command == "export":
        return _export(args)
    return _list(bool(getattr(args, "verbose", False)))


def check_model(model: str, *, batch: int = 256, device: str = "cpu") -> dict[str, Any]:
    """Load ``model``, score a synthetic batch and time it.

    Returns
    -------
    dict
        ``ok``, ``problems`` (list of str), the model's ``name``, ``runtime``, ``bands``,
        ``stamp_size_pix``, ``n_members``, ``threshold``, the output ``shape`` and
        ``stamps_per_second`` (normalisation and forward, the best of three timed batches).
    """
    if batch < 1:
        raise ValueError(f"--batch must be >= 1, got {batch}")
    loaded = load_model(model, device=device)
    meta = loaded.meta
    raw = torch.randn(batch, len(meta.bands), meta.stamp_size_pix, meta.stamp_size_pix)
    raw[:, :, meta.stamp_size_pix // 2, meta.stamp_size_pix // 2] += 50.0  # a source in the middle
    probs = loaded.score(loaded.normalise(raw), batch_size=batch)
    problems = _output_problems(loaded, probs, batch)
    seconds = min(_timed(loaded, raw) for _ in range(3))
    return {
        "ok": not problems,
        "problems": problems,
        "name": meta.name,
        "runtime": meta.runtime,
        "architecture": meta.architecture,
        "bands": list(meta.bands),
        "stamp_size_pix": meta.stamp_size_pix,
        "n_members": meta.n_members,
        "threshold": meta.recommended_threshold,
        "shape": list(probs.shape),
        "device": str(loaded.device),
        "stamps_per_second": batch / seconds,
    }


def _output_problems(model: LensModel, probs: torch.Tensor, batch: int) -> list[str]:
    expected = (batch, model.meta.n_members)
    problems = []
    if tuple(probs.shape) != expected:
        problems.append(f"scores have shape {tuple(probs.shape)}, metadata implies {expected}")
    if not torch.isfinite(probs).all():
        problems.append("scores are not all finite")
    elif ((probs < 0) | (probs > 1)).any():
        problems.append("probabilities outside [0, 1]")
    if not 0.0 <= model.meta.recommended_threshold <= 1.0:
        problems.append(f"threshold {model.meta.recommended_threshold} is outside [0, 1]")
    return problems


def _timed(model: LensModel, raw: torch.Tensor) -> float:
    t0 = time.perf_counter()
    model.score(model.normalise(raw), batch_size=len(raw))
    return time.perf_counter() - t0


def _format_check(report: dict[str, Any]) -> str:
    lines = [
        f"{report['name']}: runtime {report['runtime']} ({report['architecture']}), "
        f"{report['n_members']} member(s), bands {''.join(report['bands'])}, "
        f"{report['stamp_size_pix']} px stamps, threshold {report['threshold']:g}",
        f"scores of a synthetic batch: shape {tuple(report['shape'])} on {report['device']}",
        f"{report['stamps_per_second']:,.0f} stamps/s here (normalise + forward, "
        f"batch {report['shape'][0]})",
    ]
    lines += [f"PROBLEM: {p}" for p in report["problems"]]
    lines.append("ok" if report["ok"] else "the model failed its check")
    return "\n".join(lines)


def _show(model: LensModel) -> int:
    meta = model.meta
    print(f"{meta.name}: {meta.description}".rstrip(": "))
    print(f"  runtime {meta.runtime}, architecture {meta.architecture} {meta.arch_kwargs or ''}")
    print(f"  bands {''.join(meta.bands)}, {meta.stamp_size_pix} px at "
          f"{meta.pixel_scale_arcsec:g}\"/px, {meta.n_members} member(s), "
          f"threshold {meta.recommended_threshold:g}, sha256 {model.sha256[:16]}")  # fmt: skip
    print("model card:")
    print(json.dumps(meta.card, indent=2) if meta.card else "  (none recorded)")
    return 0


def _export(args: argparse.Namespace) -> int:
    source = load_model(args.model)
    stem = Path(args.out) if args.out else Path(f"{source.name}-{args.format}")
    weights, meta_path = export_model(source, stem, args.format)
    exported = load_model(meta_path)
    raw = torch.randn(16, len(source.meta.bands), source.meta.stamp_size_pix,
                      source.meta.stamp_size_pix)  # fmt: skip
    x = source.normalise(raw)
    diff = float((exported.score(x) - source.score(x)).abs().max())
    print(f"wrote {weights} and {meta_path} (max score difference to the eager model {diff:.1e})")
    return 0


def _list(verbose: bool) -> int:
    for name in list_bundled_models():
        model = load_model(name)
        flag = " (default)" if name == DEFAULT_MODEL else ""
        print(
            f"{name}{flag}: {model.meta.architecture} x{model.meta.n_members}, "
            f"bands {''.join(model.meta.bands)}, {model.meta.stamp_size_pix} px, "
            f"sha256 {model.sha256[:12]}"
        )
        if verbose:
            print(json.dumps(model.meta.metrics, indent=2))
    return 0
