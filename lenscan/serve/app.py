"""The FastAPI application: routes, request and response schemas, the body-size limit.

Build it with :func:`create_app` (models and survey are loaded there, once, before the server
accepts connections); ``lenscan serve`` runs it under uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lenscan._secrets import safe_text, safe_url
from lenscan._version import __version__
from lenscan.models import LensModel, check_compatible, load_model
from lenscan.serve.batcher import ModelBatcher
from lenscan.serve.config import ServeConfig
from lenscan.serve.inputs import (
    InputError,
    check_stamps,
    decode_file,
    decode_json,
    json_stamps,
    parse_bands,
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
class BodyLimit:
    """ASGI middleware refusing request bodies over ``limit`` bytes with 413, streamed or not."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            status, why = (413, "is larger than") if declared.isdigit() else (400, "is not")
            message = (
                f"the request body ({declared.decode(errors='replace')} bytes) {why} "
                f"{'the limit of ' + str(self.limit) + ' bytes' if status == 413 else 'a size'}"
            )
            await JSONResponse({"detail": message}, status_code=status)(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise HTTPException(
                        413, f"the request body is larger than the limit of {self.limit} bytes"
                    )
            return message

        await self.app(scope, limited, send)


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
        self.started = time.monotonic()

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
        """Start every model's scoring loop."""
        for served in self.models.values():
            served.batcher.start()

    async def stop(self) -> None:
        """Stop the loops and the torch thread."""
        for served in self.models.values():
            await served.batcher.stop()
        self.executor.shutdown(wait=True)

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
        )


# ------------------------------------------------------------------------------ handlers
def _one(name: str, query: Any, body: Any) -> Any:
    if query is not None and body is not None and query != body:
        raise InputError(f"{name} is given twice with different values ({query!r}, {body!r})")
    return body if body is not None else query


def _prepare_upload(
    service: Service, served_name: str | None, bands: Any, payload: bytes | dict[str, Any]
) -> tuple[Served, torch.Tensor]:
    """Decode, check and normalise uploaded stamps (runs in a worker thread)."""
    served = service.served(served_name)
    band_list = parse_bands(bands)
    limit = service.max_elements(served, band_list)
    if isinstance(payload, dict):
        arr = json_stamps(payload, max_elements=limit)
    else:
        arr = decode_file(payload, max_elements=limit)
    stamps = check_stamps(
        arr, served.model.meta, bands=band_list, max_stamps=service.config.max_stamps
    )
    return served, normalise_stamps(torch.from_numpy(stamps), served.model.meta.normalisation)


async def _upload_payload(request: Request) -> tuple[bytes | dict[str, Any], dict[str, Any]]:
    """The stamps part of a ``POST /score`` body and any model/bands fields it carries."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await request.body()
    if ctype == "application/json":
        doc = decode_json(body)
        model = doc.get("model")
        if model is not None and not isinstance(model, str):
            raise InputError(f'"model" must be a model name (a string), got {model!r:.80}')
        return doc, {"model": model, "bands": doc.get("bands")}
    if ctype == "multipart/form-data":
        async with request.form(max_files=1, max_fields=4) as form:  # closes spooled files
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise InputError('a multipart upload needs the file in a field named "file"', 400)
            fields = {k: form.get(k) for k in ("model", "bands")}
            data = await upload.read()
        return data, {k: v for k, v in fields.items() if isinstance(v, str)}
    if ctype in _FILE_TYPES or not ctype:
        return body, {}
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
    app.add_middleware(BodyLimit, limit=config.max_upload_bytes)
    app.add_exception_handler(InputError, _input_error)
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
    payload, fields = await _upload_payload(request)
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
