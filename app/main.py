"""The FastAPI service: `uvicorn app.main:app`, configured with CIFAR10_* environment variables.

    CIFAR10_WEIGHTS=weights/final_model.pt uvicorn app.main:app --host 0.0.0.0 --port 8000

`create_app(settings)` builds an app; tests call it with their own `Settings`. Nothing heavy
happens at import: the lifespan loads the checkpoint of every served model (`final`, FinalModel;
`lite`, LiteModel, and `best`, AirbenchNet, where their weights are configured), moves each to
the device, warms it up and only then lets requests in (GET /health/ready turns 200). A missing
or damaged weights file stops the server with one log line and a non-zero exit.

Signals, when the app runs in the main thread (under uvicorn):
- SIGHUP reloads every served model from its configured weights file (as POST /admin/reload does
  for one) and logs the outcome; a file refused keeps that model's old weights.
- SIGTERM drains first: readiness turns 503 ("draining") and new /predict requests get 503 with
  Retry-After while the requests already admitted finish, for up to CIFAR10_DRAIN_TIMEOUT_S;
  only then is uvicorn's own handler called, which closes the socket and stops the server.
  (Run uvicorn with --timeout-graceful-shutdown to bound its wait for connections after that.)
"""

from __future__ import annotations

import os

# oneDNN keeps compiled kernels per (layer, input shape) in a cache of 1,024 entries by default;
# a batcher that runs every batch size from 1 to max_batch_size made the server grow by about
# 850 MB in a 3-minute soak. 64 entries hold the hot shapes: RSS stays near 650-750 MB at the
# same throughput (measured). Set before torch is imported; a value in the environment wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")

import asyncio
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from types import FrameType
from typing import Any

from fastapi import APIRouter, Depends, FastAPI
from fastapi_offline import FastAPIOffline
from pydantic import ValidationError
from starlette.middleware.cors import CORSMiddleware
from starlette.types import Scope

from app import openapi
from app.admin import admin_router
from app.batching import Arrival
from app.domain import ServiceError, StartupError
from app.edge import api_error, install_service_errors
from app.errors import ErrorBody, install_error_handlers
from app.fastpath import PredictFastPath
from app.loading import PredictorFactory
from app.metrics import Metrics, MetricsMiddleware
from app.middleware import (
    AdmissionMiddleware,
    ApiKeyMiddleware,
    BodyLimitMiddleware,
    StartupMessageMiddleware,
)
from app.page import DocsPolicyMiddleware
from app.page import router as page_router
from app.reloading import reload_every_model
from app.routes import inference_router, model_router, ops_router, requested_model
from app.security import API_KEY_HEADER, require_api_key
from app.service import ModelService
from app.settings import Settings, env_name
from app.v2 import inference_router as v2_inference_router
from app.v2 import router as v2_router
from app.v2 import served_models

log = logging.getLogger(__name__)

DESCRIPTION = """\
Classifies images into the ten CIFAR-10 classes with FinalModel, a 149,584-parameter CNN, and,
where their weights are there, LiteModel (`?model=lite`, the smallest) and AirbenchNet
(`?model=best`, the most accurate).

POST images to `/predict`: each answer has calibrated probabilities and an `unsure` flag for
pictures unlike CIFAR-10, and `?explain=cam` adds a heatmap of where the evidence lies.
`/model/summary` describes a model, `/metrics` serves Prometheus metrics, `/health/live` and
`/health/ready` are the probes. Concurrent requests are batched into shared forward passes.
Every error answer is JSON with `detail` (a sentence) and `code`.

A page for people is at [`/`](/) (choose images, see their top classes); the Open Inference
Protocol (KServe v2 REST) is at `/v2`, for every model served, with `{"error": ...}` answers.
"""


def _version() -> str:
    try:
        return version("cifar10-cnn")
    except PackageNotFoundError:
        return "0+unknown"


def settings_from_env() -> Settings:
    """Settings from CIFAR10_* variables; a bad value stops the program with one clear sentence."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = str(error["loc"][0]) if error.get("loc") else ""
            where = f"{env_name(field)}: " if field else ""
            problems.append(f"{where}{error['msg']}")
        raise SystemExit(f"invalid configuration: {'; '.join(problems)}") from None


def _configure_logging(level: str) -> None:
    """Show the service's own INFO lines next to uvicorn's, unless logging is configured already."""
    logger = logging.getLogger("app")
    logger.setLevel(level)
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)


async def _drain_then_stop(service: ModelService, stop: Callable[[], Any]) -> None:
    started = time.monotonic()
    log.info(
        "SIGTERM: draining, readiness is now 503; waiting up to %.1f s for %d request(s) in flight",
        service.settings.drain_timeout_s,
        service.in_flight,
    )
    if await service.drain():
        log.info("drained in %.2f s; stopping", time.monotonic() - started)
    else:
        log.warning(
            "drain timeout (%s): %d request(s) still in flight; stopping anyway",
            env_name("drain_timeout_s"),
            service.in_flight,
        )
    stop()


def _install_signal_handlers(service: ModelService) -> Callable[[], None]:
    """SIGHUP -> reload, SIGTERM -> drain, then the server's own handler; returns the undo.

    Only in the main thread (where signals are delivered), and SIGTERM only when a server such
    as uvicorn has a handler of its own to hand over to.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task] = set()  # strong references until done

    def spawn(coroutine: Any) -> None:
        task = loop.create_task(coroutine)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    undo: list[Callable[[], object]] = []
    sighup = getattr(signal, "SIGHUP", None)
    if sighup is not None:
        loop.add_signal_handler(sighup, lambda: spawn(reload_every_model(service)))
        undo.append(lambda: loop.remove_signal_handler(sighup))

    server_handler = signal.getsignal(signal.SIGTERM)
    if callable(server_handler):
        draining = False

        def on_sigterm(signum: int, frame: FrameType | None) -> None:
            nonlocal draining
            if draining:  # a second SIGTERM: stop now
                loop.call_soon_threadsafe(server_handler, signum, frame)
                return
            draining = True

            def stop() -> None:
                server_handler(signum, frame)

            loop.call_soon_threadsafe(lambda: spawn(_drain_then_stop(service, stop)))

        signal.signal(signal.SIGTERM, on_sigterm)

        def restore() -> None:
            if signal.getsignal(signal.SIGTERM) is on_sigterm:
                signal.signal(signal.SIGTERM, server_handler)

        undo.append(restore)

    def uninstall() -> None:
        for step in undo:
            step()

    return uninstall


