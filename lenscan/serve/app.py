"""The FastAPI application: routes, request and response schemas, the body-size limit.

Build it with :func:`create_app` (models and survey are loaded there, once, before the server
accepts connections); ``lenscan serve`` runs it under uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lenscan._secrets import safe_text, safe_url
from lenscan._version import __version__
from lenscan.models import LensModel, check_compatible, load_model
from lenscan.serve.admission import Admission, ParserPool
from lenscan.serve.batcher import ModelBatcher
from lenscan.serve.config import ServeConfig
from lenscan.serve.errors import InputError, Saturated
from lenscan.serve.inputs import check_stamps, decode_file, parse_bands
from lenscan.serve.jsonbody import (
    JSONLimits,
    check_body,
    parse_stamps_body,
    positions_limits,
    stamp_limits,
)
from lenscan.serve.sky import Placed, SkyIndex
from lenscan.stamps import normalise_stamps

__all__ = [
    "BodyLimit",
    "ErrorBody",
    "Health",
    "ModelInfo",
    "Position",
    "PositionResult",
    "PositionsRequest",
    "PositionsResult",
    "RouteLimits",
    "ScoreResult",
    "Served",
    "Service",
    "create_app",
    "recommended_threshold",
]

_FILE_TYPES = ("application/octet-stream", "application/fits", "application/x-npy", "image/fits")
_INT64 = Field(ge=-(2**63), le=2**63 - 1)
_RA = Field(ge=0.0, le=360.0, allow_inf_nan=False, description="right ascension, deg")
_DEC = Field(ge=-90.0, le=90.0, allow_inf_nan=False, description="declination, deg")


# ------------------------------------------------------------------------------ schemas
class ErrorBody(BaseModel):
    """A refused request: what was wrong with it (a list of field errors for schema errors)."""

    detail: str | list[dict[str, Any]]


class ModelInfo(BaseModel):
    """What a served model scores and where it came from."""

    name: str
    default: bool = Field(description="used when a request names no model")
    architecture: str
    n_members: int
    bands: list[str] = Field(description="input bands, in channel order")
    stamp_size_pix: int
    pixel_scale_arcsec: float
    normalisation: dict[str, Any]
    recommended_threshold: float
    sha256: str = Field(description="SHA-256 of the weights file")
    lenscan_version: str = Field(description="lenscan version that wrote the checkpoint")
    format_version: int
    description: str
    training: dict[str, Any] = Field(description="training provenance")
    metrics: dict[str, Any]


class Health(BaseModel):
    """Liveness and counters."""

    status: str
    lenscan_version: str
    models: list[str]
    survey: str | None
    n_tiles: int
    uptime_s: float
    requests_scored: int
    batches: int
    stamps_scored: int
    in_flight: int = Field(description="scoring requests being read, decoded or scored")
    refused_busy: int = Field(description="scoring requests answered 503 (service saturated)")


class ScoreResult(BaseModel):
    """Scores of uploaded stamps, in upload order."""

    model: str
    sha256: str
    threshold: float
    n: int
    score: list[float] = Field(description="ensemble-mean lens probability per stamp")
    member_scores: list[list[float]] = Field(description="per stamp, one probability per member")
    above_threshold: list[bool]


class Position(BaseModel):
    """A sky position (ICRS, degrees)."""

    model_config = ConfigDict(extra="forbid")
    ra: Annotated[float, _RA]
    dec: Annotated[float, _DEC]


_Pair = tuple[Annotated[float, _RA], Annotated[float, _DEC]]


class PositionsRequest(BaseModel):
    """Sky positions, or catalogue ids, to cut from the survey and score."""

    model_config = ConfigDict(extra="forbid")
    positions: list[Position | _Pair] | None = Field(
        default=None, description="[{ra, dec}, ...] or [[ra, dec], ...] in degrees"
    )
    ids: list[Annotated[int, _INT64]] | None = Field(
        default=None, description="catalogue source ids (instead of positions)"
    )
    tile: str | None = Field(
        default=None, description="look the ids up in this tile's catalogue only"
    )
    model: str | None = Field(default=None, description="served model name (default: first)")


class PositionResult(BaseModel):
    """One scored position, with the tile and pixel its stamp was cut at."""

    ra: float
    dec: float
    id: int | None
    tile: str
    x: float
    y: float
    edge: bool = Field(description="the stamp overhangs the tile edge (padded, as in the scan)")
    score: float
    member_scores: list[float]
    above_threshold: bool


class PositionsResult(BaseModel):
    """Scores of the requested positions, in request order."""

    model: str
    sha256: str
    threshold: float
    n: int
    results: list[PositionResult]


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in (
        (400, "malformed body or file"),
        (404, "unknown model, or no survey configured"),
        (413, "body, stamp count or array larger than the service accepts"),
        (415, "unsupported content type"),
        (422, "stamps or positions that the model cannot score"),
        (503, "the service holds as much work as it may: retry after Retry-After seconds"),
    )
}

_STAMP_ARRAY = {
    "type": "array",
    "description": "stamps (n, band, y, x): raw pixel values (counts), finite",
    "items": {
        "type": "array",
        "items": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
    },
}
_SCORE_BODY = {
    "requestBody": {
        "required": True,
        "description": "stamps as JSON arrays, or a .npy / FITS file (raw body or multipart "
        "field 'file'); shape (n, band, y, x) or one stamp (band, y, x)",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "stamps": _STAMP_ARRAY,
                        "bands": {"type": "array", "items": {"type": "string"}},
                        "model": {"type": "string"},
                    },
                    "required": ["stamps"],
                    "additionalProperties": False,
                }
            },
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


# ------------------------------------------------------------------------------ body limit
@dataclass(frozen=True)
class RouteLimits:
    """The bounds :class:`BodyLimit` applies to one scoring route before the route runs.

    Parameters
    ----------
    admission : Admission
        Places in flight, shared by the scoring routes.
    max_bytes : int
        Largest non-JSON body.
    json : JSONLimits
        Limits of a JSON body (its size here; the rest where it is parsed).
    check_json : bool
        Check JSON bodies here, before the route: for routes whose body FastAPI parses.
    """

    admission: Admission
    max_bytes: int
    json: JSONLimits
    check_json: bool = False

    def limit(self, ctype: str) -> int:
        """Largest body of content type ``ctype``."""
        return self.json.max_bytes if ctype == "application/json" else self.max_bytes


class BodyLimit:
    """ASGI middleware: body-size limits (413, streamed or not) and admission of scoring work.

    A POST to one of ``routes`` first takes a place in the route's admission, before its body
    is read: none free answers 503 with ``Retry-After``. Its body limit depends on its content
    type; JSON bodies of a ``check_json`` route are read and checked here
    (:func:`lenscan.serve.jsonbody.check_body`) before FastAPI parses them.
    """

    def __init__(
        self, app: ASGIApp, limit: int, routes: Mapping[str, RouteLimits] | None = None
    ) -> None:
        self.app = app
        self.limit = limit
        self.routes = dict(routes or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        route = self.routes.get(_route_path(scope)) if scope["method"] == "POST" else None
        ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower().decode("latin-1")
        limit = self.limit if route is None else route.limit(ctype)
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await _size_refusal(declared, limit)(scope, receive, send)
            return
        if route is None:
            await self.app(scope, _limited(receive, limit), send)
            return
        nbytes = int(declared) if declared is not None else limit
        try:
            route.admission.acquire(nbytes)
        except Saturated as exc:
            await _busy(exc)(scope, receive, send)
            return
        try:
            if route.check_json and ctype == "application/json":
                try:  # reads the body itself, within the same limit
                    receive = await _checked_json(receive, route.json)
                except InputError as exc:
                    await JSONResponse({"detail": exc.message}, exc.status)(scope, receive, send)
                    return
            else:
                receive = _limited(receive, limit)
            await self.app(scope, receive, send)
        finally:
            route.admission.release(nbytes)


def _route_path(scope: Scope) -> str:
    """The request path below the service's root path (where a proxy mounts it)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def _size_refusal(declared: bytes, limit: int) -> JSONResponse:
    if declared.isdigit():
        message = (
            f"the request body ({int(declared)} bytes) is larger than the limit of {limit} bytes"
        )
        return JSONResponse({"detail": message}, status_code=413)
    text = declared.decode(errors="replace")
    return JSONResponse({"detail": f"the request body ({text} bytes) is not a size"}, 400)


