"""Model-only throughput by precision and memory format (the GPU side of issue 10, target 4).

Scores normalised stamps already in memory with the bundled (or given) model's members, for
the plain fp32 model, fp32 + channels_last, the scan workers' inference form
(``lenscan.models.inference``: batch norm folded into the convs, channels_last) in fp32 and
under bf16 autocast and, with ``--compile``, both under ``torch.compile``; from pageable and
from pinned host memory (non-blocking copies) on CUDA. Prints stamps/s per variant and the
largest score difference to the plain fp32 model (fp32 forms must agree to ~1e-6, bf16 within
bf16 tolerance).

Usage: python benchmarks/bench_model.py [--device cuda] [--batch-size 2048] [--n 16384]
       [--compile] [--json FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from lenscan.models import DEFAULT_MODEL, load_model
from lenscan.models.inference import inference_member

CL = torch.channels_last


def run(members, x: torch.Tensor, batch: int, device: str, *, cl: bool) -> np.ndarray:
    """Sigmoid scores of every member, batch by batch, copies included."""
    out = []
    with torch.inference_mode():
        for k in range(0, len(x), batch):
            chunk = x[k : k + batch].to(device, non_blocking=True)
            if cl:
                chunk = chunk.contiguous(memory_format=torch.channels_last)
            out.append(torch.stack([torch.sigmoid(m(chunk).float()) for m in members], 1))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return torch.cat(out).cpu().numpy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--compile", action="store_true")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("bench_model: --device cuda but torch sees no CUDA GPU")
    torch.set_num_threads(args.threads)
    model = load_model(args.model, device=args.device)
    s, b = model.meta.stamp_size_pix, len(model.meta.bands)
    rng = np.random.default_rng(0)
    x = model.normalise(rng.normal(100, 10, size=(args.n, b, s, s)).astype(np.float32))
    members = [m.eval() for m in model.members]
    dev_type = args.device.split(":")[0]

    def form(precision: str, compile: bool):
        return [
            inference_member(m, device_type=dev_type, precision=precision, compile=compile)
            for m in members
        ]

    variants = [
        ("fp32 plain", lambda: members, False),
        (
            "fp32 channels_last",
            lambda: [copy.deepcopy(m).to(memory_format=CL) for m in members],
            True,
        ),
        ("fp32 inference (scan workers)", lambda: form("fp32", False), True),
    ]
    if args.device.startswith("cuda") or torch.backends.mkldnn.is_available():
        variants.append(("bf16 inference", lambda: form("bf16", False), True))
    if args.compile:
        variants.append(("fp32 inference compiled", lambda: form("fp32", True), True))
        variants.append(("bf16 inference compiled", lambda: form("bf16", True), True))
    rows, ref = [], None
    for name, build, cl in variants:
        mods = build()
        sources = [("pageable", x)]
        if args.device.startswith("cuda"):
            sources.append(("pinned", x.pin_memory()))
        for src_name, src in sources:
            run(mods, src[: args.batch_size], args.batch_size, args.device, cl=cl)  # warm-up
            t0 = time.perf_counter()
            got = run(mods, src, args.batch_size, args.device, cl=cl)
            rate = len(src) / (time.perf_counter() - t0)
            ref = got if ref is None else ref
            rows.append((f"{name}, {src_name}", rate, float(np.abs(got - ref).max())))
    print(
        f"model {model.name} ({s} px, {len(members)} members), device {args.device}, batch "
        f"{args.batch_size}, {args.n} stamps, {args.threads} threads; load average "
        f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}"
    )
    print(f"{'variant':<46}{'stamps/s':>10}{'max |d score|':>15}")
    for name, rate, diff in rows:
        print(f"{name:<46}{rate:>10.0f}{diff:>15.2e}")
    if args.json:
        args.json.write_text(json.dumps({"device": args.device, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
