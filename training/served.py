"""End to end: the labels the running service gives the test images, against evaluation's own.

`python -m training.evaluate ... --check-service` posts every test image file, as it is on disk,
to `POST /predict` of a service on the same weights (one it starts on loopback, or a running one
given by `--service-url`), and counts the images whose served label differs from the label
evaluation computed from the decoded pixels. The requests go through the service's own client,
`app.client.Client`; a failure is its `ClientError`, one sentence.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx

from app import launch
from app.client import Client, ClientError
from app.model import CLASSES

FILES_PER_REQUEST = 16
TRIES = 5  # a request answered 503 (queue full, or still starting) is sent again, this often in all


class WaitWhenBusy(httpx.HTTPTransport):
    """Sends a request again after the Retry-After seconds of a 503 answer, up to TRIES in all."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.read()  # the body, kept to be sent again
        for _ in range(TRIES - 1):
            response = super().handle_request(request)
            if response.status_code != 503:
                return response
            response.close()
            time.sleep(float(response.headers.get("Retry-After") or 1))
        return super().handle_request(request)


def served_labels(
    url: str, files: Sequence[Path], model: str = "final", concurrency: int = 4, timeout: float = 60.0
) -> list[int]:
    """The label model `model` ("final", "lite", "best") of the service gives each file, in order
    (FILES_PER_REQUEST files a request, `concurrency` requests at a time); ClientError when the
    service cannot be reached or refuses."""
    chunks = [files[i : i + FILES_PER_REQUEST] for i in range(0, len(files), FILES_PER_REQUEST)]
    with Client(url, timeout=timeout, transport=WaitWhenBusy()) as client:

        def labels(chunk: Sequence[Path]) -> list[int]:
            predictions = client.predict(chunk, top_k=1, model=model)
            if len(predictions) != len(chunk):
                raise ClientError(f"{len(chunk)} files posted, {len(predictions)} predictions returned")
            return [CLASSES.index(p["label"]) for p in predictions]

        with ThreadPoolExecutor(concurrency) as pool:
            return [label for chunk_labels in pool.map(labels, chunks) for label in chunk_labels]


@contextmanager
def local_service(
    weights: str | Path,
    device: str = "cpu",
    timeout: float = 120.0,
    backend: str = "auto",
    precision: str = "auto",
    layout: str = "auto",
    model: str = "final",
) -> Iterator[str]:
    """`uvicorn app.main:app` on a free loopback port serving `weights` as model `model` ("final",
    "lite", "best") with the given backend, precision and layout (the service's settings), and no
    other optional model; yields its base URL. `app.launch.NotReady` when it does not start. For
    "lite" and "best" the default model is the service's own default, shipped FinalModel."""
    served = {"CIFAR10_WEIGHTS": str(weights), "CIFAR10_LITE_WEIGHTS": "", "CIFAR10_BEST_WEIGHTS": ""}
    if model != "final":
        del served["CIFAR10_WEIGHTS"]
        served[f"CIFAR10_{model.upper()}_WEIGHTS"] = str(weights)
    env = {
        **served,
        "CIFAR10_DEVICE": device,
        "CIFAR10_BACKEND": backend,
        "CIFAR10_PRECISION": precision,
        "CIFAR10_LAYOUT": layout,
        "CIFAR10_MAX_FILES": str(FILES_PER_REQUEST),
        "CIFAR10_LOG_LEVEL": "WARNING",
    }
    service = launch.running(
        env, ["--log-level", "warning", "--no-access-log"], capture=False, timeout=timeout
    )
    with service as server:
        yield server.url