def _busy(exc: Saturated) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after_s)}
    return JSONResponse({"detail": exc.message}, status_code=503, headers=headers)


def _limited(receive: Receive, limit: int) -> Receive:
    """``receive`` that stops a body going over ``limit`` bytes with 413 as it streams in."""
    seen = 0

    async def limited() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise HTTPException(
                    413, f"the request body is larger than the limit of {limit} bytes"
                )
        return message

    return limited


async def _checked_json(receive: Receive, limits: JSONLimits) -> Receive:
    """Read a whole JSON body, check its bytes against ``limits``, and replay it."""
    chunks: list[bytes] = []
    size, more = 0, True
    while more:
        message = await receive()
        if message["type"] != "http.request":  # the client left: let the app see it
            return _replay(message, receive)
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        more = bool(message.get("more_body", False))
        if size > limits.max_bytes:
            raise InputError(
                f"the request body is larger than the limit of {limits.max_bytes} bytes", 413
            )
    body = b"".join(chunks)
    check_body(body, limits)
    return _replay({"type": "http.request", "body": body, "more_body": False}, receive)


def _replay(first: Message, receive: Receive) -> Receive:
    """``receive`` that returns ``first``, then whatever ``receive`` returns."""
    pending: list[Message] = [first]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay


# ------------------------------------------------------------------------------ the service
@dataclass
class Served:
    """One loaded model and its batching loop."""

    model: LensModel
    batcher: ModelBatcher
    threshold: float
    default: bool

    def info(self) -> ModelInfo:
        """The model's public description (``GET /models``)."""
        meta = self.model.meta
        return ModelInfo(
            name=meta.name,
            default=self.default,
            architecture=meta.architecture,
            n_members=meta.n_members,
            bands=list(meta.bands),
            stamp_size_pix=meta.stamp_size_pix,
            pixel_scale_arcsec=meta.pixel_scale_arcsec,
            normalisation=dict(meta.normalisation),
            recommended_threshold=self.threshold,
            sha256=self.model.sha256,
            lenscan_version=meta.lenscan_version,
            format_version=meta.format_version,
            description=meta.description,
            training=dict(meta.training),
            metrics=dict(meta.metrics),
        )


