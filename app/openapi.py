"""The OpenAPI schema as the interactive docs need it.

FastAPI writes OpenAPI 3.1: a file upload is `{"type": "string", "contentMediaType":
"application/octet-stream"}`, which Swagger UI renders as a text box, and an optional query
parameter is `anyOf: [integer, null]`, shown as `integer | (integer | null)`. Here uploads also
carry `format: binary` (Swagger UI then offers a file chooser, several for an array) and
optional query parameters lose the `null` branch (leaving them out is how a client says "none").

The schema also describes this deployment, as schemathesis checks it (tests/app/test_fuzz_api.py):
the upload array holds at most CIFAR10_MAX_FILES files, `model` is one of the models served, and
/admin/reload is listed only when CIFAR10_ADMIN_TOKEN is set (without it, no request can succeed),
and a security scheme only when some listed operation requires it (so Swagger UI offers to
authorize only where a key or token is configured).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from app.admin import admin_router
from app.uploads import SCHEMA_NAME, PredictForm


def _is_upload(schema: Any) -> bool:
    return (
        isinstance(schema, dict)
        and schema.get("type") == "string"
        and schema.get("contentMediaType") == "application/octet-stream"
    )


def _mark_uploads(schema: Any, max_files: int) -> None:
    if isinstance(schema, dict):
        if _is_upload(schema):
            schema["format"] = "binary"
        if schema.get("type") == "array" and _is_upload(schema.get("items")):
            schema["maxItems"] = max_files
        for value in schema.values():
            _mark_uploads(value, max_files)
    elif isinstance(schema, list):
        for value in schema:
            _mark_uploads(value, max_files)


def _drop_null(parameter: dict[str, Any]) -> None:
    schema = parameter.get("schema", {})
    branches = schema.get("anyOf")
    if parameter.get("in") == "query" and branches and {"type": "null"} in branches:
        rest = [b for b in branches if b != {"type": "null"}]
        if len(rest) == 1:
            schema.pop("anyOf")
            schema.update(rest[0])


def _const_as_enum(parameter: dict[str, Any]) -> None:
    """A query parameter with one allowed value (`explain=cam`) as an enum: a menu in Swagger UI."""
    schema = parameter.get("schema", {})
    if parameter.get("in") == "query" and "const" in schema and "enum" not in schema:
        schema["enum"] = [schema["const"]]


def _served_models(parameter: dict[str, Any], names: list[str]) -> None:
    if parameter.get("in") == "query" and parameter.get("name") == "model":
        parameter["schema"]["enum"] = names
        parameter["schema"]["examples"] = names


def _drop_unused_security(schema: dict[str, Any]) -> None:
    """Keep the security schemes some listed operation requires: with no API key and no admin
    token configured there are none, and Swagger UI shows no Authorize button."""
    used = {
        name
        for operations in schema.get("paths", {}).values()
        for operation in operations.values()
        for requirement in operation.get("security", [])
        for name in requirement
    }
    components = schema.get("components", {})
    schemes = {k: v for k, v in components.get("securitySchemes", {}).items() if k in used}
    if schemes:
        components["securitySchemes"] = schemes
    else:
        components.pop("securitySchemes", None)


def _hoist_defs(schema: dict[str, Any]) -> None:
    """A body schema given whole (`/v2`'s infer request, from pydantic) carries its own `$defs`, which
    ReDoc cannot resolve ("Invalid reference token: $defs"): move them into components.schemas and
    point the references there."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            for name, definition in node.pop("$defs", {}).items():
                components.setdefault(name, walk(definition))
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                node["$ref"] = "#/components/schemas/" + ref.removeprefix("#/$defs/")
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
        return node

    walk(schema.get("paths", {}))


def install(app: FastAPI) -> None:
    """Wrap `app.openapi` so that the schema it caches is the one the docs can use and the one this
    app serves (read when first asked for, from `app.state.settings` and `app.state.service`)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            settings, service = app.state.settings, app.state.service
            schema = generate()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components[SCHEMA_NAME] = PredictForm.model_json_schema()  # the body app.uploads reads
            _mark_uploads(components, settings.max_files)
            if settings.admin_token is None:
                for route in admin_router.routes:
                    schema.get("paths", {}).pop(getattr(route, "path", ""), None)
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    for parameter in operation.get("parameters", []):
                        _drop_null(parameter)
                        _const_as_enum(parameter)
                        _served_models(parameter, service.model_names)
            _drop_unused_security(schema)
            _hoist_defs(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
