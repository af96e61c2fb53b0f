"""Simulator throughput: images/s for batches of 100 x 100 x 3 stamps (PSF, noise, supersampling).

Compares the batched renderer with a naive Python loop that renders the same systems one at a
time with the same code (``N = 1`` batches), and times whole training batches.

Usage::

    python benchmarks/bench_simulate.py                 # CPU
    python benchmarks/bench_simulate.py --device cuda   # GPU, when one is present
"""

from __future__ import annotations

import argparse
import time

import torch

from lenscan.simulate import (
    TrainingSetConfig,
    get_survey_preset,
    make_training_batch,
    render_systems,
    sample_lens_systems,
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, *, min_seconds: float, min_repeats: int = 2) -> float:
    """Best-of-repeats wall time of ``fn()`` (after one warm-up call)."""
    fn()
    _sync(device)
    best, total, reps = float("inf"), 0.0, 0
    while reps < min_repeats or total < min_seconds:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        dt = time.perf_counter() - t0
        best, total, reps = min(best, dt), total + dt, reps + 1
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--batch-sizes", default="1,16,64,256", help="comma-separated")
    parser.add_argument("--stamp-size-pix", type=int, default=100)
    parser.add_argument("--bands", default="g,r,i")
    parser.add_argument("--supersample", type=int, default=3)
    parser.add_argument("--naive-images", type=int, default=16, help="images in the naive loop")
    parser.add_argument("--min-seconds", type=float, default=2.0, help="per measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = get_survey_preset("des")
    bands = tuple(args.bands.split(","))
    size, ss = args.stamp_size_pix, args.supersample
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    gen = torch.Generator(device=device).manual_seed(0)

    def render(params):
        return render_systems(params, preset, size, bands=bands, supersample=ss, generator=gen)

    # naive loop: the same renderer, one system per call
    n_naive = args.naive_images
    naive_params = sample_lens_systems(None, n_naive, generator=gen, device=device)
    singles = [{k: v[i : i + 1] for k, v in naive_params.items()} for i in range(n_naive)]

    def naive():
        for p in singles:
            render(p)

    t_naive = _time(naive, device, min_seconds=args.min_seconds)
    naive_rate = n_naive / t_naive

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"lenscan simulator benchmark: {size}x{size}x{len(bands)} stamps, supersample {ss}, "
        f"Moffat PSF + Poisson noise, device {device} ({name}), "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
    )
    print(f"{'what':<28}{'batch':>7}{'images/s':>12}{'ms/image':>10}{'vs naive':>10}")

    def row(what: str, batch: int, rate: float) -> None:
        print(f"{what:<28}{batch:>7}{rate:>12.1f}{1e3 / rate:>10.2f}{rate / naive_rate:>10.2f}")

    row("naive loop (N=1 calls)", 1, naive_rate)
    for n in sizes:
        params = sample_lens_systems(None, n, generator=gen, device=device)
        t = _time(lambda params=params: render(params), device, min_seconds=args.min_seconds)
        row("render_systems", n, n / t)
    config = TrainingSetConfig(stamp_size_pix=size, bands=bands, supersample=ss)
    n = max(sizes)
    t = _time(
        lambda: make_training_batch(config, n, generator=gen, device=device),
        device,
        min_seconds=args.min_seconds,
    )
    row("make_training_batch (0/1)", n, n / t)


if __name__ == "__main__":
    main()