def recommended_threshold(model: LensModel) -> float:
    """The model's recorded threshold (``metrics.recommended_threshold``), 0.5 without one."""
    return model.meta.recommended_threshold


class Service:
    """Models loaded once, the survey index, and the thread torch runs in.

    Parameters
    ----------
    config : ServeConfig
        The service settings. Models and survey are loaded here; an incompatible model
        (bands, pixel scale) is refused before the server starts.
    """

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        if config.torch_threads is not None:
            torch.set_num_threads(config.torch_threads)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lenscan-torch")
        self.sky = (
            SkyIndex.open(config.survey_url, config.storage_options)
            if config.survey_url is not None
            else None
        )
        self.models: dict[str, Served] = {}
        for k, ref in enumerate(config.models):
            model = load_model(ref, device=config.device)
            if model.name in self.models:
                raise ValueError(f"serve: two models are named {model.name!r} ({ref})")
            if self.sky is not None:
                try:
                    check_compatible(
                        model,
                        bands=self.sky.survey.bands,
                        pixel_scale_arcsec=self.sky.pixel_scale_arcsec,
                    )
                except ValueError as exc:
                    raise ValueError(f"survey {config.survey_url}: {exc}") from exc
            batcher = ModelBatcher(
                model,
                self.executor,
                window_s=config.batch_window_ms / 1000.0,
                max_batch_stamps=config.max_batch_stamps,
            )
            self.models[model.name] = Served(model, batcher, recommended_threshold(model), k == 0)
        self.default = next(iter(self.models))
        assert config.max_inflight_bytes is not None  # ServeConfig resolves its default
        self.admission = Admission(config.max_inflight, config.max_inflight_bytes)
        self.parser = ParserPool(config.parse_workers)
        self.json_limits = _json_limits(config, [s.model.meta for s in self.models.values()])
        self.started = time.monotonic()

    def route_limits(self) -> dict[str, RouteLimits]:
        """The bounds of the scoring routes, for :class:`BodyLimit`."""
        upload = self.config.max_upload_bytes
        positions = positions_limits(self.config.max_positions, upload)
        return {
            "/score": RouteLimits(self.admission, upload, self.json_limits),
            "/score/positions": RouteLimits(self.admission, upload, positions, check_json=True),
        }

    def served(self, name: str | None) -> Served:
        """The served model called ``name`` (the default for None); 404 for another name."""
        if name is None:
            return self.models[self.default]
        if name not in self.models:
            raise InputError(
                f"unknown model {name!r}; this service serves {list(self.models)}", status=404
            )
        return self.models[name]

    def max_elements(self, served: Served, bands: Sequence[str] | None) -> int:
        """Largest array a request for ``served`` may declare (checked before decoding)."""
        nb = max(len(served.model.meta.bands), len(bands or ()))
        return self.config.max_stamps * nb * served.model.meta.stamp_size_pix**2

    async def start(self) -> None:
        """Start the JSON parser process and every model's scoring loop."""
        await asyncio.to_thread(self.parser.start)
        for served in self.models.values():
            served.batcher.start()

    async def stop(self) -> None:
        """Stop the loops, the torch thread and the parser process."""
        for served in self.models.values():
            await served.batcher.stop()
        self.executor.shutdown(wait=True)
        self.parser.stop()

    def health(self) -> Health:
        """Counters for ``GET /health``."""
        batchers = [s.batcher for s in self.models.values()]
        return Health(
            status="ok",
            lenscan_version=__version__,
            models=list(self.models),
            survey=safe_url(self.config.survey_url) if self.config.survey_url else None,
            n_tiles=len(self.sky.tile_ids) if self.sky is not None else 0,
            uptime_s=round(time.monotonic() - self.started, 3),
            requests_scored=sum(b.requests for b in batchers),
            batches=sum(b.batches for b in batchers),
            stamps_scored=sum(b.stamps_scored for b in batchers),
            in_flight=self.admission.requests,
            refused_busy=self.admission.refused,
        )


