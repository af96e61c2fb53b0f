"""The ``lenscan ingest`` command line."""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

from lenscan.survey.ingest.graph import ingest

__all__ = ["add_ingest_arguments", "run_ingest_cli"]


def add_ingest_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``lenscan ingest`` arguments to ``parser`` (a sub-command parser)."""
    parser.add_argument("source", help="folder or fsspec URL with the tile FITS files")
    parser.add_argument("out", help="survey store URL to create or add to")
    parser.add_argument(
        "--preset",
        default="des-dr2",
        help="ingest preset name (des-dr2, lsst-dp1, lsst-dp02, hsc-pdr3) or YAML file",
    )
    parser.add_argument(
        "--catalog",
        required=True,
        help="catalogue file (FITS or Parquet) or a template with {tilename} (one per tile)",
    )
    parser.add_argument("--tiles", default=None, help="comma-separated tile names (default: all)")
    parser.add_argument("--bands", default=None, help="comma-separated bands (default: found)")
    parser.add_argument(
        "--shape",
        default="preset",
        help="expected image shape NYxNX, 'any', or 'preset' (default: the preset's)",
    )
    parser.add_argument("--scheduler", default=None, help="Dask scheduler address (default: local)")
    parser.add_argument("--workers", type=int, default=None, help="local Dask worker processes")
    parser.add_argument("--sync", action="store_true", help="run tiles one by one in-process")
    parser.add_argument("--chunk-pix", type=int, default=128)
    parser.add_argument("--shard-pix", type=int, default=2048)
    parser.add_argument(
        "--lossless",
        action="store_true",
        help="store fpack-quantised (lossy) sources losslessly too (default: quantised, within "
        "half a source quantisation step)",
    )
    parser.add_argument(
        "--storage-options", default=None, help="JSON fsspec options for OUT (e.g. credentials)"
    )
    parser.add_argument(
        "--source-storage-options", default=None, help="JSON fsspec options for SOURCE/CATALOG"
    )
    return parser


def _parse_shape(text: str) -> tuple[int, int] | str | None:
    if text in ("preset", "any"):
        return None if text == "any" else "preset"
    m = re.fullmatch(r"\s*(\d+)\s*[xX,]\s*(\d+)\s*", text)
    if not m:
        raise ValueError(f"--shape must be NYxNX, 'any' or 'preset', got {text!r}")
    return int(m.group(1)), int(m.group(2))


def _parse_json(text: str | None, flag: str) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{flag} must be a JSON object ({err})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag} must be a JSON object, got {text!r}")
    return value


def run_ingest_cli(args: argparse.Namespace) -> int:
    """Run ``lenscan ingest`` from parsed arguments; print the summary.

    Returns
    -------
    int
        0 if every tile was ingested or skipped, 1 if some tile failed, 2 on bad arguments.
    """
    import sys

    try:
        client: Any = "sync" if args.sync else None
        if args.scheduler:
            from distributed import Client

            client = Client(args.scheduler)
        summary = ingest(
            args.source,
            args.out,
            preset=args.preset,
            catalog=args.catalog,
            client=client,
            storage_options=_parse_json(args.storage_options, "--storage-options"),
            source_storage_options=_parse_json(
                args.source_storage_options, "--source-storage-options"
            ),
            tiles=args.tiles.split(",") if args.tiles else None,
            bands=args.bands.split(",") if args.bands else None,
            expected_shape_yx=_parse_shape(args.shape),
            chunk_pix=args.chunk_pix,
            shard_pix=args.shard_pix,
            n_workers=args.workers,
            quantise=None if args.lossless else "source",
        )
    except (ValueError, FileNotFoundError, NotADirectoryError, FileExistsError) as err:
        print(f"lenscan ingest: error: {err}", file=sys.stderr)
        return 2
    print(summary)
    return 0 if summary.ok else 1
