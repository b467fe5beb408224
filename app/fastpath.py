"""POST /predict without FastAPI's per-request machinery: the door to `app.predict.respond` that most
requests take.

On two cores the event loop's share of the CPU is what the model cannot have: routing, dependency
resolution and the response model's validation cost a sizeable share of a small request
(docs/benchmarks.md). This ASGI middleware sits innermost, behind the metrics, API-key, body-limit
and admission middleware, and answers every POST /predict whose query `PredictQuery` takes,
through `respond`, as the route does: the same body parser, the same answer, the same refusals
(rendered by the app's own error handlers). A query the route would refuse is handed to the route
before the body is read, so FastAPI's 422 explains it.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import handled
from app.predict import read_query, respond
from app.service import ModelService


class PredictFastPath:
    def __init__(self, app: ASGIApp, path: str, service: ModelService) -> None:
        self.app = app
        self.path = path
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        query = None
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == self.path:
            query = read_query(scope.get("query_string", b""))
        if query is None:
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        try:
            response = await respond(self.service, request, query)
        except Exception as exc:
            refusal = await handled(request, exc)
            if refusal is None:
                raise  # the server's 500, as for the route
            response = refusal
        await response(scope, receive, send)