def _json_limits(config: ServeConfig, metas: Sequence[Any]) -> JSONLimits:
    """JSON limits of ``POST /score`` wide enough for every served model."""
    each = [
        stamp_limits(
            config.max_json_stamps, len(m.bands), m.stamp_size_pix, config.max_upload_bytes
        )
        for m in metas
    ]
    return JSONLimits(
        max_bytes=max(x.max_bytes for x in each),
        max_values=max(x.max_values for x in each),
        max_arrays=max(x.max_arrays for x in each),
        max_numbers=max(x.max_numbers for x in each),
    )


# ------------------------------------------------------------------------------ handlers
def _one(name: str, query: Any, body: Any) -> Any:
    if query is not None and body is not None and query != body:
        raise InputError(f"{name} is given twice with different values ({query!r}, {body!r})")
    return body if body is not None else query


def _prepare_upload(
    service: Service, served_name: str | None, bands: Any, payload: bytes | np.ndarray
) -> tuple[Served, torch.Tensor]:
    """Decode, check and normalise uploaded stamps (runs in a worker thread)."""
    served = service.served(served_name)
    band_list = parse_bands(bands)
    limit = service.max_elements(served, band_list)
    # JSON arrives parsed (within the JSON limits); files are decoded here.
    arr = payload if isinstance(payload, np.ndarray) else decode_file(payload, max_elements=limit)
    stamps = check_stamps(
        arr, served.model.meta, bands=band_list, max_stamps=service.config.max_stamps
    )
    return served, normalise_stamps(torch.from_numpy(stamps), served.model.meta.normalisation)


