"""The endpoints, one router per concern. Routes only parse, call the service and shape the answer.

/predict is declared here for the OpenAPI schema; its contract (query, body, answer, refusals) is
`app.predict.respond`, which the ASGI fast path (`app.fastpath`) calls before routing for every
request whose query is valid.

`inference_router` holds the inference endpoints: `app.main` reads their paths from it and gives
every one the API key, the admission check (readiness, queue, drain) and the metrics, so a new
inference route is declared here once. A `ServiceError` a route lets rise is answered by
`app.edge`.
"""

from __future__ import annotations

from typing import Annotated, Literal
from urllib.parse import parse_qsl

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import Field
from starlette.types import Scope

from app.edge import model_summary as build_summary
from app.errors import error_responses
from app.imaging import supported_formats
from app.metrics import Metrics
from app.model import format_layer_table
from app.predict import PredictQuery, StrictQuery, model_field, respond
from app.schemas import Health, ModelSummary, PredictResponse
from app.service import ModelService
from app.uploads import REQUEST_BODY


async def get_service(request: Request) -> ModelService:
    return request.app.state.service


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


ServiceDep = Annotated[ModelService, Depends(get_service)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]


class SummaryQuery(StrictQuery):
    format: Literal["json", "text"] = Field(
        "json", description="text: the layer table in torchsummary's layout."
    )
    model: str | None = model_field()


def requested_model(scope: Scope) -> str | None:
    """The model an inference request asks for, before its body is read: the name in
    /v2/models/{name}/infer, else the `model` query parameter; None for the default."""
    path: str = scope["path"]
    if path.startswith("/v2/models/"):
        return path.split("/")[3]
    for key, value in parse_qsl(scope.get("query_string", b"").decode("latin-1")):
        if key == "model":
            return value
    return None


inference_router = APIRouter(tags=["predict"])
model_router = APIRouter(tags=["model"])
ops_router = APIRouter(tags=["operations"])


@inference_router.post(
    "/predict",
    response_model=PredictResponse,  # the schema; the answer is written by app.predict
    openapi_extra={"requestBody": REQUEST_BODY},  # the body is read by app.uploads, not by FastAPI
    summary="Classify one or more images",
    responses=error_responses(400, 404, 413, 415, 422, 503),
    description=(
        "Upload images as multipart/form-data, in the field `file` (repeat it for several, up to "
        "the configured maximum). Any format Pillow reads among "
        f"{supported_formats()} (the first frame of an animation), in any mode (greyscale, palette, "
        "transparency over white, CMYK, 16-bit); the EXIF orientation is applied, then the image is "
        "center-cropped to a square and resized to 32x32 (bicubic): the rule evaluation uses.\n\n"
        "A request is all or nothing: if any file is bad, no predictions are made, the status is "
        "that of the first bad file, and `files` lists every bad file with its position and reason."
    ),
)
async def predict(request: Request, service: ServiceDep, query: Annotated[PredictQuery, Query()]) -> Response:
    """The fast path's answer (`app.predict.respond`), once FastAPI has checked the query."""
    return await respond(service, request, query)


@model_router.get(
    "/model/summary",
    response_model=ModelSummary,
    summary="The model's layers, parameters, device and checkpoint metadata",
    responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
        **error_responses(404, 422, 503),
    },
)
async def model_summary(
    service: ServiceDep,
    query: Annotated[SummaryQuery, Query()],
) -> ModelSummary | PlainTextResponse:
    if not service.ready:
        raise service.not_ready()
    if query.format == "text":
        loaded = service.loaded(query.model)
        table = format_layer_table(loaded.layers, loaded.total_params, loaded.trainable_params)
        return PlainTextResponse(f"{table}\nDevice Type - {loaded.device.type}\n")  # the original's line
    return build_summary(service, query.model)


@ops_router.get("/health/live", response_model=Health, summary="The process is up (it may still be loading)")
async def live(service: ServiceDep) -> Health:
    loaded = service.slot().loaded  # the default model; None while loading
    return Health(status="alive", model_sha256=loaded.sha256 if loaded else None)


@ops_router.get(
    "/health/ready",
    response_model=Health,
    summary="The model is loaded and warmed up, and requests are being taken",
    responses={503: {"model": Health, "description": "Starting, draining or stopping."}},
)
async def ready(service: ServiceDep) -> Health | JSONResponse:
    if not service.ready:
        headers = {"Retry-After": str(service.settings.retry_after_s)}
        return JSONResponse(Health(status=service.state.value).model_dump(), status_code=503, headers=headers)
    return Health(status="ready", model_sha256=service.loaded().sha256)


@ops_router.get(
    "/metrics",
    summary="Prometheus metrics (text exposition format)",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
def metrics(metrics: MetricsDep) -> Response:
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)
