"""``lenscan serve``: argument parsing and the uvicorn run (FastAPI and uvicorn imported late)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from lenscan.serve.config import DEVICES, ServeConfig

__all__ = [
    "add_serve_arguments",
    "config_from_args",
    "run_serve_cli",
]

_EXTRA_HINT = "lenscan serve needs the serve extra: pip install 'lenscan[serve]'"


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``lenscan serve`` options to a parser."""
    p.add_argument(
        "--model",
        nargs="+",
        default=None,
        metavar="NAME|PATH",
        help="bundled model names or checkpoint paths; the first is the default",
    )
    p.add_argument(
        "--survey",
        default=None,
        metavar="URL",
        help="survey store for POST /score/positions (any fsspec URL)",
    )
    p.add_argument(
        "--storage-options",
        default=None,
        metavar="JSON",
        help="fsspec options for the survey as JSON, e.g. '{\"anon\": true}'",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--root-path",
        default="",
        help="URL prefix the service is mounted under behind a proxy, e.g. /lenscan",
    )
    p.add_argument(
        "--forwarded-allow-ips",
        default="127.0.0.1",
        help="proxies trusted for X-Forwarded-* headers (comma list, or '*')",
    )
    p.add_argument("--device", choices=DEVICES, default="cpu", help="model device")
    p.add_argument(
        "--max-upload-mb", type=float, default=64.0, help="largest request body in MiB (default 64)"
    )
    p.add_argument("--max-stamps", type=int, default=4096, help="stamps per request (4096)")
    p.add_argument(
        "--max-positions", type=int, default=10_000, help="positions or ids per request (10000)"
    )
    p.add_argument(
        "--batch-window-ms",
        type=float,
        default=5.0,
        help="wait for concurrent requests to join a batch (ms, default 5)",
    )
    p.add_argument("--max-batch", type=int, default=256, help="stamps per forward pass (256)")
    p.add_argument(
        "--max-json-stamps",
        type=int,
        default=128,
        help="stamps per JSON request; sizes the JSON body limit (128)",
    )
    p.add_argument(
        "--max-inflight",
        type=int,
        default=32,
        help="scoring requests held at once; more get 503 + Retry-After (32)",
    )
    p.add_argument(
        "--max-inflight-mb",
        type=float,
        default=None,
        help="request bodies held at once, MiB; more get 503 + Retry-After "
        "(twice --max-upload-mb, at least 128)",
    )
    p.add_argument("--parse-workers", type=int, default=1, help="processes parsing JSON bodies (1)")
    p.add_argument("--torch-threads", type=int, default=None, help="torch threads")
    p.add_argument("--log-level", default="info", help="uvicorn log level (default info)")


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """Build the :class:`ServeConfig` of parsed ``lenscan serve`` arguments."""
    options = {}
    if args.storage_options:
        try:
            options = json.loads(args.storage_options)
        except json.JSONDecodeError as err:
            raise ValueError(f"--storage-options is not valid JSON ({err})") from None
    for flag, mb in (
        ("--max-upload-mb", args.max_upload_mb),
        ("--max-inflight-mb", args.max_inflight_mb),
    ):
        if mb is not None and not 0 < mb < 1e6:
            raise ValueError(f"{flag} must be > 0, got {mb}")
    return ServeConfig(
        models=tuple(args.model) if args.model else ("default",),
        survey_url=args.survey,
        storage_options=options,
        device=args.device,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        max_stamps=args.max_stamps,
        max_positions=args.max_positions,
        batch_window_ms=args.batch_window_ms,
        max_batch_stamps=args.max_batch,
        max_json_stamps=args.max_json_stamps,
        max_inflight=args.max_inflight,
        max_inflight_bytes=(
            None if args.max_inflight_mb is None else int(args.max_inflight_mb * 2**20)
        ),
        parse_workers=args.parse_workers,
        torch_threads=args.torch_threads,
    )


def run_serve_cli(args: argparse.Namespace) -> int:
    """Run ``lenscan serve``: load models and survey, then serve until interrupted."""
    try:
        import uvicorn

        from lenscan.serve.app import create_app
    except ImportError as err:
        print(f"{_EXTRA_HINT} ({err})", file=sys.stderr)
        return 2
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    app = create_app(config_from_args(args))
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        root_path=args.root_path,
        proxy_headers=True,
        forwarded_allow_ips=args.forwarded_allow_ips,
        log_level=args.log_level,
        log_config=_scrubbed_log_config(),
    )
    return 0


def _scrubbed_log_config() -> dict[str, Any]:
    """uvicorn's logging config with :class:`~lenscan._secrets.SecretFilter` on its handlers.

    Access lines carry each request's path and query, where a signed URL may travel.
    """
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["filters"] = {"secrets": {"()": "lenscan._secrets.SecretFilter"}}
    for handler in config["handlers"].values():
        handler["filters"] = ["secrets"]
    return config
