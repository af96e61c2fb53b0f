"""The scan's normalisation per stamp, and its stretch against numpy's and torch's asinh.

Side by side in one run, on one core, on ``--n`` synthetic stamps of 3 x ``--size``^2 sky noise
(2 % of them with a NaN edge, as at tile borders): the whole ``normalise_stamps`` and the
asinh stretch alone, ``lenscan.stamps._asinh_inplace`` vs ``np.arcsinh`` vs ``torch.asinh``,
in microseconds per stamp (best of ``--repeat``).

Usage: OMP_NUM_THREADS=1 python benchmarks/bench_normalise.py [--n 2000] [--size 48]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch

from lenscan.stamps import _asinh_inplace, normalise_stamps

SPEC = {"method": "asinh_mad", "softening_sigma": 3.0}


def best_us_per_stamp(fn: Callable[[], object], n: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best / n * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--size", type=int, default=48)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    stamps = rng.normal(100.0, 10.0, size=(args.n, 3, args.size, args.size)).astype(np.float32)
    stamps[: args.n // 50, :, :, : args.size // 4] = np.nan
    z = (rng.standard_normal(stamps.size) / 3).astype(np.float32)

    def stretch(kernel: Callable[[np.ndarray], object]) -> Callable[[], object]:
        return lambda: kernel(z.copy())

    rows = {
        "normalise_stamps (median, MAD, stretch)": lambda: normalise_stamps(stamps, SPEC),
        "stretch: lenscan _asinh_inplace": stretch(_asinh_inplace),
        "stretch: numpy arcsinh": stretch(lambda a: np.arcsinh(a, out=a)),
        "stretch: torch asinh_": stretch(lambda a: torch.from_numpy(a).asinh_()),
        "copy alone (subtract from the stretch rows)": stretch(lambda a: a),
    }
    us = {name: best_us_per_stamp(fn, args.n, args.repeat) for name, fn in rows.items()}
    print(f"{args.n} stamps of 3 x {args.size}^2, one thread; us per stamp (best of {args.repeat})")
    for name, value in us.items():
        print(f"{name:<46} {value:8.1f}")
    copy = us["copy alone (subtract from the stretch rows)"]
    fast = us["stretch: lenscan _asinh_inplace"] - copy
    print(f"numpy arcsinh / lenscan stretch: {(us['stretch: numpy arcsinh'] - copy) / fast:.2f}")
    print(f"torch asinh / lenscan stretch:   {(us['stretch: torch asinh_'] - copy) / fast:.2f}")


if __name__ == "__main__":
    main()
