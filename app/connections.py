"""uvicorn's HTTP protocol with limits on connections, slow clients and requests let into the app.

    uvicorn app.main:app --http app.connections:GuardedHTTPProtocol   # `cifar10-cnn serve` does this

Under overload the event loop, not the model, is what runs out on a small machine: measured with
`bench/overload.py` (1,024 connections that resend at once when refused), every request went
through the whole ASGI stack to be admitted or refused, the loop fell seconds behind, and
admitted requests were answered after their clients had given up. So the limits are enforced
here, per connection, before the ASGI app is called:

- **Admission gate.** At most `max_active_requests` POST requests run in the app at once (GET,
  health and metrics pass freely; /admin is not gated). A POST beyond that waits in a FIFO
  waiting room, its body left in the socket, for at most `admission_wait_s`; when a running one
  finishes the oldest waiting one starts, and one that is still waiting at its deadline gets a
  `503 queue_full` with Retry-After, written straight to the socket (no ASGI stack).
  Clients that resend at once can therefore cost at most one cheap refusal per connection per
  `admission_wait_s`, and admitted work keeps the loop.
- **Slow clients.** A request's headers must arrive within `header_timeout_s` of its first byte
  (or of the connection opening), its body within `body_timeout_s` of its headers; otherwise the
  connection gets `408` and is closed (a connection that sent nothing is just closed). Counted in
  `cifar10_slow_clients_total{phase}`.
- **Connection cap.** Past `max_connections` open connections in this process a new one gets a
  `503` and is closed before anything is read; counted in `cifar10_connections_refused_total`.

Each of these answers is `app.errors.refuse`'s (counted there, the envelope by path), turned into
bytes for the socket.

The limits come from the app's settings (`app.state.settings`, CIFAR10_* variables) and the
counts go to its metrics (`app.state.metrics`); an app without them gets the settings' defaults.
"""

from __future__ import annotations

import asyncio
from collections import deque
from http import HTTPStatus
from typing import Any

from starlette.responses import Response
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from app.errors import ApiError, refuse
from app.settings import Settings


def _find_state(app: Any) -> Any:
    """The `state` of the FastAPI app inside uvicorn's wrappers (ProxyHeadersMiddleware, ...)."""
    for _ in range(16):
        state = getattr(app, "state", None)
        if state is not None and hasattr(state, "settings"):
            return state
        app = getattr(app, "app", None)
        if app is None:
            break
    return None


def _wire(response: Response, close: bool) -> bytes:
    """An answer as HTTP/1.1 bytes, to write straight to the socket (no ASGI stack)."""
    status = response.status_code
    head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"]
    head += [f"{name.decode('latin-1')}: {value.decode('latin-1')}" for name, value in response.raw_headers]
    if close:
        head.append("connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + response.body


class Guard:
    """What the connections of one server share: the limits, the counters and the admission gate."""

    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop) -> None:
        state = _find_state(config.loaded_app)
        settings: Settings = state.settings if state is not None else Settings()
        self.metrics = getattr(state, "metrics", None)
        self.loop = loop
        self.header_timeout_s = settings.header_timeout_s
        self.body_timeout_s = settings.body_timeout_s
        self.max_connections = settings.max_connections
        self.max_active = settings.max_active_requests
        self.wait_s = settings.admission_wait_s
        self.retry_after_s = settings.retry_after_s
        retry = {"Retry-After": str(settings.retry_after_s)}
        self.full = ApiError(
            503,
            "queue_full",
            "the service is at capacity; retry after the Retry-After header's seconds",
            headers=retry,
        )
        self.too_many = ApiError(
            503, "too_many_connections", "too many open connections; retry shortly", headers=retry
        )
        self.timeout = ApiError(408, "request_timeout", "the request did not arrive in time")
        self.active = 0
        self.waiting: deque[tuple[float, GuardedHTTPProtocol, RequestResponseCycle, Any]] = deque()
        self._expiry: asyncio.TimerHandle | None = None
        if self.metrics is not None:  # read at scrape time: a gauge's set() takes a lock per call
            self.metrics.admission_waiting.set_function(lambda: len(self.waiting))

    # -- refusals and counters -------------------------------------------------------------

    def refusal(self, error: ApiError, path: str, close: bool, counter: Any = None) -> bytes:
        """`app.errors.refuse`'s answer (counted there), as the bytes to write to the socket."""
        return _wire(refuse(error, self.metrics, path, counter), close)

    def refuse_connection(self) -> bytes:
        """Counted in cifar10_connections_refused_total, not among the refused requests."""
        counter = self.metrics.connections_refused if self.metrics is not None else None
        return self.refusal(self.too_many, "", close=True, counter=counter)

    def count_slow(self, phase: str) -> None:
        if self.metrics is not None:
            self.metrics.slow_clients.labels(phase).inc()

    def refuse_slow(self, phase: str) -> bytes:
        """408, counted in cifar10_slow_clients_total{phase}, not among the refused requests."""
        counter = self.metrics.slow_clients.labels(phase) if self.metrics is not None else None
        return self.refusal(self.timeout, "", close=True, counter=counter)

    # -- the admission gate ----------------------------------------------------------------

    def enter(self, protocol: GuardedHTTPProtocol, cycle: RequestResponseCycle, app: Any) -> None:
        if self.active < self.max_active and not self.waiting:
            self._start(protocol, cycle, app)
            return
        self.waiting.append((self.loop.time() + self.wait_s, protocol, cycle, app))
        if self._expiry is None:
            self._expiry = self.loop.call_at(self.waiting[0][0], self._expire)

    def _start(self, protocol: GuardedHTTPProtocol, cycle: RequestResponseCycle, app: Any) -> None:
        self.active += 1
        task = protocol.start_task(cycle, app)
        task.add_done_callback(self._leave)

    def _leave(self, _task: asyncio.Task) -> None:
        self.active -= 1
        while self.waiting and self.active < self.max_active:
            _, protocol, cycle, app = self.waiting.popleft()
            if not protocol.transport.is_closing():
                self._start(protocol, cycle, app)

    def _expire(self) -> None:
        self._expiry = None
        now = self.loop.time()
        while self.waiting and self.waiting[0][0] <= now:
            _, protocol, cycle, _app = self.waiting.popleft()
            if not protocol.transport.is_closing():
                answer = self.refusal(self.full, cycle.scope["path"], close=not cycle.keep_alive)
                protocol.refuse(cycle, answer)
        if self.waiting:
            self._expiry = self.loop.call_at(self.waiting[0][0], self._expire)


