"""app/connections.py subclasses uvicorn's HttpToolsProtocol and reaches into its members; uvicorn
is capped at the versions tested (pyproject.toml), and this test says at once, in a new uvicorn,
which of those members is gone (before the behaviour tests in test_overload.py fail obscurely)."""

from __future__ import annotations

import asyncio

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from app.connections import GuardedHTTPProtocol

# What GuardedHTTPProtocol reads or calls on uvicorn's protocol (its own members aside).
ATTRIBUTES = ("connections", "cycle", "flow", "loop", "parser", "tasks", "timeout_keep_alive",
              "timeout_keep_alive_task", "transport")  # fmt: skip
METHODS = ("connection_made", "connection_lost", "data_received", "on_response_complete",
           "_start_asgi_task", "_unset_keepalive_if_required", "timeout_keep_alive_handler")  # fmt: skip


def test_the_uvicorn_members_the_guard_uses_still_exist():
    assert issubclass(GuardedHTTPProtocol, HttpToolsProtocol)
    missing = [name for name in METHODS if not callable(getattr(HttpToolsProtocol, name, None))]
    assert missing == [], f"uvicorn's HttpToolsProtocol no longer has {missing}"
    loop = asyncio.new_event_loop()
    try:
        config = Config(app=lambda scope, receive, send: None, http="httptools")
        config.load()
        protocol = HttpToolsProtocol(config, ServerState(), {}, loop)
        protocol.connection_made(_Transport())
        missing = [name for name in ATTRIBUTES if not hasattr(protocol, name)]
        assert missing == [], f"uvicorn's HttpToolsProtocol instances no longer have {missing}"
    finally:
        loop.close()


class _Transport(asyncio.Transport):
    """Enough of a socket for connection_made."""

    def get_extra_info(self, name, default=None):
        return {"peername": ("127.0.0.1", 1), "sockname": ("127.0.0.1", 2)}.get(name, default)

    def is_closing(self) -> bool:
        return False
