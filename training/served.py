"""End to end: the labels the running service gives the test images, against evaluation's own.

`python -m training.evaluate ... --check-service` posts every test image file, as it is on disk,
to `POST /predict` of a service on the same weights (one it starts on loopback, or a running one
given by `--service-url`), and counts the images whose served label differs from the label
evaluation computed from the decoded pixels. Only the standard library speaks HTTP here, so the
check needs nothing beyond the training extra.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from app import launch
from app.model import CLASSES

FILES_PER_REQUEST = 16


class ServiceError(Exception):
    """The service could not be started or did not answer as documented."""


def _multipart(files: Sequence[Path]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for path in files:
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{path.name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        )
        parts += [head.encode(), path.read_bytes(), b"\r\n"]
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def _post(url: str, files: Sequence[Path], timeout: float, model: str) -> list[int]:
    body, content_type = _multipart(files)
    request = urllib.request.Request(
        f"{url}/predict?top_k=1&model={model}", data=body, headers={"Content-Type": content_type}
    )
    for attempt in range(5):
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                predictions = json.loads(response.read())["predictions"]
            break
        except urllib.error.HTTPError as exc:
            if exc.code != 503 or attempt == 4:  # 503: queue full or still starting, so wait
                raise ServiceError(f"POST {url}/predict answered {exc.code}: {exc.read()[:300]!r}") from None
            time.sleep(float(exc.headers.get("Retry-After") or 1))
        except (urllib.error.URLError, OSError) as exc:
            raise ServiceError(f"POST {url}/predict failed: {getattr(exc, 'reason', exc)}") from None
    if len(predictions) != len(files):
        raise ServiceError(f"{len(files)} files posted, {len(predictions)} predictions returned")
    return [CLASSES.index(p["label"]) for p in predictions]


def served_labels(
    url: str, files: Sequence[Path], model: str = "final", concurrency: int = 4, timeout: float = 60.0
) -> list[int]:
    """The label model `model` ("final", "lite", "best") of the service gives each file, in order
    (FILES_PER_REQUEST files a request)."""
    chunks = [files[i : i + FILES_PER_REQUEST] for i in range(0, len(files), FILES_PER_REQUEST)]
    with ThreadPoolExecutor(concurrency) as pool:
        batches = pool.map(lambda chunk: _post(url, chunk, timeout, model), chunks)
        return [label for labels in batches for label in labels]


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
    other optional model; yields its base URL. For "lite" and "best" the default model is the
    service's own default, shipped FinalModel."""
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
    try:
        service = launch.running(
            env, ["--log-level", "warning", "--no-access-log"], capture=False, timeout=timeout
        )
        with service as server:
            yield server.url
    except launch.NotReady as exc:
        raise ServiceError(str(exc)) from None
