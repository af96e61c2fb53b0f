"""The ``lenscan`` command: thin wrappers that parse arguments, build a config and call the API."""

from __future__ import annotations

import argparse
import json
import logging
import os
import posixpath
import sys
import traceback
from collections.abc import Callable, Sequence

from lenscan._secrets import protect_logger, safe_text, safe_url
from lenscan._version import __version__

__all__ = [
    "build_parser",
    "cmd_demo",
    "cmd_make_survey",
    "cmd_models",
    "cmd_scan",
    "format_outputs",
    "format_summary",
    "main",
    "setup_logging",
]


def _add_scan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("survey_url", nargs="?", help="survey store URL (or give --config)")
    p.add_argument("--config", help="scan config YAML (workflows/*.yaml); flags override it")
    p.add_argument(
        "--model", help="bundled model name or checkpoint path (default: the survey's own)"
    )
    p.add_argument("--out", help="output folder URL")
    p.add_argument(
        "--cut",
        dest="colour_cut",
        help="colour cut preset (default: the survey's own; DES des-jacobs19-wide, des-jacobs19 "
        "is the 2019a box)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        help="candidate score threshold in [0, 1] (default: the model's, which keeps 0.9 of "
        "bright lenses on its calibration surveys)",
    )
    p.add_argument(
        "--false-rate",
        type=float,
        metavar="PER_1000",
        help="instead of --threshold: the false candidates per 1000 scored non-lenses to allow "
        "(threshold from the model's calibration curve)",
    )
    p.add_argument(
        "--top",
        type=int,
        metavar="N",
        help="inspection budget: keep the N highest-scoring candidates (alone: whatever their "
        "score; with --threshold or --false-rate: at most N of those)",
    )
    p.add_argument("--cluster", help="cluster spec YAML (cluster/*.yaml); see docs/clusters.md")
    p.add_argument("--scheduler", help="address or scheduler file of a running Dask scheduler")
    p.add_argument("--workers", type=int, help="local cluster workers")
    p.add_argument("--threads-per-worker", type=int, help="local cluster threads per worker")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="CNN device on workers")
    p.add_argument("--batch-size", type=int, help="stamps per forward pass")
    p.add_argument("--precision", choices=("fp32", "bf16"), help="bf16: autocast (GPU speed)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model per worker")
    p.add_argument("--tiles", nargs="+", help="scan only these tiles")
    p.add_argument("--formats", nargs="+", help="parquet fits votable ecsv hats")
    p.add_argument(
        "--known-lenses",
        help="flag known lenses: lenscat (bundled, default), a table or HATS catalogue, or none",
    )
    p.add_argument(
        "--hats-scored", action="store_true", help="also write every scored row as OUT/scored.hats"
    )
    p.add_argument("--no-resume", action="store_true", help="rescore tiles already done")
    p.add_argument(
        "--dihedral",
        action="store_true",
        help="score each stamp as the mean of its 8 rotations/flips (8x the CNN time)",
    )
    p.add_argument(
        "--allow-failures",
        action="store_true",
        help="exit 0 even if tiles or sources failed (they are listed in OUT/failures.parquet)",
    )
    p.add_argument("--gallery-size", type=int, help="top candidates in the gallery (0: none)")
    p.add_argument(
        "--break-lease",
        action="store_true",
        help="take over --out from a run that still holds its lease (one known to be dead)",
    )
    p.add_argument(
        "--storage-options",
        metavar="JSON",
        help="fsspec options for the survey as a JSON object, e.g. '{\"anon\": true}' or "
        '\'{"client_kwargs": {"endpoint_url": "http://host:9000"}}\'; credentials are better '
        "left in the environment (AWS_*, GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_*)",
    )
    p.add_argument(
        "--out-storage-options", metavar="JSON", help="the same for --out, as a JSON object"
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _scan_config(args: argparse.Namespace):
    from lenscan.config import ScanConfig

    overrides = {
        "survey_url": args.survey_url,
        "out": args.out,
        "model": args.model,
        "colour_cut": args.colour_cut,
        "threshold": args.threshold,
        "false_rate": args.false_rate,
        "top": args.top,
        "device": args.device,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "compile_model": True if args.compile else None,
        "tiles": args.tiles,
        "formats": args.formats,
        "gallery_size": args.gallery_size,
        "known_lenses": args.known_lenses,
        "hats_scored": True if args.hats_scored else None,
        "resume": False if args.no_resume else None,
        "allow_failures": True if args.allow_failures else None,
        "dihedral_average": True if args.dihedral else None,
        "break_lease": True if args.break_lease else None,
        "storage_options": _json_options("--storage-options", args.storage_options),
        "out_storage_options": _json_options("--out-storage-options", args.out_storage_options),
    }
    cluster = {
        "scheduler": args.scheduler,
        "n_workers": args.workers,
        "threads_per_worker": args.threads_per_worker,
    }
    cluster = {k: v for k, v in cluster.items() if v is not None}
    if args.cluster:
        from lenscan.cluster import cluster_from_cli

        overrides["cluster"] = cluster_from_cli(args.cluster, cluster)
        cluster = {}
    if args.config:
        config = ScanConfig.from_yaml(args.config, **overrides)
        if cluster:
            from dataclasses import replace

            config.cluster = replace(config.cluster, **cluster)
        return config
    if not args.survey_url or not args.out:
        raise SystemExit("lenscan scan: give SURVEY_URL and --out (or --config FILE)")
    data = {k: v for k, v in overrides.items() if v is not None}
    data.setdefault("cluster", cluster)
    return ScanConfig.from_dict(data)


def _json_options(flag: str, text: str | None) -> dict | None:
    """Parse a ``--*storage-options`` value; errors name the flag, never echo the value."""
    if text is None:
        return None
    try:
        options = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{flag}: not valid JSON ({exc.msg} at character {exc.pos}); give an object such "
            """as '{"anon": true}' (single quotes around it in a shell)"""
        ) from None
    if not isinstance(options, dict):
        raise ValueError(f"{flag}: give a JSON object ({{...}}), got a {type(options).__name__}")
    return options


