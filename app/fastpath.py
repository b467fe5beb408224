"""POST /predict without FastAPI's per-request machinery: the implementation of /predict (`app.predict`).

On two cores the event loop's share of the CPU is what the model cannot have: routing, dependency
resolution, Starlette's form parser (a spooled temporary file per upload) and the response model's
validation cost about as much per request as decoding the image. This ASGI middleware sits
innermost, behind the metrics, API-key, body-limit and admission middleware, and answers a request
itself when its body is multipart/form-data of at most 1 MiB with a Content-Length, whose every
part is a file in the field `file`, and its query is one `PredictQuery` takes (`top_k`, `model`,
`explain`). It answers through `app.predict.answer`, as the route does, so the answer is the
route's, byte for byte apart from the timings. Anything else (another field, a part without a
filename, a query the route would refuse, a body that does not parse) is handed to the FastAPI
route untouched, body replayed, so its general parser and its 422 explanations answer it.
"""

from __future__ import annotations

import io

from python_multipart.multipart import parse_options_header
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.domain import Upload
from app.predict import PredictQuery, answer, read_query
from app.service import ModelService

# Bodies up to this size are read into memory here; a bigger one goes to the route, whose parser
# spools it to an anonymous temporary file past the same size (Starlette's default).
MAX_BYTES = 1024 * 1024


def split_multipart(body: bytes, boundary: bytes) -> list[tuple[str, bytes]] | None:
    """(filename, data) of every part, when every part is a file in the field `file`; else None.

    Strict on purpose: the standard layout (CRLF line ends, no preamble or epilogue beyond
    whitespace), since whatever it declines the route parses with the general parser.
    """
    delimiter = b"--" + boundary
    if not body.startswith(delimiter + b"\r\n"):
        return None
    closing = b"\r\n" + delimiter + b"--"
    end = body.find(closing)
    if end < 0 or body[end + len(closing) :].strip():  # also declines a second closing delimiter
        return None
    parts = []
    for chunk in body[len(delimiter) + 2 : end].split(b"\r\n" + delimiter + b"\r\n"):
        head, sep, data = chunk.partition(b"\r\n\r\n")
        if not sep:
            return None
        disposition = None
        for line in head.split(b"\r\n"):
            name, colon, value = line.partition(b":")
            if not colon:
                return None
            if name.strip().lower() == b"content-disposition":
                disposition = value.strip()
        if disposition is None:
            return None
        kind, options = parse_options_header(disposition)
        filename = options.get(b"filename")
        if kind != b"form-data" or options.get(b"name") != b"file" or not filename:
            return None
        try:
            parts.append((filename.decode("utf-8"), data))
        except UnicodeDecodeError:
            return None
    return parts


class PredictFastPath:
    def __init__(self, app: ASGIApp, path: str, service: ModelService) -> None:
        self.app = app
        self.path = path
        self.service = service

    def _plain(self, scope: Scope) -> tuple[bytes, PredictQuery] | None:
        """(boundary, query) when the headers and query allow the fast path, else None."""
        query = read_query(scope.get("query_string", b""))
        if query is None:  # the route's rules, and its explanation
            return None
        content_type = length = None
        for name, value in scope["headers"]:
            if name == b"content-type":
                if content_type is not None:
                    return None
                content_type = value
            elif name == b"content-length":
                length = value
        if content_type is None or length is None or not length.isdigit() or int(length) > MAX_BYTES:
            return None
        kind, options = parse_options_header(content_type)
        boundary = options.get(b"boundary")
        if kind != b"multipart/form-data" or not boundary:
            return None
        return boundary, query

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        plain = None
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == self.path:
            plain = self._plain(scope)
        if plain is None:
            await self.app(scope, receive, send)
            return
        boundary, query = plain

        chunks = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        parts = split_multipart(body, boundary)
        if not parts:
            await self.app(scope, _replay(body, receive), send)
            return

        uploads = [Upload(name, io.BytesIO(data), len(data)) for name, data in parts]
        arrival = scope.get("state", {}).get("arrival")  # set by AdmissionMiddleware
        response = await answer(self.service, uploads, query, arrival, scope["path"])
        await response(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands over the already read body first, then the connection's own events."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
