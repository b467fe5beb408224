"""The Open Inference Protocol (KServe v2 REST) in front of the same model service as /predict.

    GET  /v2                          server metadata (extensions: binary_tensor_data)
    GET  /v2/health/live, /v2/health/ready
    GET  /v2/models/final             model metadata: its input and outputs (and lite, best, when served)
    GET  /v2/models/final/ready
    POST /v2/models/final/infer       input `image` (BYTES, [N]): N encoded image files;
                                      outputs `probabilities` (FP32, [N, 10]), `label` (BYTES, [N]);
                                      on request `ood_score` (FP32, [N]), `unsure` (BOOL, [N]),
                                      `heatmap` (FP32, [N, 32, 32]; computed only when asked for)

Each image is decoded by `ModelService.classify`, the call /predict makes, so the image rule, the
limits, batching, admission, drain and metrics are /predict's. The tensors (base64 in JSON, or
binary after a JSON header) are parsed and encoded by `app.v2_tensors`.

A model name maps to a `ServedModel` (`served_models`); `inference_router` declares one infer
path per name, so `app.main` gives each the API key, admission and metrics as it does /predict.
Errors are `{"error": "<sentence>"}`: every layer refuses through `app.errors.refuse`, which
renders that envelope on /v2 paths (the API-key, body-limit and admission middleware, routing,
the connection gate, and the routes below).
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from app.domain import ImageAnswer, ServiceError, Upload
from app.edge import api_error
from app.errors import ApiError, refuse
from app.service import ModelService
from app.v2_tensors import (
    HEADER_LENGTH,
    INPUT,
    OPTIONAL_OUTPUTS,
    OUTPUTS,
    InferRequest,
    TensorError,
    encode_response,
    parse_infer_request,
)

EXTENSIONS = ["binary_tensor_data"]
# /predict's statuses that mean "this image is bad" in the protocol's terms: 400.
_AS_BAD_REQUEST = {415, 422}


@dataclass(frozen=True)
class ServedModel:
    """A model name of the protocol and the service that serves it."""

    name: str
    service: ModelService

    @property
    def platform(self) -> str:
        loaded = self.service.slot(self.name).loaded
        return loaded.predictor.info.backend if loaded is not None else self.service.settings.backend

    def outputs(self) -> dict[str, tuple[str, list[int]]]:
        """The outputs this model can give: the default two, and the optional ones it has."""
        loaded = self.service.slot(self.name).loaded
        detector = loaded is not None and loaded.calibration.detector is not None
        optional = {k: v for k, v in OPTIONAL_OUTPUTS.items() if detector or k == "heatmap"}
        return {**OUTPUTS, **optional}

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "platform": self.platform,
            "inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": n, "datatype": d, "shape": s} for n, (d, s) in self.outputs().items()],
        }


def served_models(service: ModelService) -> dict[str, ServedModel]:
    """The models /v2 serves, by the service's names: `final` (FinalModel) and, when configured,
    `lite` (LiteModel) and `best` (AirbenchNet)."""
    return {name: ServedModel(name, service) for name in service.model_names}


def infer_response(model: str, request: InferRequest, answers: list[ImageAnswer]) -> Response:
    header, binary = encode_response(model, request, answers)
    if binary is None:
        return JSONResponse(header)
    head = json.dumps(header, separators=(",", ":")).encode()
    return Response(
        head + binary, media_type="application/octet-stream", headers={HEADER_LENGTH: str(len(head))}
    )


def _refuse(request: Request, error: ApiError) -> JSONResponse:
    return refuse(error, request.app.state.metrics, request.scope["path"])  # {"error": ...} on /v2 paths


def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
    error = api_error(exc, request.app.state.settings.retry_after_s)
    if error.status in _AS_BAD_REQUEST:
        error.status = 400
    return _refuse(request, error)


def _model(request: Request, name: str) -> ServedModel:
    models: Mapping[str, ServedModel] = request.app.state.v2_models
    if name not in models:
        served = ", ".join(models)
        raise ApiError(404, "unknown_model", f"unknown model {name!r}; this server serves {served}")
    return models[name]


# -- the routes --------------------------------------------------------------------------------


class V2Error(BaseModel):
    error: str = Field(
        description="One sentence that says what was wrong.", examples=["unknown model 'huge'"]
    )


class TensorMetadata(BaseModel):
    name: str = Field(examples=["probabilities"])
    datatype: str = Field(examples=["FP32"])
    shape: list[int] = Field(description="-1: any size.", examples=[[-1, 10]])


class ModelMetadata(BaseModel):
    name: str = Field(examples=["final"])
    platform: str = Field(description="The backend that runs it.", examples=["onnxruntime"])
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata] = Field(
        description="The default two, then the optional ones this model has."
    )


class InferInput(BaseModel):
    name: str = Field(examples=[INPUT])
    datatype: str = Field(examples=["BYTES"])
    shape: list[int] = Field(examples=[[1]])
    data: list[str] | None = Field(
        None, description="Each image file in base64 (JSON), or none with binary data."
    )
    parameters: dict[str, Any] | None = Field(None, examples=[{"binary_data_size": 1024}])


class RequestedOutput(BaseModel):
    name: str = Field(examples=["label"])
    parameters: dict[str, Any] | None = Field(None, examples=[{"binary_data": False}])


class InferRequestBody(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = Field(None, examples=[{"binary_data_output": False}])
    inputs: list[InferInput]
    outputs: list[RequestedOutput] | None = Field(
        None, description="The outputs to return (default: probabilities and label)."
    )


class InferOutput(BaseModel):
    name: str = Field(examples=["label"])
    datatype: str = Field(examples=["BYTES"])
    shape: list[int] = Field(examples=[[1]])
    data: list[Any] | None = Field(None, examples=[["cat"]])
    parameters: dict[str, Any] | None = None


class InferResponseBody(BaseModel):
    model_name: str = Field(examples=["final"])
    id: str | None = None
    outputs: list[InferOutput]


V2_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": V2Error, "description": "No model of that name is served."},
    503: {"model": V2Error, "description": "Loading, draining or full; retry after Retry-After seconds."},
}
INFER_DESCRIPTION = (
    "The Open Inference Protocol's inference request: the input `image` (BYTES, shape [N]) holds N "
    "image files, base64 in JSON or raw with the binary tensor data extension (header "
    "Inference-Header-Content-Length); outputs `probabilities` and `label` by default, and "
    "`ood_score`, `unsure` and `heatmap` when named in `outputs`. Images are decoded, limited and "
    "batched as by /predict."
)


def inference_router(models: Mapping[str, ServedModel]) -> APIRouter:
    """POST /v2/models/<name>/infer for each served model: concrete paths, so that app.main can give
    them the API key, admission and metrics by path, as it does /predict."""
    router = APIRouter(tags=["v2"])
    for name in models:
        router.add_api_route(
            f"/v2/models/{name}/infer",
            _infer_endpoint(name),
            methods=["POST"],
            summary=f"Classify images with model {name} (Open Inference Protocol)",
            description=INFER_DESCRIPTION,
            response_model=InferResponseBody,
            responses={
                400: {"model": V2Error, "description": "A bad tensor or image."},
                413: {"model": V2Error, "description": "Over a limit (body, files, pixels)."},
                **V2_ERRORS,
            },
            openapi_extra={
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": InferRequestBody.model_json_schema()},
                        "application/octet-stream": {
                            "schema": {"type": "string", "format": "binary"},
                            "description": "A JSON header of Inference-Header-Content-Length bytes, "
                            "then the tensors' bytes.",
                        },
                    },
                }
            },
        )
    return router


def _infer_endpoint(name: str):
    async def infer(request: Request) -> Response:
        served = _model(request, name)
        try:
            parsed = parse_infer_request(
                await request.body(), request.headers.get(HEADER_LENGTH), name, served.outputs()
            )
        except TensorError as exc:
            return _refuse(request, ApiError(400, "bad_tensor", str(exc)))
        service = served.service
        uploads = [Upload(None, io.BytesIO(image), len(image)) for image in parsed.images]
        arrival = getattr(request.state, "arrival", None)  # set by AdmissionMiddleware
        try:
            explain = "heatmap" in parsed.outputs
            result = await service.classify(uploads, service.settings.top_k, arrival, name, explain=explain)
        except ServiceError as exc:
            return _service_error(request, exc)
        return infer_response(name, parsed, result.answers)

    return infer


router = APIRouter(tags=["v2"])


class ServerMetadata(BaseModel):
    name: str = Field(examples=["cifar10-cnn"])
    version: str = Field(examples=["0.12.0"])
    extensions: list[str] = Field(examples=[EXTENSIONS])


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str = Field(examples=["final"])
    ready: bool


@router.get("/v2", summary="Server metadata (Open Inference Protocol)", response_model=ServerMetadata)
async def server_metadata(request: Request) -> dict[str, Any]:
    return {"name": request.app.title, "version": request.app.version, "extensions": EXTENSIONS}


@router.get("/v2/health/live", summary="The process is up (Open Inference Protocol)", response_model=Live)
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get(
    "/v2/health/ready",
    summary="Every served model is ready (Open Inference Protocol)",
    response_model=Ready,
    responses={503: V2_ERRORS[503]},
)
async def ready(request: Request) -> Response:
    for served in request.app.state.v2_models.values():
        if not served.service.ready:
            return _service_error(request, served.service.not_ready())
    return JSONResponse({"ready": True})


@router.get(
    "/v2/models/{name}",
    summary="A model's input and outputs (Open Inference Protocol)",
    response_model=ModelMetadata,
    responses={404: V2_ERRORS[404]},
)
async def model_metadata(request: Request, name: str) -> dict[str, Any]:
    return _model(request, name).metadata()


@router.get(
    "/v2/models/{name}/ready",
    summary="A model is ready (Open Inference Protocol)",
    response_model=ModelReady,
    responses=V2_ERRORS,
)
async def model_ready(request: Request, name: str) -> Response:
    served = _model(request, name)
    if not served.service.ready:
        return _service_error(request, served.service.not_ready())
    return JSONResponse({"name": name, "ready": True})


@router.post("/v2/models/{name}/infer", include_in_schema=False)
async def unknown_model_infer(request: Request, name: str) -> Response:
    """Served models' infer paths are declared (before this one) by `inference_router`."""
    _model(request, name)  # raises 404 for an unknown name
    return _refuse(request, ApiError(404, "unknown_model", f"no inference route for model {name!r}"))
