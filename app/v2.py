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
limits, batching, admission, drain and metrics are /predict's. In a JSON body a BYTES element is
a string holding the file in base64 (JSON strings cannot carry arbitrary bytes); with the binary
tensor data extension it is a 4-byte little-endian length followed by the file's bytes, after the
JSON header of `Inference-Header-Content-Length` bytes. An output is returned as binary when its
`parameters.binary_data` (or the request's `parameters.binary_data_output`) is true.

A model name maps to a `ServedModel` (`served_models`); `inference_router` declares one infer
path per name, so `app.main` gives each the API key, admission and metrics as it does /predict.
Errors are `{"error": "<sentence>"}`: the routes answer so themselves, and `V2ErrorMiddleware`
rewrites the app's own envelope (from the API-key, body-limit and admission middleware, and
routing) on /v2 paths.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.edge import api_error
from app.errors import ApiError
from app.model import CLASSES, IMAGE_SIZE
from app.service import ImageAnswer, ModelService, ServiceError, Upload

HEADER_LENGTH = "Inference-Header-Content-Length"
EXTENSIONS = ["binary_tensor_data"]
INPUT = "image"
OUTPUTS = {"probabilities": ("FP32", [-1, len(CLASSES)]), "label": ("BYTES", [-1])}  # by default
# Returned only when the request names them in "outputs" (the first two need an unsure detector).
OPTIONAL_OUTPUTS = {
    "ood_score": ("FP32", [-1]),
    "unsure": ("BOOL", [-1]),
    "heatmap": ("FP32", [-1, IMAGE_SIZE, IMAGE_SIZE]),
}
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


class TensorError(Exception):
    """The request's tensors cannot be used (400); the message is one sentence for the client."""


# -- the request -------------------------------------------------------------------------------


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    images: list[bytes]
    outputs: dict[str, bool]  # output name -> returned as binary, in the order to answer


def _split_body(body: bytes, header_length: str | None) -> tuple[Any, bytes]:
    """The JSON header (parsed) and the binary section after it."""
    if header_length is None:
        header, binary = body, b""
    else:
        if not header_length.strip().isdigit() or not 0 < int(header_length) <= len(body):
            raise TensorError(
                f"{HEADER_LENGTH} is {header_length!r}; it must be the byte length of the JSON header, "
                f"from 1 to the body's {len(body)} bytes"
            )
        header, binary = body[: int(header_length)], body[int(header_length) :]
    try:
        return json.loads(header), binary
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TensorError(f"the inference request is not valid JSON: {exc}") from None


def _split_bytes_elements(raw: bytes, what: str) -> list[bytes]:
    """BYTES tensor data: each element a 4-byte little-endian length, then that many bytes."""
    elements: list[bytes] = []
    at = 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise TensorError(f"{what}: {len(raw) - at} byte(s) left over where a 4-byte length was due")
        (size,) = struct.unpack_from("<I", raw, at)
        at += 4
        if at + size > len(raw):
            raise TensorError(
                f"{what}: element {len(elements)} says {size} bytes but only {len(raw) - at} follow"
            )
        elements.append(raw[at : at + size])
        at += size
    return elements


def _json_bytes_elements(data: Any, what: str) -> list[bytes]:
    if not isinstance(data, list) or not all(isinstance(e, str) for e in data):
        raise TensorError(f"{what}: 'data' must be a list of base64 strings, one per image")
    elements = []
    for index, element in enumerate(data):
        try:
            elements.append(base64.b64decode(element, validate=True))
        except (binascii.Error, ValueError):
            raise TensorError(f"{what}: element {index} is not base64 (send each file encoded so)") from None
    return elements


