"""ASGI middleware that refuses work before it costs anything, and reports startup failures plainly."""

from __future__ import annotations

import logging
from collections.abc import Callable

from pydantic import SecretStr
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.batching import Arrival
from app.errors import ApiError, refuse
from app.metrics import Metrics
from app.security import api_key_error

log = logging.getLogger(__name__)


class _BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """413 for a body over `max_bytes`: at once from Content-Length, else as soon as the count passes it.

    A body sent without Content-Length (chunked) is counted as it arrives; the moment it passes
    the limit, reading stops and whatever the app was about to answer is replaced by the 413.
    The connection is closed afterwards, since the rest of the body is never read.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, metrics: Metrics) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.metrics = metrics
        self.told_operator = False

    async def _refuse(self, received: str, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.told_operator:  # the setting is the operator's business, not the client's
            self.told_operator = True
            log.warning(
                "a request body of %s went over the limit of %s bytes (CIFAR10_MAX_BODY_BYTES); "
                'later ones are counted in cifar10_rejected_total{reason="body_too_large"}',
                received,
                f"{self.max_bytes:,}",
            )
        error = ApiError(
            413,
            "body_too_large",
            f"the request body is {received}, over this service's limit of {self.max_bytes:,} bytes "
            "a request: send fewer or smaller files in each",
            headers={"Connection": "close"},
        )
        await refuse(error, self.metrics, scope["path"])(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._refuse(f"{int(length):,} bytes", scope, receive, send)
            return

        received = 0
        too_large = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    too_large = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if too_large:  # the app answered the aborted read (often a 400): answer 413 instead
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await self._refuse(f"over {self.max_bytes:,} bytes", scope, receive, send)
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            if not started:
                await self._refuse(f"over {self.max_bytes:,} bytes", scope, receive, send)


class ApiKeyMiddleware:
    """401 for a POST to one of `paths` without the right API key, before its body is read or it is
    admitted."""

    def __init__(self, app: ASGIApp, paths: frozenset[str], key: SecretStr, metrics: Metrics) -> None:
        self.app = app
        self.paths = paths
        self.key = key
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in self.paths:
            error = api_key_error(Headers(scope=scope), self.key)
            if error is not None:
                await refuse(error, self.metrics, scope["path"])(scope, receive, send)
                return
        await self.app(scope, receive, send)


class AdmissionMiddleware:
    """Admits a POST to one of `paths` before its body is read: 503 while not ready or the queue is full.

    `admit(scope)` raises ApiError or returns the request's `Arrival` (the scope says which model's
    queue the request is for), which tells the batcher that
    a request is on its way; it is kept in the request's state (`request.state.arrival`) for
    the route, and settled here at the latest, when the answer has been sent. `done()` is
    called then too, for every admitted request: the service counts requests in flight.
    """

    def __init__(
        self,
        app: ASGIApp,
        paths: frozenset[str],
        admit: Callable[[Scope], Arrival],
        done: Callable[[], None],
        metrics: Metrics,
    ) -> None:
        self.app = app
        self.paths = paths
        self.admit = admit
        self.done = done
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        try:
            arrival = self.admit(scope)
        except ApiError as error:
            await refuse(error, self.metrics, scope["path"])(scope, receive, send)
            return
        scope.setdefault("state", {})["arrival"] = arrival
        try:
            await self.app(scope, receive, send)
        finally:
            arrival.settle()
            self.done()


class StartupMessageMiddleware:
    """Hands the server one sentence, not a traceback, when the lifespan startup fails.

    uvicorn logs the message of `lifespan.startup.failed` and exits non-zero; `message()`
    returns the sentence the lifespan stored, or None to pass the original through.
    """

    def __init__(self, app: ASGIApp, message: Callable[[], str | None]) -> None:
        self.app = app
        self.message = message

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_plain(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed" and self.message():
                message = {**message, "message": self.message()}
            await send(message)

        await self.app(scope, receive, send_plain)