def _lifespan(service: ModelService, startup_failure: list[str]) -> Callable[[FastAPI], Any]:
    """Load and warm up every model before requests are let in; drain and stop on the way out.
    A startup failure is stored, one sentence, for StartupMessageMiddleware to hand the server."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        try:
            await asyncio.to_thread(service.start)  # off the loop: /health/live answers meanwhile
        except StartupError as exc:
            startup_failure.append(f"cannot start the service: {exc}")
            raise
        uninstall_signal_handlers = _install_signal_handlers(service)
        try:
            yield
        finally:
            uninstall_signal_handlers()
            await service.drain()  # at once under uvicorn, which has waited for connections already
            service.begin_shutdown()
            await asyncio.to_thread(service.stop)

    return lifespan


def _include_routers(app: FastAPI, settings: Settings, service: ModelService) -> list[APIRouter]:
    """Every endpoint; returns the inference routers, whose routes take the API key when one is set."""
    app.state.v2_models = served_models(service)  # the Open Inference Protocol's model names
    inference_routers = [inference_router, v2_inference_router(app.state.v2_models)]
    for router in inference_routers:
        if settings.api_key is not None:
            unauthorized = {
                "model": ErrorBody,
                "description": f"The API key is missing or wrong (header {API_KEY_HEADER} or Bearer).",
            }
            app.include_router(router, dependencies=[Depends(require_api_key)], responses={401: unauthorized})
        else:
            app.include_router(router)
    app.include_router(v2_router)  # /v2 metadata and health, open like /health
    app.include_router(model_router)
    app.include_router(ops_router)
    app.include_router(admin_router)
    app.include_router(page_router)  # the page for people at /
    return inference_routers


def _add_middleware(
    app: FastAPI,
    settings: Settings,
    service: ModelService,
    inference_paths: frozenset[str],
    startup_failure: list[str],
) -> None:
    """The last added is the outermost: startup message, CORS, metrics, API key, body limit, admission,
    the /predict fast path, then the routes."""
    metrics = service.metrics
    # The documented paths and the docs' own: FastAPI nests included routers rather than copying
    # their routes into app.routes, so the schema is where every path is listed.
    known_paths = set(app.openapi()["paths"]) | {getattr(route, "path", "") for route in app.routes}

    def admit(scope: Scope) -> Arrival:
        try:
            return service.admit(requested_model(scope))
        except ServiceError as exc:
            raise api_error(exc, settings.retry_after_s) from None

    if settings.fast_path:
        app.add_middleware(PredictFastPath, path="/predict", service=service)
    app.add_middleware(
        AdmissionMiddleware, paths=inference_paths, admit=admit, done=service.request_done, metrics=metrics
    )
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, metrics=metrics)
    if settings.api_key is not None:
        app.add_middleware(ApiKeyMiddleware, paths=inference_paths, key=settings.api_key, metrics=metrics)
    app.add_middleware(MetricsMiddleware, metrics=metrics, known_paths=known_paths)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", API_KEY_HEADER],
            expose_headers=["Retry-After"],
            max_age=600,
        )
    app.add_middleware(StartupMessageMiddleware, message=lambda: next(iter(startup_failure), None))


def create_app(settings: Settings | None = None, make_predictor: PredictorFactory | None = None) -> FastAPI:
    """The app for `settings` (default: from the environment); `make_predictor` replaces the
    configured backend (tests hand in a fake one)."""
    settings = settings if settings is not None else settings_from_env()
    _configure_logging(settings.log_level)
    metrics = Metrics()
    service = ModelService(settings, metrics, make_predictor)
    startup_failure: list[str] = []
    app = FastAPIOffline(
        docs_url=None,  # app.page serves /docs (with an upload fix) and /redoc (no CDN address)
        redoc_url=None,
        title="cifar10-cnn",
        version=_version(),
        description=DESCRIPTION,
        lifespan=_lifespan(service, startup_failure),
    )
    openapi.install(app)  # uploads as file choosers in Swagger UI
    app.state.settings = settings
    app.state.service = service
    app.state.metrics = metrics
    install_error_handlers(app)
    install_service_errors(app)
    inference_routers = _include_routers(app, settings, service)
    app.add_middleware(DocsPolicyMiddleware)  # /docs and /redoc load nothing from elsewhere
    # Every inference route gets the API key, admission (readiness, queue, drain) and metrics.
    inference_paths = frozenset(
        getattr(route, "path", "") for router in inference_routers for route in router.routes
    )
    _add_middleware(app, settings, service, inference_paths, startup_failure)
    return app


app = create_app()