def parse_infer_request(
    body: bytes,
    header_length: str | None,
    model: str,
    available: Mapping[str, tuple[str, list[int]]] = OUTPUTS,
) -> InferRequest:
    """The images and the wanted outputs (of `available`) of an inference request; raises TensorError."""
    header, binary = _split_body(body, header_length)
    if not isinstance(header, dict):
        raise TensorError("the inference request must be a JSON object")
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise TensorError("'id' must be a string")
    parameters = header.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise TensorError("'parameters' must be an object")

    inputs = header.get("inputs")
    expected = f"model '{model}' takes one input, '{INPUT}' (BYTES, shape [N])"
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise TensorError(f"'inputs' must be a list of one tensor: {expected}")
    tensor = inputs[0]
    if tensor.get("name") != INPUT:
        raise TensorError(f"unknown input {tensor.get('name')!r}: {expected}")
    if tensor.get("datatype") != "BYTES":
        raise TensorError(f"input '{INPUT}' has datatype {tensor.get('datatype')!r}, not BYTES")
    shape = tensor.get("shape")
    if not (isinstance(shape, list) and len(shape) == 1 and type(shape[0]) is int and shape[0] >= 1):
        raise TensorError(f"input '{INPUT}' has shape {shape!r}, not [N] with N >= 1 images")
    what = f"input '{INPUT}'"
    size = (tensor.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        if type(size) is not int or not 0 <= size <= len(binary):
            raise TensorError(
                f"{what}: binary_data_size {size!r} does not fit the {len(binary)} bytes after the header"
            )
        if size != len(binary):
            raise TensorError(
                f"{len(binary) - size} byte(s) after the JSON header belong to no input "
                f"(binary_data_size is {size}, {len(binary)} bytes follow the header)"
            )
        images = _split_bytes_elements(binary[:size], what)
    else:
        if binary:
            raise TensorError(f"{len(binary)} byte(s) after the JSON header belong to no input")
        images = _json_bytes_elements(tensor.get("data"), what)
    if len(images) != shape[0]:
        raise TensorError(f"{what}: shape [{shape[0]}] but {len(images)} element(s) in its data")

    default_binary = parameters.get("binary_data_output", False)
    if not isinstance(default_binary, bool):
        raise TensorError("parameters.binary_data_output must be true or false")
    wanted = header.get("outputs")
    if wanted is None:
        return InferRequest(request_id, images, {name: default_binary for name in OUTPUTS})
    if not isinstance(wanted, list) or not all(isinstance(o, dict) for o in wanted):
        raise TensorError("'outputs' must be a list of objects with a 'name'")
    outputs: dict[str, bool] = {}
    for output in wanted:
        name = output.get("name")
        if name not in available:
            names = ", ".join(map(repr, available))
            raise TensorError(f"unknown output {name!r}; model '{model}' has {names}")
        binary_data = (output.get("parameters") or {}).get("binary_data", default_binary)
        if not isinstance(binary_data, bool):
            raise TensorError(f"output {name!r}: parameters.binary_data must be true or false")
        outputs[name] = binary_data
    return InferRequest(request_id, images, outputs)


# -- the response ------------------------------------------------------------------------------


def _values(name: str, answers: list[ImageAnswer]) -> list[Any]:
    """An output's elements, flattened in row-major order."""
    if name == "probabilities":
        return [p for a in answers for p in a.probabilities]
    if name == "label":
        return [CLASSES[max(range(len(a.probabilities)), key=a.probabilities.__getitem__)] for a in answers]
    if name == "heatmap":
        return [v for a in answers for row in a.heatmap or [] for v in row]
    return [getattr(a, name) for a in answers]  # ood_score, unsure


def _output(name: str, answers: list[ImageAnswer], binary: bool) -> tuple[dict[str, Any], bytes]:
    """An output tensor's JSON part and its binary data (empty when it is sent in the JSON)."""
    datatype, shape = {**OUTPUTS, **OPTIONAL_OUTPUTS}[name]
    shape = [len(answers), *shape[1:]]
    tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
    data = _values(name, answers)
    raw = b""
    if binary and datatype == "FP32":
        raw = struct.pack(f"<{len(data)}f", *data)
    elif binary and datatype == "BOOL":
        raw = bytes(bool(v) for v in data)
    elif binary:
        encoded = [label.encode() for label in data]
        raw = b"".join(struct.pack("<I", len(e)) + e for e in encoded)
    if binary:
        tensor["parameters"] = {"binary_data_size": len(raw)}
    else:
        tensor["data"] = data
    return tensor, raw


def infer_response(model: str, request: InferRequest, answers: list[ImageAnswer]) -> Response:
    outputs, chunks = [], []
    for name, binary in request.outputs.items():
        tensor, raw = _output(name, answers, binary)
        outputs.append(tensor)
        chunks.append(raw)
    header: dict[str, Any] = {"model_name": model}
    if request.id is not None:
        header["id"] = request.id
    header["outputs"] = outputs
    if not any(binary for binary in request.outputs.values()):
        return JSONResponse(header)
    head = json.dumps(header, separators=(",", ":")).encode()
    return Response(
        head + b"".join(chunks),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(head))},
    )


def error_answer(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
    error = api_error(exc, request.app.state.settings.retry_after_s)
    request.app.state.metrics.rejected.labels(error.code).inc()
    status = 400 if error.status in _AS_BAD_REQUEST else error.status
    return error_answer(status, error.detail, error.headers)


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
            request.app.state.metrics.rejected.labels("bad_tensor").inc()
            return error_answer(400, str(exc))
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
    version: str = Field(examples=["0.9.0"])
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
    return error_answer(404, f"no inference route for model {name!r}")


# -- error bodies ------------------------------------------------------------------------------


class V2ErrorMiddleware:
    """On /v2 paths, turns the app's error envelope `{"detail": ..., "code": ...}` into the protocol's
    `{"error": ...}`, same status and headers; every other path passes straight through."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path != "/v2" and not path.startswith("/v2/"):
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        chunks: list[bytes] = []

        async def rewrite(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                content_type = MutableHeaders(raw=message["headers"]).get("content-type", "")
                if message["status"] >= 400 and content_type.startswith("application/json"):
                    start = message  # hold it until the whole body is here
                    return
            elif message["type"] == "http.response.body" and start is not None:
                chunks.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                body = _error_body(b"".join(chunks))
                headers = MutableHeaders(raw=list(start["headers"]))
                headers["content-length"] = str(len(body))
                await send({**start, "headers": headers.raw})
                await send({"type": "http.response.body", "body": body})
                return
            await send(message)

        await self.app(scope, receive, rewrite)


def _error_body(body: bytes) -> bytes:
    try:
        content = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return body
    if not isinstance(content, dict) or "error" in content or "detail" not in content:
        return body
    detail = content["detail"]
    return json.dumps({"error": detail if isinstance(detail, str) else json.dumps(detail)}).encode()