async def _upload_payload(
    service: Service, request: Request
) -> tuple[bytes | np.ndarray, dict[str, Any]]:
    """The stamps of a ``POST /score`` body (JSON: parsed) and any model/bands fields it carries."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":  # parsed in the parser process, within the JSON limits
        body = await request.body()
        arr, model, bands = await service.parser.run(parse_stamps_body, body, service.json_limits)
        return arr, {"model": model, "bands": bands}
    if ctype == "multipart/form-data":
        async with request.form(max_files=1, max_fields=4) as form:  # closes spooled files
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise InputError('a multipart upload needs the file in a field named "file"', 400)
            fields = {k: form.get(k) for k in ("model", "bands")}
            data = await upload.read()
        return data, {k: v for k, v in fields.items() if isinstance(v, str)}
    if ctype in _FILE_TYPES or not ctype:
        return await request.body(), {}
    raise InputError(
        f"unsupported content type {ctype!r}: send application/json, multipart/form-data or "
        f"a raw .npy/FITS file as one of {list(_FILE_TYPES)}",
        status=415,
    )


def _positions_input(req: PositionsRequest, limit: int) -> tuple[str, np.ndarray]:
    """``("ids", int64 ids)`` or ``("positions", (n, 2) ra, dec)`` of a request, checked."""
    given = [k for k in ("positions", "ids") if getattr(req, k)]
    if len(given) != 1:
        raise InputError('give either "positions" (a non-empty list) or "ids", not both or none')
    if req.tile is not None and given[0] != "ids":
        raise InputError('"tile" restricts an "ids" lookup; positions find their own tile')
    values: np.ndarray
    if given[0] == "ids":
        values = np.asarray(req.ids, dtype=np.int64)
        n = values.size
    else:
        pairs = [(p.ra, p.dec) if isinstance(p, Position) else p for p in req.positions or ()]
        values = np.asarray(pairs, dtype=np.float64).reshape(-1, 2)
        n = len(values)
    if n > limit:
        raise InputError(
            f"{n} {given[0]} in one request; this service takes at most {limit}", status=413
        )
    return given[0], values


def _place(service: Service, req: PositionsRequest, served: Served):
    """Find tiles and pixels for the request (runs in a worker thread), then cut stamps."""
    sky = service.sky
    assert sky is not None
    kind, values = _positions_input(req, service.config.max_positions)
    if kind == "ids":
        placed, ra, dec = sky.find_ids(values, req.tile)
        missing = np.flatnonzero(placed.tile < 0)
        where = f"tile {req.tile!r}" if req.tile else f"survey {service.config.survey_url}"
        unknown = [int(values[i]) for i in missing[:10]]
        what = f"ids {unknown} are not in the catalogue of {where}"
    else:
        ra, dec = values[:, 0] % 360.0, values[:, 1]
        placed = sky.locate(ra, dec)
        missing = np.flatnonzero(placed.tile < 0)
        outside = [(float(ra[i]), float(dec[i])) for i in missing[:5]]
        what = (
            f"positions {outside} (request indices {missing[:10].tolist()}) lie outside every "
            f"tile of survey {service.config.survey_url}"
        )
    if missing.size:
        more = f" ({missing.size} in all)" if missing.size > 10 else ""
        raise InputError(what + more)
    normalised, edge = sky.cut(placed, served.model.meta)
    ids = values if kind == "ids" else None
    return placed, ra, dec, ids, normalised, edge


def _position_results(
    sky: SkyIndex, placed: Placed, ra, dec, ids, edge, scores, threshold
) -> list[PositionResult]:
    mean = scores.mean(axis=1)
    return [
        PositionResult(
            ra=float(ra[i]),
            dec=float(dec[i]),
            id=None if ids is None else int(ids[i]),
            tile=sky.tile_ids[int(placed.tile[i])],
            x=float(placed.x[i]),
            y=float(placed.y[i]),
            edge=bool(edge[i]),
            score=float(mean[i]),
            member_scores=[float(v) for v in scores[i]],
            above_threshold=bool(mean[i] >= threshold),
        )
        for i in range(len(mean))
    ]


async def _input_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, InputError)
    # Messages name the survey: never with its user info, signature or an option's value.
    return JSONResponse({"detail": safe_text(exc.message)}, status_code=exc.status)


async def _saturated(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Saturated)
    return _busy(exc)


_SHOWN_ERRORS = 20


async def _schema_errors(request: Request, exc: Exception) -> JSONResponse:
    """422 with the first schema errors only: a body of 10 000 bad items stays a short answer."""
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    detail = jsonable_encoder(errors[:_SHOWN_ERRORS])
    if len(errors) > _SHOWN_ERRORS:
        rest = len(errors) - _SHOWN_ERRORS
        detail.append({"type": "more", "loc": [], "msg": f"and {rest} more errors"})
    return JSONResponse({"detail": detail}, status_code=422)


def create_app(config: ServeConfig | None = None) -> FastAPI:
    """Build the service: load the models and the survey index once, wire the routes.

    Parameters
    ----------
    config : ServeConfig, optional
        Settings (default: the bundled model, no survey).

    Returns
    -------
    FastAPI
        An ASGI app; run it with uvicorn (``lenscan serve`` does).

    Examples
    --------
    >>> app = create_app(ServeConfig(models=["lenscan-des-v2"]))
    >>> sorted(r.path for r in app.routes if r.path.startswith(("/score", "/health", "/models")))
    ['/health', '/models', '/score', '/score/positions']
    """
    config = config or ServeConfig()
    service = Service(config)
    app = FastAPI(
        title="lenscan",
        version=__version__,
        description="Strong-lens scores for image stamps and for sky positions of a survey.",
        lifespan=_lifespan(service),
    )
    app.state.service = service
    app.add_middleware(BodyLimit, limit=config.max_upload_bytes, routes=service.route_limits())
    app.add_exception_handler(InputError, _input_error)
    app.add_exception_handler(Saturated, _saturated)
    app.add_exception_handler(RequestValidationError, _schema_errors)
    _add_info_routes(app, service)
    _add_score_routes(app, service)
    return app


def _lifespan(
    service: Service,
) -> Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]]:
    """The app's lifespan: start the service's batchers before serving, stop them after."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    return lifespan