class GuardedHTTPProtocol(HttpToolsProtocol):
    """HttpToolsProtocol with the server's `Guard`: connection cap, header and body deadlines, gate."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        guard = getattr(config, "_cifar10_guard", None)
        if guard is None:
            guard = Guard(config, self.loop)
            config._cifar10_guard = guard  # type: ignore[attr-defined]
        self.guard: Guard = guard
        self._deadline: asyncio.TimerHandle | None = None
        self._phase: str | None = None  # "headers" or "body" while a deadline runs
        self._heard = False  # bytes of the current request have arrived

    # -- connection cap --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.guard.max_connections:
            self.transport = transport
            transport.write(self.guard.refuse_connection())
            transport.close()
            return
        super().connection_made(transport)
        self._arm("headers", self.guard.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self.parser is None or self.flow is None:  # refused in connection_made
            return
        super().connection_lost(exc)

    # -- deadlines -------------------------------------------------------------------------

    def _arm(self, phase: str, seconds: float) -> None:
        self._disarm()
        self._phase = phase
        self._deadline = self.loop.call_later(seconds, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = None
        self._phase = None

    def _awaiting_headers(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def data_received(self, data: bytes) -> None:
        if self._awaiting_headers() and self._phase != "headers":
            self._arm("headers", self.guard.header_timeout_s)  # counted from the request's first byte
        self._heard = True
        super().data_received(data)
        if self.transport.is_closing() or self._awaiting_headers():
            return
        if self.cycle.more_body:  # headers are in, the body is not (yet)
            if self._phase != "body":
                self._arm("body", self.guard.body_timeout_s)
        else:
            self._disarm()
            self._heard = False

    def on_response_complete(self) -> None:
        self._disarm()  # answered: what arrives next belongs to the next request
        self._heard = False
        super().on_response_complete()

    def _too_slow(self) -> None:
        phase, self._deadline, self._phase = self._phase, None, None
        if self.transport.is_closing() or phase is None:
            return
        cycle = self.cycle
        answering = False  # the app's answer has begun: it is cut off, not replaced
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app's receive() returns http.disconnect; its answer goes nowhere
            cycle.message_event.set()
            answering = cycle.response_started
        if not answering and (phase == "body" or self._heard):
            self.transport.write(self.guard.refuse_slow(phase))
        else:  # closed without an answer: one had begun, or the connection sent nothing
            self.guard.count_slow(phase)
        self.transport.close()

    # -- the admission gate ----------------------------------------------------------------

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        scope = cycle.scope
        if scope["method"] == "POST" and not scope["path"].startswith("/admin"):
            self.guard.enter(self, cycle, app)
        else:
            super()._start_asgi_task(cycle, app)

    def start_task(self, cycle: RequestResponseCycle, app: Any) -> asyncio.Task:
        """Start the app for `cycle` now (the gate calls this) and return its task."""
        task = self.loop.create_task(cycle.run_asgi(app))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)
        return task

    def refuse(self, cycle: RequestResponseCycle, answer: bytes) -> None:
        """Answer a waiting request with the prepared `answer` instead of running the app."""
        cycle.response_started = cycle.response_complete = True
        cycle.message_event.set()
        self.transport.write(answer)
        if not cycle.keep_alive:
            self.transport.close()
        self.on_response_complete()
        if not self.transport.is_closing():
            # A client that resends before Retry-After has passed is not read until it has: its next
            # request waits in the socket at no cost instead of being parsed and refused again.
            self._unset_keepalive_if_required()  # rearmed when reading resumes
            self.transport.pause_reading()
            self.loop.call_later(self.guard.retry_after_s, self._resume_after_refusal)

    def _resume_after_refusal(self) -> None:
        if self.transport.is_closing():
            return
        if not self.flow.read_paused:
            self.transport.resume_reading()
        if self._awaiting_headers() and self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )
