"""The OpenAPI schema as the interactive docs need it.

FastAPI writes OpenAPI 3.1: a file upload is `{"type": "string", "contentMediaType":
"application/octet-stream"}`, which Swagger UI renders as a text box, and an optional query
parameter is `anyOf: [integer, null]`, shown as `integer | (integer | null)`. Here uploads also
carry `format: binary` (Swagger UI then offers a file chooser, several for an array) and
optional query parameters lose the `null` branch (leaving them out is how a client says "none").
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI


def _mark_uploads(schema: Any) -> None:
    if isinstance(schema, dict):
        if schema.get("type") == "string" and schema.get("contentMediaType") == "application/octet-stream":
            schema["format"] = "binary"
        for value in schema.values():
            _mark_uploads(value)
    elif isinstance(schema, list):
        for value in schema:
            _mark_uploads(value)


def _drop_null(parameter: dict[str, Any]) -> None:
    schema = parameter.get("schema", {})
    branches = schema.get("anyOf")
    if parameter.get("in") == "query" and branches and {"type": "null"} in branches:
        rest = [b for b in branches if b != {"type": "null"}]
        if len(rest) == 1:
            schema.pop("anyOf")
            schema.update(rest[0])


def install(app: FastAPI) -> None:
    """Wrap `app.openapi` so that the schema it caches is the one the docs can use."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            _mark_uploads(schema.get("components", {}).get("schemas", {}))
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    for parameter in operation.get("parameters", []):
                        _drop_null(parameter)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