def _budget_note(summary: dict) -> str:
    """How the threshold was chosen, when not given: a false rate, an inspection budget."""
    note = ""
    if summary.get("false_rate") is not None:
        note += f" (the model's threshold for {summary['false_rate']:g} false per 1000)"
    if summary.get("top") is not None:
        note += f", the best {summary['top']} kept"
    return note


def format_summary(summary: dict, recall: dict | None = None) -> str:
    """Human-readable run summary (the demo and ``lenscan scan`` print it).

    A resumed run says how many tiles it skipped and what the table holds, rather than
    reporting the zero work it did as a rate.
    """
    skipped = summary["tiles_skipped"]
    lines = [
        f"tiles       {summary['tiles']} ({summary['tiles_scanned']} scanned, "
        f"{skipped} already done, {summary['tiles_failed']} failed)"
    ]
    if skipped:
        lines.append(
            f"resumed     skipped {skipped} tiles already committed under this output "
            f"({summary.get('scored_total', 0) - summary['scored']} stamps scored before)"
        )
    if summary["tiles_scanned"] or not skipped:
        now = " this run" if skipped else ""
        lines += [
            f"sources     {summary['sources']}{now}",
            f"selected    {summary['selected']} (passed the colour cut){now}",
            f"scored      {summary['scored']} stamps ({summary['edge_stamps']} padded at tile "
            f"edges){now}",
        ]
    lines += [
        f"failed      {summary['tiles_failed']} tiles, {summary['sources_failed']} sources "
        "(reasons in failures.parquet)",
        f"candidates  {summary['n_candidates']} at score >= {summary['threshold']:.3f}"
        + _budget_note(summary)
        + (f", from all {summary.get('scored_total', 0)} stamps scored" if skipped else ""),
    ]
    known = summary.get("known")
    if known:
        lines.append(
            f"known       {known['n_known']} already known, {known['n_new']} new (matched within "
            f"{known['radius_arcsec']:g} arcsec: {known['catalogue']})"
        )
    wall = f"wall time   {summary['wall_seconds']:.1f} s"
    if summary["scored"]:
        wall += f", {summary['stamps_per_second'] or 0:.1f} stamps/s end to end"
    lines.append(wall)
    if recall:
        lines.append(
            f"recall      {recall['recall']:.3f} of {recall['n_lenses_scored']} injected lenses "
            f"that passed the cut ({recall['recall_bright']:.3f} of "
            f'{recall["n_bright"]} with theta_E >= 1.2" and source S/N >= 20)'
        )
        lines.append(
            f"false pos.  {recall['false_per_1000']:.2f} per 1000 scored non-lenses "
            f"({recall['n_false']} of {recall['n_nonlenses']})"
        )
    return "\n".join(lines)


