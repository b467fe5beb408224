"""Every error answer is JSON of one shape, `ErrorBody`, with a sentence that says what was wrong.

    {"detail": "the file at index 1 ('notes.txt'): text, not an image", "code": "unsupported_media_type",
     "files": [{"index": 1, "filename": "notes.txt", "status": 415, "code": "...", "detail": "..."}]}

`code` is stable and machine-readable (it is also the `reason` label of the rejected-requests
metric); `detail` is for people. Nothing a client sends produces a 5xx or a traceback.

Every layer refuses a request the one way, `refuse(error, metrics, path)`: it counts the refusal
and renders the envelope, the Open Inference Protocol's `{"error": ...}` on /v2 paths. The
connection gate (app.connections), the middleware, the exception handlers below, the service's
errors (app.edge), the /predict fast path and the /v2 routes all call it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.settings import MAX_TOP_K

if TYPE_CHECKING:
    from prometheus_client import Counter

    from app.metrics import Metrics

log = logging.getLogger(__name__)


class FileProblem(BaseModel):
    index: int = Field(description="Position of the file in the upload, from 0.")
    filename: str | None = Field(description="The name the client gave the file, if any.")
    status: int = Field(description="The HTTP status this problem alone would get.")
    code: str = Field(description="empty_file, corrupt_image, unsupported_media_type or too_many_pixels.")
    detail: str


class FieldProblem(BaseModel):
    loc: list[str | int] = Field(description="Where the problem is, e.g. ['query', 'top_k'].")
    msg: str
    type: str


class ErrorBody(BaseModel):
    detail: str = Field(description="One sentence that says what was wrong.")
    code: str = Field(description="Stable machine-readable reason, e.g. queue_full or corrupt_image.")
    files: list[FileProblem] | None = Field(None, description="Every bad file of a /predict request.")
    fields: list[FieldProblem] | None = Field(None, description="Every invalid request field (422).")


class ApiError(Exception):
    """An error answer; raise it anywhere below a route."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        files: list[FileProblem] | None = None,
        fields: list[FieldProblem] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.files = files
        self.fields = fields
        self.headers = headers

    def body(self) -> dict[str, Any]:
        body = ErrorBody(detail=self.detail, code=self.code, files=self.files, fields=self.fields)
        return body.model_dump(exclude_none=True)


def is_v2(path: str) -> bool:
    """A path of the Open Inference Protocol, whose errors are `{"error": "<sentence>"}`."""
    return path == "/v2" or path.startswith("/v2/")


def refuse(
    error: ApiError, metrics: Metrics | None, path: str, counter: Counter | None = None
) -> JSONResponse:
    """The answer that refuses a request, counted: the one way every layer refuses.

    Counted in cifar10_rejected_requests{reason=<code>}, or in `counter` where the connection layer
    keeps a count of its own (connections refused, slow clients); not counted without `metrics`
    (an app without them, or a failure of the service's own rather than a refusal). The envelope is
    `ErrorBody`, or `{"error": <detail>}` on /v2 paths; the status and headers are the error's.
    """
    if metrics is not None:
        (counter if counter is not None else metrics.rejected.labels(error.code)).inc()
    body = {"error": error.detail} if is_v2(path) else error.body()
    return JSONResponse(body, status_code=error.status, headers=error.headers)


def _metrics(request: Request) -> Metrics | None:
    return getattr(request.app.state, "metrics", None)


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return refuse(exc, _metrics(request), request.scope["path"])


def _query_names(request: Request) -> list[str]:
    """The query parameters the matched route takes (those of a query model, field by field)."""
    dependant = getattr(request.scope.get("route"), "dependant", None)
    names: list[str] = []
    for field in getattr(dependant, "query_params", ()):
        annotation = field.field_info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names += annotation.model_fields
        else:
            names.append(field.alias)
    return names


def _is_unknown_query(error: dict[str, Any]) -> bool:
    return error.get("type") == "extra_forbidden" and list(error.get("loc", ()))[:1] == ["query"]


def _unknown_query(errors: list[dict[str, Any]], request: Request) -> str | None:
    """One sentence for every query parameter the endpoint does not take (a misspelt `topk`)."""
    unknown = [str(e["loc"][1]) for e in errors if _is_unknown_query(e)]
    if not unknown:
        return None
    names = _query_names(request)
    takes = f" (this endpoint takes: {', '.join(names)})" if names else ""
    return f"unknown query parameter{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}{takes}"


