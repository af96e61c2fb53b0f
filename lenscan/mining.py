"""Hard-negative mining: scan a lens-free survey and keep its highest-scoring non-lenses.

``lenscan mine-negatives SURVEY_URL --out DIR`` (or :func:`mine_hard_negatives`) scans a survey
that holds no known lenses (a synthetic survey built with ``lenses_per_tile=0``, or a real
survey with its known lenses removed) with a model and a colour cut, drops any injected lens
listed in the survey's truth table, and writes the ``top`` highest-scoring objects to
``DIR/hard_negatives.parquet`` (columns ``survey_url``, ``tile``, ``id``, ``score``). A
training config then fine-tunes on them as kind 5 (``training_set.hard_negatives``; see
``workflows/train-des-v2-hardneg.yaml``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["mine_hard_negatives"]


def mine_hard_negatives(
    survey_url: str,
    out: str | os.PathLike[str],
    *,
    model: str = "default",
    colour_cut: str | None = None,
    top: int = 2000,
    client: Any = None,
    progress: bool = False,
) -> Path:
    """Scan ``survey_url`` and write its ``top`` highest-scoring non-lenses.

    Parameters
    ----------
    survey_url : str
        Survey to mine (no real lenses in it, or their ids in a ``truth.parquet`` beside it).
    out : path
        Directory for the scan (``out/scan``) and ``out/hard_negatives.parquet``.
    model : str
        Model that scores the survey (the one to be fine-tuned).
    colour_cut : str, optional
        Preselection (default: the scan's default cut).
    top : int
        Objects kept (the highest scores; each object once, tile overlaps merged).
    client : distributed.Client, optional
        A Dask client (default: a local cluster).
    progress : bool
        Show the scan's progress bar.

    Returns
    -------
    Path
        The Parquet file written.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lenscan._secrets import safe_url
    from lenscan.select import DEFAULT_COLOUR_CUT
    from lenscan.simulate.training import truth_ids as _truth_ids
    from lenscan.sweep import read_scored, scan

    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"top must be a positive integer, got {top!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scan(
        survey_url,
        out=str(out / "scan"),
        model=model,
        colour_cut=colour_cut or DEFAULT_COLOUR_CUT,
        client=client,
        gallery_size=0,
        progress=progress,
    )
    scored = read_scored(str(out / "scan"))
    ids = np.asarray(scored["id"], np.int64)
    score = np.asarray(scored["score"], np.float64)
    tiles = np.asarray(scored["tile"]).astype(str)
    keep = ~np.isin(ids, _truth_ids(survey_url, None))
    order = np.argsort(-score[keep], kind="stable")
    ids, score, tiles = ids[keep][order], score[keep][order], tiles[keep][order]
    _, first = np.unique(ids, return_index=True)  # one row per object (overlaps)
    first = np.sort(first)[:top]
    path = out / "hard_negatives.parquet"
    table = pa.table(
        {
            # Credentials travel as storage options, never in a file others read.
            "survey_url": [safe_url(str(survey_url))] * len(first),
            "tile": tiles[first].tolist(),
            "id": ids[first],
            "score": score[first],
        }
    )
    pq.write_table(table, path)
    return path


def add_mine_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``lenscan mine-negatives`` arguments to ``parser``."""
    parser.add_argument("survey_url", help="lens-free survey store to mine")
    parser.add_argument("--out", required=True, help="directory for the scan and the list")
    parser.add_argument("--model", default="default", help="model to score with")
    parser.add_argument("--cut", default=None, help="colour cut (default: the scan's default)")
    parser.add_argument("--top", type=int, default=2000, help="highest-scoring objects kept")


def run_mine_cli(args: argparse.Namespace) -> int:
    """Run ``lenscan mine-negatives``; prints the file written, returns 0."""
    path = mine_hard_negatives(
        args.survey_url, args.out, model=args.model, colour_cut=args.cut, top=args.top,
        progress=True,
    )  # fmt: skip
    import pyarrow.parquet as pq

    scores = pq.read_table(path, columns=["score"]).column("score").to_numpy()
    print(
        f"{len(scores)} hard negatives written to {path} (scores {scores.min():.4f} - "
        f"{scores.max():.4f}; {int((scores >= 0.5).sum())} at >= 0.5)"
    )
    return 0