def _local(url: str) -> str:
    """A local output as an absolute path (what a user pastes into a browser or shell)."""
    from lenscan._io import absolute_url

    return safe_url(absolute_url(url[len("file://") :] if url.startswith("file://") else url))


def format_outputs(out: str, meta: dict) -> str:
    """Where a scan wrote its table, gallery and ``run.json`` (from ``meta["outputs"]``)."""
    outputs = meta.get("outputs") or {}
    tables = [_local(u) for u in outputs.get("tables", [])]
    lines = []
    if tables:
        first, *rest = tables
        extra = f" (+ {', '.join(posixpath.basename(t) for t in rest)})" if rest else ""
        lines.append(f"candidate table: {first}{extra}")
    n = meta.get("summary", {}).get("n_candidates", 0)
    if outputs.get("gallery"):
        shown = outputs["gallery_candidates"]
        line = f"gallery:         {_local(outputs['gallery'])}"
        if shown < n:
            line += (
                f" (the top {shown} of {n} candidates; all of them: "
                f"lenscan gallery {safe_url(out)} --top {n})"
            )
        lines.append(line)
    if outputs.get("run"):
        lines.append(f"provenance:      {_local(outputs['run'])}")
    return "\n".join(lines)


def cmd_scan(args: argparse.Namespace) -> int:
    from lenscan.sweep import ScanError, scan

    config = _scan_config(args)
    try:
        table = scan(config=config, progress=not args.no_progress)
    except ScanError as exc:
        print(format_summary(exc.candidates.meta["summary"]))
        print(format_outputs(config.out, exc.candidates.meta))
        print(f"lenscan scan: {safe_text(str(exc))}", file=sys.stderr)
        return 1
    print(format_summary(table.meta["summary"]))
    print(format_outputs(config.out, table.meta))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lenscan._io import check_output_folder
    from lenscan.config import ClusterSpec, ScanConfig
    from lenscan.metrics import recall_against_truth
    from lenscan.simulate import make_survey
    from lenscan.survey import SurveyFormatError, open_survey
    from lenscan.sweep import read_scored, scan
    from lenscan.table import read_parquet_table

    check_output_folder(args.out)
    out = args.out.rstrip("/")
    survey_url = posixpath.join(out, "survey.zarr")
    try:
        open_survey(survey_url)
        print(f"using the synthetic survey already at {survey_url}")
    except (SurveyFormatError, FileNotFoundError):
        print(f"building a synthetic DES-like survey of {args.tiles} tiles at {survey_url}")
        make_survey(survey_url, n_tiles=args.tiles, seed=args.seed, progress=True)
    config = ScanConfig(
        survey_url=survey_url,
        out=posixpath.join(out, "scan"),
        cluster=ClusterSpec(n_workers=args.workers),
        formats=["parquet", "fits", "votable"],
    )
    table = scan(config=config, progress=True)
    truth = read_parquet_table(posixpath.join(survey_url, "truth.parquet"))
    scored = read_scored(config.out)
    recall = recall_against_truth(scored, truth, threshold=table.meta["summary"]["threshold"])
    print()
    print(format_summary(table.meta["summary"], recall))
    print(format_outputs(config.out, table.meta))
    return 0


def cmd_make_survey(args: argparse.Namespace) -> int:
    from lenscan.simulate import make_survey

    info = make_survey(args.url, n_tiles=args.tiles, seed=args.seed, tile_size_pix=args.tile_size)
    print(info)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from lenscan.models.commands import run_models_cli

    return run_models_cli(args)


def _add_verbose(p: argparse.ArgumentParser) -> None:
    # Also after the command (`lenscan scan ... -v`); SUPPRESS keeps a `lenscan -v scan` count.
    p.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help="log more")