def _field_sentence(error: dict[str, Any], form_keys: list[str]) -> str:
    loc = [str(part) for part in error.get("loc", ())]
    where = loc[0] if loc else ""
    name = loc[1] if len(loc) > 1 else ""
    if where == "query" and name == "top_k":
        got = error.get("input")
        return f"query parameter top_k must be a whole number from 1 to {MAX_TOP_K}, not {got!r}"
    if where == "body" and name == "file":
        if error.get("type") == "missing":
            got = f" (the form has: {', '.join(sorted(set(form_keys)))})" if form_keys else ""
            return f"no images: send one or more files in the multipart/form-data field 'file'{got}"
        return "the field 'file' must hold file uploads (parts with a filename), not plain text values"
    return f"{'.'.join(loc) or 'request'}: {error.get('msg', 'is invalid')}"


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    body = getattr(exc, "body", None)
    form_keys = list(body.keys()) if body is not None and hasattr(body, "keys") else []
    content_type = request.headers.get("content-type", "")
    missing_file = any(
        e.get("type") == "missing" and list(e.get("loc", ()))[:2] == ["body", "file"] for e in errors
    )
    if missing_file and content_type and not content_type.lower().startswith("multipart/form-data"):
        error = ApiError(
            415,
            "unsupported_media_type",
            "send the images as multipart/form-data in the field 'file', "
            f"not as {content_type.split(';')[0]}",
        )
        return refuse(error, _metrics(request), request.scope["path"])
    fields = [
        FieldProblem(loc=list(e.get("loc", ())), msg=str(e.get("msg", "")), type=str(e.get("type", "")))
        for e in errors
    ]
    unknown = _unknown_query(errors, request)
    sentences = [_field_sentence(e, form_keys) for e in errors if not _is_unknown_query(e)]
    detail = "; ".join(dict.fromkeys(([unknown] if unknown else []) + sentences)) or "invalid request"
    error = ApiError(422, "invalid_request", detail, fields=fields)
    return refuse(error, _metrics(request), request.scope["path"])


_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "content_too_large",
    415: "unsupported_media_type",
}


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = str(exc.detail)
    status, code = exc.status_code, _HTTP_CODES.get(exc.status_code, "http_error")
    if status == 400:  # FastAPI or Starlette could not parse the body: all our own 400s are ApiErrors
        reason = str(exc.__cause__ or "").strip() or detail
        if "too many files" in reason.lower():
            status, code = 413, "too_many_files"
            settings = getattr(request.app.state, "settings", None)
            limit = f"; at most {settings.max_files} per request" if settings is not None else ""
            detail = f"too many files in one request ({reason}){limit}"
        else:
            code = "malformed_body"
            detail = f"the request body could not be parsed: {reason}"
    elif status == 404:
        detail = f"no such endpoint: {request.url.path} (see /docs)"
    elif status == 405:
        detail = f"{request.method} is not allowed on {request.url.path}"
    error = ApiError(status, code, detail, headers=getattr(exc, "headers", None))
    return refuse(error, _metrics(request) if 400 <= status < 500 else None, request.scope["path"])


def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    error = ApiError(500, "internal_error", "internal error; the details are in the service log")
    return refuse(error, None, request.scope["path"])  # a failure of the service's own, not a refusal


_HANDLERS = (
    (ApiError, _api_error),
    (RequestValidationError, _validation_error),
    (StarletteHTTPException, _http_error),
)


async def handled(request: Request, exc: Exception) -> JSONResponse | None:
    """The answer the app's handlers give `exc`, for code that runs before routing (the /predict fast
    path), or None for an exception they leave to the server's 500."""
    for kind, handler in _HANDLERS:
        if isinstance(exc, kind):
            return await handler(request, exc)
    return None


def install_error_handlers(app: FastAPI) -> None:
    for kind, handler in _HANDLERS:
        app.add_exception_handler(kind, handler)
    app.add_exception_handler(Exception, _internal_error)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries for the given error statuses, all with the ErrorBody schema."""
    described = {
        400: "An upload is empty, truncated or damaged.",
        413: "The body, the number of files or an image's pixel count is over its limit.",
        404: "No model of that name is served (see ?model=).",
        415: "An upload is not an image in a supported format (text, PDF, SVG...), "
        "or the body is not multipart/form-data.",
        422: "The field 'file' is missing or misnamed, or a query parameter is invalid or unknown.",
        503: "The model is not loaded yet, or the queue is full; retry after Retry-After seconds.",
    }
    bad_file = {"index": 0, "filename": "notes.jpg", "status": 415, "code": "unsupported_media_type",
                "detail": "not an image in a supported format"}  # fmt: skip
    examples: dict[int, dict[str, Any]] = {
        400: {
            "detail": "the file at index 0 ('cat.jpg'): the image is truncated or damaged",
            "code": "corrupt_image",
        },
        404: {
            "detail": "there is no model 'huge' here; the models served are 'final', 'lite'",
            "code": "model_not_found",
        },  # fmt: skip
        413: {
            "detail": "40 files in one request; this service takes at most 32 a request: split them over "
            "several requests",
            "code": "too_many_files",
        },  # fmt: skip
        415: {
            "detail": "the file at index 0 ('notes.jpg'): not an image in a supported format",
            "code": "unsupported_media_type",
            "files": [bad_file],
        },  # fmt: skip
        422: {
            "detail": "unknown query parameter 'topk' (this endpoint takes: top_k, model, explain)",
            "code": "invalid_request",
            "fields": [
                {"loc": ["query", "topk"], "msg": "Extra inputs are not permitted", "type": "extra_forbidden"}
            ],
        },  # fmt: skip
        503: {
            "detail": "the service is at capacity (256 images waiting); retry shortly",
            "code": "queue_full",
        },
    }
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {
            "model": ErrorBody,
            "description": described[status],
            "content": {"application/json": {"example": examples[status]}},
        }
        if status == 503:
            retry_after = {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}
            entry["headers"] = {"Retry-After": retry_after}
        out[status] = entry
    return out
