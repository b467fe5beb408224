"""The FastAPI service: `uvicorn app.main:app`, configured with CIFAR10_* environment variables.

    CIFAR10_WEIGHTS=weights/final_model.pt uvicorn app.main:app --host 0.0.0.0 --port 8000

`create_app(settings)` builds an app; tests call it with their own `Settings`. Nothing heavy
happens at import: the lifespan loads the checkpoint, moves the model to its device, warms it
up and only then lets requests in (GET /health/ready turns 200). A missing or damaged weights
file stops the server with one log line and a non-zero exit.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from pydantic import ValidationError

from app.errors import install_error_handlers
from app.metrics import Metrics, MetricsMiddleware
from app.middleware import AdmissionMiddleware, BodyLimitMiddleware, StartupMessageMiddleware
from app.routes import model_router, ops_router, predict_router
from app.service import ModelService, StartupError
from app.settings import Settings, env_name

log = logging.getLogger(__name__)

DESCRIPTION = """\
Classifies images into the ten CIFAR-10 classes with FinalModel, a 149,584-parameter CNN.

POST images to `/predict`; `/model/summary` describes the model, `/metrics` serves Prometheus
metrics, `/health/live` and `/health/ready` are the probes. Concurrent requests are batched
into shared forward passes. Every error answer is JSON with `detail` (a sentence) and `code`.
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


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings if settings is not None else settings_from_env()
    _configure_logging(settings.log_level)
    metrics = Metrics()
    service = ModelService(settings, metrics)
    startup_failure: list[str] = []

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        try:
            await asyncio.to_thread(service.start)  # off the loop: /health/live answers meanwhile
        except StartupError as exc:
            startup_failure.append(f"cannot start the service: {exc}")
            raise
        try:
            yield
        finally:
            service.begin_shutdown()
            await asyncio.to_thread(service.stop)

    app = FastAPIOffline(
        title="cifar10-cnn",
        version=_version(),
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.service = service
    app.state.metrics = metrics
    install_error_handlers(app)
    app.include_router(predict_router)
    app.include_router(model_router)
    app.include_router(ops_router)

    known_paths = {getattr(route, "path", "") for route in app.routes}
    # The last added is the outermost: startup message, metrics, body limit, admission, routes.
    app.add_middleware(AdmissionMiddleware, path="/predict", admit=service.admit, metrics=metrics)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, metrics=metrics)
    app.add_middleware(MetricsMiddleware, metrics=metrics, known_paths=known_paths)
    app.add_middleware(StartupMessageMiddleware, message=lambda: next(iter(startup_failure), None))
    return app


app = create_app()
