"""Credentials: the optional API key of /predict and the admin token of /admin/reload.

Both are secrets from the settings (`CIFAR10_API_KEY`, `CIFAR10_ADMIN_TOKEN`), compared in
constant time. The API key is checked twice on purpose: `ApiKeyMiddleware` refuses a request
before its body is read or it is admitted to the queue, and `require_api_key` (a dependency of
the route) puts the scheme in the OpenAPI schema and guards the route should the middleware's
path match ever miss.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr
from starlette.datastructures import Headers

from app.errors import ApiError

API_KEY_HEADER = "X-API-Key"

_api_key_scheme = APIKeyHeader(
    name=API_KEY_HEADER, auto_error=False, description="The key set by CIFAR10_API_KEY."
)
_bearer_scheme = HTTPBearer(
    auto_error=False,
    description="The key set by CIFAR10_API_KEY; for /admin/reload, the token set by CIFAR10_ADMIN_TOKEN.",
)


def _same(given: str | None, expected: SecretStr) -> bool:
    if not given:
        return False
    return hmac.compare_digest(given.encode("utf-8"), expected.get_secret_value().encode("utf-8"))


def bearer_token(headers: Headers) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, if there is one."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


def api_key_error(headers: Headers, expected: SecretStr | None) -> ApiError | None:
    """None when the request may use /predict: no key is configured, or it brings the right one."""
    if expected is None:
        return None
    given = headers.get(API_KEY_HEADER) or bearer_token(headers)
    if _same(given, expected):
        return None
    what = "a wrong API key" if given else "no API key"
    return ApiError(
        401,
        "unauthorized",
        f"the request has {what}; send it in the {API_KEY_HEADER} header or as 'Authorization: Bearer <key>'",
        headers={"WWW-Authenticate": "Bearer"},
    )


async def require_api_key(
    request: Request,
    # The two schemes are parameters only so that the OpenAPI schema names them; the check
    # itself reads the headers, as the middleware does.
    _key: Annotated[str | None, Depends(_api_key_scheme)],
    _bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer_scheme)],
) -> None:
    error = api_key_error(request.headers, request.app.state.settings.api_key)
    if error is not None:
        raise error


async def require_admin(
    request: Request,
    _bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer_scheme)],
) -> None:
    """403 while no admin token is configured, 401 for a missing or wrong one."""
    expected: SecretStr | None = request.app.state.settings.admin_token
    if expected is None:
        raise ApiError(
            403,
            "admin_disabled",
            "the admin endpoints are disabled; set CIFAR10_ADMIN_TOKEN to enable them",
        )
    given = bearer_token(request.headers)
    if not _same(given, expected):
        what = "a wrong admin token" if given else "no admin token"
        raise ApiError(
            401,
            "unauthorized",
            f"the request has {what}; send 'Authorization: Bearer <CIFAR10_ADMIN_TOKEN>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
