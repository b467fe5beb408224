"""The HTTP edge of the model service: domain results and errors -> statuses, bodies and headers.

`ModelService` (app.service) answers in `Classification`s and raises `ServiceError`s (app.domain);
only this module knows which status each error gets and which carry Retry-After (`api_error`);
`install_service_errors` lets routes simply let a domain error rise. How a classification becomes
a /predict answer is `app.predict`'s; what /model/summary says is `model_summary`'s.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from app.calibration import public
from app.domain import (
    AtCapacity,
    BadUploads,
    NoImages,
    NotReady,
    ServiceError,
    TooManyFiles,
    UnknownModel,
)
from app.errors import ApiError, FileProblem, refuse
from app.loading import dtype_name
from app.model import CLASSES, INPUT_SHAPE, MEAN, STD
from app.schemas import (
    CalibrationInfo,
    InferenceInfo,
    LayerInfo,
    ModelSummary,
    Normalization,
    ServingInfo,
)
from app.service import ModelService

_STATUS: dict[type[ServiceError], int] = {
    NotReady: 503,
    AtCapacity: 503,
    NoImages: 422,
    TooManyFiles: 413,
    UnknownModel: 404,
}


def api_error(error: ServiceError, retry_after_s: int) -> ApiError:
    """The answer to a domain error: its status, body and (for 503) Retry-After."""
    if isinstance(error, BadUploads):
        files = [
            FileProblem(
                index=p.index,
                filename=p.filename,
                status=p.error.status,
                code=p.error.code,
                detail=p.error.message,
            )
            for p in error.problems
        ]
        return ApiError(files[0].status, error.code, error.message, files=files)
    status = _STATUS.get(type(error), 500)
    headers = {"Retry-After": str(retry_after_s)} if status == 503 else None
    return ApiError(status, error.code, error.message, headers=headers)


def install_service_errors(app: FastAPI) -> None:
    """Routes let ServiceErrors rise; they are answered (and counted) like ApiErrors."""

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ServiceError)
        error = api_error(exc, request.app.state.settings.retry_after_s)
        return refuse(error, getattr(request.app.state, "metrics", None), request.scope["path"])

    app.add_exception_handler(ServiceError, handle)


def model_summary(service: ModelService, model: str | None = None) -> ModelSummary:
    loaded, s = service.loaded(model), service.settings
    info = loaded.predictor.info
    detector = loaded.calibration.detector
    return ModelSummary(
        model=loaded.architecture,
        id=loaded.name,
        total_params=loaded.total_params,
        trainable_params=loaded.trainable_params,
        non_trainable_params=loaded.total_params - loaded.trainable_params,
        macs=loaded.macs,
        input_shape=list(INPUT_SHAPE),
        layers=[
            LayerInfo(name=r.name, type=r.type, output_shape=list(r.output_shape), params=r.params)
            for r in loaded.layers
        ],
        device=str(loaded.device),
        dtype=dtype_name(info.precision),
        inference=InferenceInfo(
            backend=info.backend,
            precision=info.precision,
            device=info.device,
            threads=info.threads,
            layout=info.layout,
        ),
        classes=list(CLASSES),
        normalization=Normalization(mean=list(MEAN), std=list(STD)),
        sha256=loaded.sha256,
        weights_file=loaded.weights_file,
        loaded_at=loaded.loaded_at,
        calibration=CalibrationInfo(
            temperature=loaded.calibration.temperature,
            calibrated="calibration" in loaded.meta,
            unsure_detector=detector is not None,
            ood_threshold=detector.threshold if detector is not None else None,
            explain=loaded.model.cam_method,
        ),
        checkpoint=public(loaded.meta),
        serving=ServingInfo(
            batching=s.batching,
            max_batch_size=s.max_batch_size,
            max_wait_ms=s.max_wait_ms,
            max_queue_size=s.max_queue_size,
            workers=service.workers,
            torch_threads=service.torch_threads,
            max_files=s.max_files,
            max_body_bytes=s.max_body_bytes,
            max_pixels=s.max_pixels,
        ),
    )
