"""POST /predict, one contract: its query and `top_k` rule, its body, its answer, its refusals.

`respond` is the whole of it: the query read as `PredictQuery` (one `top_k` rule,
`PredictQuery.resolve_top_k`), the images read by the one body parser (`app.uploads`), the answer
written by the one writer (`write_answer`) or refused by `app.errors.refuse`. Two doors lead to
it: the ASGI fast path (`app.fastpath`), which calls it before routing, without FastAPI's
per-request machinery (docs/benchmarks.md), and the FastAPI route (`app.routes.predict`), which
declares /predict for the OpenAPI schema and is taken when the query is not valid (FastAPI's 422
explains it) or CIFAR10_FAST_PATH=false.
"""

from __future__ import annotations

from typing import Any, Literal
from urllib.parse import parse_qsl

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from app.batching import Arrival
from app.domain import Classification, ServiceError, Upload
from app.edge import api_error
from app.errors import refuse
from app.model import CLASSES
from app.schemas import ClassProbability, ModelRef, Prediction, PredictResponse, Timing
from app.service import ModelService
from app.settings import MAX_TOP_K
from app.uploads import read_uploads


def model_field() -> Any:
    """The `model` query parameter the inference, summary and reload endpoints share; the admission
    middleware reads the same parameter from the raw query (`app.routes.requested_model`) to queue
    the request."""
    return Field(
        None,
        description="The model to ask: final (FinalModel, the default), lite (LiteModel, the "
        "smallest) or best (AirbenchNet, the most accurate), when their weights are configured.",
        examples=["final", "lite", "best"],
    )


class StrictQuery(BaseModel):
    """Query parameters an endpoint takes: an unknown one (a misspelt `topk`) is answered with 422,
    not silently ignored."""

    model_config = ConfigDict(extra="forbid")


class PredictQuery(StrictQuery):
    top_k: int | None = Field(
        None, ge=1, le=MAX_TOP_K, description="Classes to list per image (default: CIFAR10_TOP_K, 3)."
    )
    model: str | None = model_field()
    explain: Literal["cam"] | None = Field(
        None,
        description="cam: add a 32x32 heatmap per image of where the evidence for its label lies "
        "(exact CAM for FinalModel and LiteModel, Grad-CAM for AirbenchNet).",
    )

    def resolve_top_k(self, default: int) -> int:
        """The one top_k rule: the query's (1 to MAX_TOP_K, checked above), else CIFAR10_TOP_K."""
        return self.top_k or default


_NO_QUERY = PredictQuery()


def read_query(query_string: bytes) -> PredictQuery | None:
    """The query as the route reads it (Starlette's decoding, the last of a repeated key,
    `PredictQuery`'s rules), or None where the route would answer 422: it then explains."""
    if not query_string:
        return _NO_QUERY
    values = dict(parse_qsl(query_string.decode("latin-1"), keep_blank_values=True))
    try:
        return PredictQuery.model_validate(values)
    except ValidationError:
        return None


def _response_model(result: Classification) -> PredictResponse:
    """Each image's top_k classes, most likely first, with its unsure flag (and heatmap, if asked)."""
    predictions = []
    for filename, image in zip(result.filenames, result.answers, strict=True):
        probs = image.probabilities
        order = sorted(range(len(probs)), key=probs.__getitem__, reverse=True)[: result.top_k]
        values: dict[str, Any] = {
            "filename": filename,
            "label": CLASSES[order[0]],
            "index": order[0],
            "confidence": probs[order[0]],
            "top_k": [
                ClassProbability.model_construct(label=CLASSES[i], probability=probs[i]) for i in order
            ],
            "unsure": image.unsure,
            "ood_score": image.ood_score,
        }
        if image.heatmap is not None:  # else left unset, and out of the answer
            values["heatmap"] = image.heatmap
        # model_construct: the service's own values, typed already; validating the 1,024 numbers of
        # a heatmap would cost more than the heatmap itself
        predictions.append(Prediction.model_construct(**values))
    loaded = result.model
    return PredictResponse(
        predictions=predictions,
        model=ModelRef(
            name=loaded.architecture, id=loaded.name, sha256=loaded.sha256, device=str(loaded.device)
        ),
        timing=Timing(
            total_ms=1000 * result.total_s,
            decode_ms=1000 * result.decode_s,
            queue_ms=1000 * result.queue_s,
            inference_ms=1000 * result.run_s,
            batch_size=result.batch_size,
        ),
    )


def write_answer(result: Classification) -> Response:
    """The one writer of a /predict answer: `PredictResponse` as JSON, the heatmap only when asked for."""
    body = _response_model(result).model_dump_json(exclude_unset=True).encode()
    return Response(body, media_type="application/json")


async def answer(
    service: ModelService, uploads: list[Upload], query: PredictQuery, arrival: Arrival | None, path: str
) -> Response:
    """Classify `uploads` as `query` asks and write the answer, or refuse with the service's error."""
    settings = service.settings
    top_k = query.resolve_top_k(settings.top_k)
    try:
        result = await service.classify(uploads, top_k, arrival, query.model, explain=query.explain == "cam")
    except ServiceError as error:
        return refuse(api_error(error, settings.retry_after_s), service.metrics, path)
    return write_answer(result)


async def respond(service: ModelService, request: Request, query: PredictQuery) -> Response:
    """Read the request's images, classify them as `query` asks and write the answer (or refuse)."""
    async with read_uploads(request) as uploads:
        arrival = getattr(request.state, "arrival", None)  # set by AdmissionMiddleware
        return await answer(service, uploads, query, arrival, request.scope["path"])
