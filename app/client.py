"""A small Python client for the service's `POST /predict`, and what `cifar10-cnn predict` uses.

    from app.client import Client

    with Client("http://127.0.0.1:8000") as client:
        for p in client.predict(["samples/cat.jpg", "samples/ship.jpg"], top_k=2):
            print(p["filename"], p["label"], round(p["confidence"], 3))

Every failure is a `ClientError` whose message is one sentence: a missing or unreadable file, a
service that cannot be reached, or the service's own error answer (its `detail`, and its `code`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
CHUNK = 16  # files per request: under the service's default CIFAR10_MAX_FILES (32)


class ClientError(Exception):
    """The request could not be made or was refused; the message says why in one sentence."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class FileError(ClientError):
    """A local image file that cannot be read; nothing was sent."""


def _read(image: str | os.PathLike) -> tuple[str, bytes]:
    path = Path(image)
    try:
        return path.name, path.read_bytes()
    except FileNotFoundError:
        raise FileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise FileError(f"{path}: is a folder, not an image file") from None
    except OSError as exc:
        raise FileError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class Client:
    """`Client(url, api_key=...)`; `predict(paths)` returns the service's predictions in order."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        headers = {"X-API-Key": api_key} if api_key else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ClientError(
                f"cannot reach the service at {self.url} ({type(exc).__name__}: {exc})"
            ) from None
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.is_success and isinstance(body, dict):
            return body
        if isinstance(body, dict) and "detail" in body:
            detail = body["detail"] if isinstance(body["detail"], str) else str(body["detail"])
            code = body.get("code")
            raise ClientError(
                f"the service answered {response.status_code}: {detail}", response.status_code, code
            )
        raise ClientError(
            f"the service at {self.url} answered {response.status_code} "
            f"{response.reason_phrase} to {method} {path}",
            response.status_code,
        )

    def predict(
        self, images: Sequence[str | os.PathLike], top_k: int = 3, model: str | None = None
    ) -> list[dict[str, Any]]:
        """One prediction per image file ({filename, label, index, confidence, top_k}), in order,
        from `model` ("final", "lite", "best"; default: the service's default).

        Files go `CHUNK` to a request; every file is read before the first request is sent.
        """
        if not images:
            raise ClientError("no image files given")
        files = [_read(image) for image in images]
        predictions: list[dict[str, Any]] = []
        for chunk in _chunks(files, CHUNK):
            body = self._request(
                "POST",
                "/predict",
                params={"top_k": top_k} if model is None else {"top_k": top_k, "model": model},
                files=[("file", (name, data)) for name, data in chunk],
            )
            predictions += body["predictions"]
        return predictions

    def summary(self, model: str | None = None) -> dict[str, Any]:
        return self._request("GET", "/model/summary", params={} if model is None else {"model": model})

    def ready(self) -> bool:
        try:
            return self._http.get("/health/ready").status_code == 200
        except httpx.TransportError:
            return False
