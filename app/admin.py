"""POST /admin/reload: swap in new weights without downtime, behind the admin token.

    curl -X POST -H "Authorization: Bearer $CIFAR10_ADMIN_TOKEN" localhost:8000/admin/reload

`?model=lite` and `?model=best` reload those models (CIFAR10_LITE_WEIGHTS, CIFAR10_BEST_WEIGHTS by
default). The same reload runs on SIGHUP (see `app.main`), for every served model. The path is one
the server reads, so only an operator holding the admin token may name it; the file is loaded with
weights_only=True, so even a hostile file cannot run code, and it must pass every check before it
serves."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

from fastapi import APIRouter, Body, Depends, Query
from pydantic import BaseModel, Field

from app.checkpoint import CheckpointError
from app.errors import ApiError, ErrorBody
from app.predict import StrictQuery, model_field
from app.reloading import reload_model
from app.routes import ServiceDep
from app.security import require_admin

admin_router = APIRouter(tags=["admin"], dependencies=[Depends(require_admin)])


class ReloadRequest(BaseModel):
    path: str | None = Field(
        None,
        description="Weights file to load (default: the model's configured file, CIFAR10_WEIGHTS for final).",
    )


class ReloadResult(BaseModel):
    model: str = Field(description="The model reloaded: final, lite or best.")
    sha256: str = Field(description="sha256 of the weights now serving.")
    previous_sha256: str = Field(description="sha256 of the weights served before.")
    changed: bool = Field(description="False when the file loaded holds the weights already serving.")
    weights_file: str
    trained_at: str | None = Field(description="The checkpoint's created_at, if it records one.")
    loaded_at: str
    seconds: float = Field(description="Time to load, check and warm up the new weights.")


class ReloadQuery(StrictQuery):
    path: str | None = Field(None, description="Weights file to load (default: the model's configured file).")
    model: str | None = model_field()


def _error(status: int, description: str) -> dict[int | str, dict]:
    return {status: {"model": ErrorBody, "description": description}}


@admin_router.post(
    "/admin/reload",
    response_model=ReloadResult,
    summary="Load, check and warm up a weights file, then swap it in between batches",
    responses={
        **_error(400, "The body is not valid JSON."),
        **_error(401, "The admin token is missing or wrong."),
        **_error(403, "Reloading is disabled: CIFAR10_ADMIN_TOKEN is not set."),
        **_error(404, "No model of that name is served."),
        **_error(422, "The file is missing, damaged, unsafe or not the model's network; the old serve on."),
        **_error(503, "The service is starting or shutting down."),
    },
)
async def reload(
    service: ServiceDep,
    query: Annotated[ReloadQuery, Query()],
    body: Annotated[ReloadRequest | None, Body()] = None,
) -> ReloadResult:
    body_path = body.path if body is not None else None
    path, model = query.path, query.model
    if path and body_path and path != body_path:
        raise ApiError(422, "invalid_request", "give the weights path once: in the query or in the body")
    started = time.perf_counter()
    try:
        previous, loaded = await asyncio.to_thread(reload_model, service, body_path or path or None, model)
    except CheckpointError as exc:
        raise ApiError(422, "invalid_weights", f"{exc}; the old weights keep serving") from None
    except OSError as exc:  # a path the system refuses: a name too long, a directory... (found by fuzzing)
        detail = f"cannot read the weights file: {exc.strerror or exc}; the old weights keep serving"
        raise ApiError(422, "invalid_weights", detail) from None
    return ReloadResult(
        model=loaded.name,
        sha256=loaded.sha256,
        previous_sha256=previous.sha256,
        changed=loaded.sha256 != previous.sha256,
        weights_file=loaded.weights_file,
        trained_at=None if loaded.meta.get("created_at") is None else str(loaded.meta["created_at"]),
        loaded_at=loaded.loaded_at,
        seconds=time.perf_counter() - started,
    )