def _add_info_routes(app: FastAPI, service: Service) -> None:
    """``GET /health`` and ``GET /models``."""

    @app.get("/health", response_model=Health)
    async def health() -> Health:
        """Liveness, the served models and survey, and scoring counters."""
        return service.health()

    @app.get("/models", response_model=list[ModelInfo])
    async def models() -> list[ModelInfo]:
        """Every served model: bands, stamp size, pixel scale, normalisation, provenance."""
        return [s.info() for s in service.models.values()]


def _add_score_routes(app: FastAPI, service: Service) -> None:
    """``POST /score`` (uploaded stamps) and ``POST /score/positions`` (the survey's sky)."""

    @app.post("/score", response_model=ScoreResult, responses=_ERRORS, openapi_extra=_SCORE_BODY)
    async def score(
        request: Request,
        model: Annotated[str | None, Query(description="served model name")] = None,
        bands: Annotated[str | None, Query(description="bands of the planes, e.g. g,r,i,z")] = None,
    ) -> ScoreResult:
        """Score uploaded stamps: JSON arrays, or a .npy or FITS cube (n, band, y, x)."""
        return await _score_upload(service, request, model, bands)

    @app.post("/score/positions", response_model=PositionsResult, responses=_ERRORS)
    async def score_positions(
        req: PositionsRequest,
        model: Annotated[str | None, Query(description="served model name")] = None,
    ) -> PositionsResult:
        """Cut stamps at sky positions or catalogue sources of the survey, as the scan does."""
        return await _score_positions(service, req, model)


async def _score_upload(
    service: Service, request: Request, model: str | None, bands: str | None
) -> ScoreResult:
    """Decode the uploaded stamps, normalise them for the model, score them in a batch."""
    payload, fields = await _upload_payload(service, request)
    name = _one("model", model, fields.get("model"))
    band_spec = _one("bands", bands, fields.get("bands"))
    served, normalised = await asyncio.to_thread(_prepare_upload, service, name, band_spec, payload)
    scores = await served.batcher.score(normalised)
    mean = scores.mean(axis=1)
    return ScoreResult(
        model=served.model.name,
        sha256=served.model.sha256,
        threshold=served.threshold,
        n=len(mean),
        score=mean.tolist(),
        member_scores=scores.tolist(),
        above_threshold=(mean >= served.threshold).tolist(),
    )


async def _score_positions(
    service: Service, req: PositionsRequest, model: str | None
) -> PositionsResult:
    """Place the request on the survey, cut and normalise stamps there, score them."""
    if service.sky is None:
        raise InputError(
            "this service has no survey: start it with `lenscan serve --survey URL` to "
            "score sky positions",
            status=404,
        )
    served = service.served(_one("model", model, req.model))
    placed, ra, dec, ids, normalised, edge = await asyncio.to_thread(_place, service, req, served)
    scores = await served.batcher.score(normalised)
    results = _position_results(service.sky, placed, ra, dec, ids, edge, scores, served.threshold)
    return PositionsResult(
        model=served.model.name,
        sha256=served.model.sha256,
        threshold=served.threshold,
        n=len(results),
        results=results,
    )
