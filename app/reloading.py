"""Swapping a served model's weights while requests keep flowing: POST /admin/reload and SIGHUP.

A new checkpoint is loaded, checked, given its predictor and warmed up off to the side, and only
then swapped in (`ModelService.swap`, one reference assignment: every batch reads its model
once). A file that fails any check is refused and counted, and the old weights keep serving.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from app.checkpoint import CheckpointError
from app.domain import ServiceError
from app.loading import LoadedModel, load_model, warm_up
from app.predictor import PredictorError

if TYPE_CHECKING:
    from app.service import ModelService

log = logging.getLogger(__name__)


def reload_model(
    service: ModelService, weights: str | Path | None = None, model: str | None = None
) -> tuple[LoadedModel, LoadedModel]:
    """Blocking: load, check and warm up `weights` (default: the configured file) for model
    `model` (default: the default model), then swap it in.

    Returns (previous, new). Raises CheckpointError for a file that fails any check (the old
    weights keep serving), UnknownModel, and NotReady unless the service is ready. Concurrent
    reloads of one model run one after the other.
    """
    slot = service.slot(model)
    path = Path(weights) if weights is not None else slot.weights
    reloads = service.metrics.reloads
    with slot.reload_lock:
        if not service.ready or service.device is None:
            raise service.not_ready()
        try:
            loaded = load_model(path, service.device, service.make_predictor, slot.name)
        except PredictorError as exc:
            reloads.labels(slot.name, "refused").inc()
            raise CheckpointError(f"weights file {path} cannot be served here: {exc}") from None
        except CheckpointError:
            reloads.labels(slot.name, "refused").inc()
            raise
        if service.settings.warmup:
            warm_up(loaded, service.settings)
        previous = service.loaded(slot.name)
        service.swap(loaded)
        reloads.labels(slot.name, "swapped").inc()
    log.info(
        "reloaded weights from %s as %r: now serving sha256 %s... (trained at %s), before %s...",
        path,
        slot.name,
        loaded.sha256[:12],
        loaded.meta.get("created_at", "unknown"),
        previous.sha256[:12],
    )
    return previous, loaded


async def reload_every_model(service: ModelService) -> None:
    """SIGHUP: every served model reloads from its configured file; one refused keeps its old weights."""
    for name in service.model_names:
        log.info("SIGHUP: reloading %r from %s", name, service.slot(name).weights)
        try:
            await asyncio.to_thread(reload_model, service, None, name)  # logs the swap itself
        except CheckpointError as exc:
            sha = service.loaded(name).sha256[:12]
            log.error("SIGHUP: reload refused for %r: %s; still serving sha256 %s...", name, exc, sha)
        except ServiceError as exc:
            log.warning("SIGHUP: no reload: %s", exc.message)
            return
