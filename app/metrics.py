"""Prometheus metrics, each app with a registry of its own (tests build many apps in one process)."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    gc_collector,
    generate_latest,
    platform_collector,
    process_collector,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.model import CLASSES

PREFIX = "cifar10"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
RELOAD_OUTCOMES = ("swapped", "refused")
SLOW_PHASES = ("headers", "body")
UNMATCHED_ROUTE = "unmatched"  # 404s, so that made-up paths cannot blow up the label set


class Metrics:
    """Every series the service exports, in a registry of its own, named by what counts them."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        process_collector.ProcessCollector(registry=registry)
        platform_collector.PlatformCollector(registry=registry)
        gc_collector.GCCollector(registry=registry)
        self._add_http(registry)
        self._add_inference(registry)
        self._add_models(registry)
        self._add_connections(registry)
        self._label_counters: dict[str, list[Any]] = {}

    def _add_http(self, registry: CollectorRegistry) -> None:
        """Per request, by route: counted by MetricsMiddleware and the refusals (app.errors.refuse)."""
        self.requests = Counter(
            f"{PREFIX}_http_requests",
            "HTTP requests answered, by route template, method and status code.",
            ["route", "method", "status"],
            registry=registry,
        )
        self.request_seconds = Histogram(
            f"{PREFIX}_http_request_duration_seconds",
            "End-to-end time from receiving a request to sending the last byte of its answer.",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.rejected = Counter(
            f"{PREFIX}_rejected_requests",
            "Requests refused, by reason (the error code of the answer).",
            ["reason"],
            registry=registry,
        )

    def _add_inference(self, registry: CollectorRegistry) -> None:
        """Decoding, queueing and batches: counted by the service and its batchers."""
        self.decode_seconds = Histogram(
            f"{PREFIX}_decode_duration_seconds",
            "Time to check and decode one request's uploads into model input.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_wait_seconds = Histogram(
            f"{PREFIX}_queue_wait_seconds",
            "Time an image waits on the queue before its batch starts.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.inference_seconds = Histogram(
            f"{PREFIX}_inference_duration_seconds",
            "Model time per batch: stacking, normalising, the forward pass, softmax.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            f"{PREFIX}_batch_size",
            "Images per forward pass.",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.images = Counter(f"{PREFIX}_images_processed", "Images classified.", registry=registry)
        self.predictions = Counter(
            f"{PREFIX}_predictions",
            "Images classified, by model and predicted label.",
            ["model", "label"],
            registry=registry,
        )
        self.unsure = Counter(
            f"{PREFIX}_unsure_predictions",
            "Images the model flagged unsure (out of distribution), by model.",
            ["model"],
            registry=registry,
        )
        self.queue_images = Gauge(
            f"{PREFIX}_queue_images",
            "Images admitted and not yet in a batch (being decoded or queued).",
            registry=registry,
        )
        self.in_flight = Gauge(
            f"{PREFIX}_requests_in_flight",
            "Inference requests admitted and not yet answered (what a SIGTERM drain waits for).",
            registry=registry,
        )
        self.ready = Gauge(f"{PREFIX}_ready", "1 once the model is loaded and warmed up.", registry=registry)

    def _add_models(self, registry: CollectorRegistry) -> None:
        """The models being served, and their reloads."""
        self.model_info = Info(
            f"{PREFIX}_model",
            "The models being served, by the name clients use.",
            ["model"],
            registry=registry,
        )
        self.model_parameters = Gauge(
            f"{PREFIX}_model_parameters",
            "Parameters of each model being served.",
            ["model"],
            registry=registry,
        )
        self.model_test_accuracy = Gauge(
            f"{PREFIX}_model_test_accuracy",
            "Test accuracy recorded in each served checkpoint (fraction; NaN when it has none).",
            ["model"],
            registry=registry,
        )
        self.reloads = Counter(
            f"{PREFIX}_model_reloads",
            "Weight reloads (POST /admin/reload or SIGHUP), by model and outcome: swapped or refused.",
            ["model", "outcome"],
            registry=registry,
        )

    def _add_connections(self, registry: CollectorRegistry) -> None:
        """Counted by app.connections.GuardedHTTPProtocol, before the ASGI app."""
        self.slow_clients = Counter(
            f"{PREFIX}_slow_clients",
            "Connections cut off because a request's headers or body did not arrive in time, by phase.",
            ["phase"],
            registry=registry,
        )
        for phase in SLOW_PHASES:
            self.slow_clients.labels(phase)
        self.connections_refused = Counter(
            f"{PREFIX}_connections_refused",
            "Connections refused at once because the process had max_connections open.",
            registry=registry,
        )
        self.admission_waiting = Gauge(
            f"{PREFIX}_admission_waiting",
            "POST requests waiting for a place among max_active_requests "
            "(answered 503 after admission_wait_s).",
            registry=registry,
        )

    def observe_batch(self, size: int, run_s: float, waits: list[float]) -> None:
        """Called by the batcher's workers after each batch."""
        self.batch_size.observe(size)
        self.inference_seconds.observe(run_s)
        self.images.inc(size)
        for wait in waits:
            self.queue_wait_seconds.observe(wait)

    def count_answers(self, answers: list[Any], model: str) -> None:
        """Count each answer (`app.domain.ImageAnswer`) by its label, and the unsure ones."""
        counters = self._label_counters.get(model)
        if counters is None:
            counters = self._label_counters[model] = [self.predictions.labels(model, c) for c in CLASSES]
        for a in answers:
            counters[max(range(len(a.probabilities)), key=a.probabilities.__getitem__)].inc()
        flagged = sum(1 for a in answers if a.unsure)
        if flagged:
            self.unsure.labels(model).inc(flagged)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """Counts every HTTP request by its route template and status, and times it end to end."""

    def __init__(self, app: ASGIApp, metrics: Metrics, known_paths: set[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.known_paths = known_paths  # to label requests refused before routing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = getattr(scope.get("route"), "path", None)
            if route is None:
                route = scope["path"] if scope["path"] in self.known_paths else UNMATCHED_ROUTE
            method = scope["method"]
            self.metrics.requests.labels(route, method, str(status)).inc()
            self.metrics.request_seconds.labels(route, method).observe(time.perf_counter() - started)