def _module_commands() -> list[tuple[str, str, Callable, Callable]]:
    """``(name, help, add_arguments, run)`` of the subcommands whose modules own their flags."""
    from lenscan.crossmatch import (
        add_crossmatch_arguments,
        add_recovery_arguments,
        run_crossmatch_cli,
        run_recovery_cli,
    )
    from lenscan.evaluate import add_evaluate_arguments, evaluate_after_training, run_evaluate_cli
    from lenscan.gallery import add_gallery_arguments, run_gallery_cli
    from lenscan.grades import add_grades_arguments, run_grades_cli
    from lenscan.mining import add_mine_arguments, run_mine_cli
    from lenscan.models.commands import add_models_arguments
    from lenscan.serve import add_serve_arguments, run_serve_cli
    from lenscan.survey.ingest import add_ingest_arguments, run_ingest_cli
    from lenscan.training import add_train_arguments, run_train_cli

    def train(args: argparse.Namespace) -> int:
        return run_train_cli(args, after_export=evaluate_after_training)

    return [
        ("models", "list, show, check and export models", add_models_arguments, cmd_models),
        ("ingest", "ingest survey FITS coadd tiles into a survey store", add_ingest_arguments,
         run_ingest_cli),
        ("train", "train a model on simulated lenses", add_train_arguments, train),
        ("mine-negatives", "scan a lens-free survey, keep its top non-lenses", add_mine_arguments,
         run_mine_cli),
        ("evaluate", "evaluate a model on fresh simulations", add_evaluate_arguments,
         run_evaluate_cli),
        ("known-recovery", "how many known lenses in the footprint a scan found",
         add_recovery_arguments, run_recovery_cli),
        ("crossmatch", "match a scan's candidates with any catalogue or HATS",
         add_crossmatch_arguments, run_crossmatch_cli),
        ("gallery", "write the inspection page (grading) of a scan's candidates",
         add_gallery_arguments, run_gallery_cli),
        ("grades", "merge visual grades exported by the inspection page", add_grades_arguments,
         run_grades_cli),
        ("serve", "serve a model over HTTP (needs lenscan[serve])", add_serve_arguments,
         run_serve_cli),
    ]  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lenscan", description="Find strong gravitational lenses in survey images."
    )
    parser.add_argument("--version", action="version", version=f"lenscan {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v: INFO, -vv: Dask's")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("scan", help="scan a survey store for lenses")
    _add_scan_arguments(p)
    _add_verbose(p)
    p.set_defaults(func=cmd_scan)

    p = sub.add_parser("demo", help="build a small synthetic survey and scan it")
    p.add_argument("--out", default="demo-output", help="output folder (default demo-output)")
    p.add_argument("--tiles", type=int, default=4, help="synthetic tiles (default 4)")
    p.add_argument("--seed", type=int, default=2019, help="survey seed")
    p.add_argument("--workers", type=int, default=None, help="local Dask workers")
    _add_verbose(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("make-survey", help="write a synthetic survey store with injected lenses")
    p.add_argument("url", help="store URL to create")
    p.add_argument("--tiles", type=int, default=4)
    p.add_argument("--tile-size", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_survey)

    for name, help_text, add_arguments, run in _module_commands():
        p = sub.add_parser(name, help=help_text)
        add_arguments(p)
        p.set_defaults(func=run)
    return parser


def setup_logging(verbosity: int) -> None:
    """Log warnings only by default; ``verbosity`` 1 adds lenscan's INFO, 2 Dask's.

    The progress bar and the summary are the command's output; Dask's INFO lines (26 a scan)
    only bury them. Worker processes inherit the level through the environment.
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("lenscan").setLevel(logging.INFO if verbosity >= 1 else logging.WARNING)
    dask_level = "info" if verbosity >= 2 else "warning"
    os.environ["DASK_LOGGING__DISTRIBUTED"] = dask_level  # read when a process imports dask
    import dask.config

    # distributed sets its loggers' levels from this when it is imported (maybe later).
    dask.config.set({"logging.distributed": dask_level})
    logging.getLogger("distributed").setLevel(dask_level.upper())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lenscan`` command."""
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    _protect_handlers()
    from lenscan._io import StorageError
    from lenscan._lease import LeaseError

    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"lenscan {args.command}: error: {safe_text(str(exc))}", file=sys.stderr)
        return 2
    except (LeaseError, StorageError) as exc:  # runtime failures, not bad arguments: exit 1
        print(f"lenscan {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        return _interrupted(args.command, exc)
    except Exception:  # a bug: its traceback, scrubbed (frames may show URLs and options)
        print(safe_text(traceback.format_exc()), file=sys.stderr)
        return 1


def _protect_handlers() -> None:
    """Scrub every log line this process prints (Dask's and s3fs's too) of credentials."""
    for name in (None, "distributed"):
        for handler in logging.getLogger(name).handlers:
            protect_logger(handler)


def _interrupted(command: str, exc: KeyboardInterrupt) -> int:
    """Ctrl-C: one line (a scan's says what is committed and how to resume), exit 130."""
    print(f"lenscan {command}: {str(exc) or 'interrupted'}", file=sys.stderr)
    return 130


if __name__ == "__main__":
    sys.exit(main())
