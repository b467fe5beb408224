"""The page for people at `/` (pick or drop images, see each one's top classes as bars), and the
Content-Security-Policy that keeps it and the interactive docs from loading anything from elsewhere.

The page is one self-contained HTML file (no CDN, no build step) that posts to `POST /predict` on
the same origin. Swagger UI and ReDoc are served by the app itself (fastapi-offline's copies);
ReDoc's bundle points its "powered by" logo at a CDN, so `/redoc` loads a copy of the bundle with
that address turned into the local favicon.
"""

from __future__ import annotations

import functools
from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

PAGE = Path(__file__).parent / "static" / "index.html"
# Inline script and style are the page's own; images are the user's files (blob: URLs).
CSP = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self' 'unsafe-inline'; connect-src 'self'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)

# The docs need inline style and script, a blob: worker (ReDoc's search) and data: images.
DOCS_CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self' 'unsafe-inline'; worker-src 'self' blob:; font-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'"
)
DOCS_PATHS = frozenset({"/docs", "/redoc"})
OFFLINE_ASSETS = Path(fastapi_offline.__file__).parent / "static"  # served at /static-offline-docs
REDOC_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"

router = APIRouter()


@router.get("/", include_in_schema=False)
def page() -> FileResponse:
    return FileResponse(
        PAGE,
        media_type="text/html; charset=utf-8",
        headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache"},
    )


@router.get("/favicon.ico", include_in_schema=False)
def favicon() -> FileResponse:
    """The icon every browser asks for (the docs' own), so no page load logs a 404."""
    return FileResponse(
        OFFLINE_ASSETS / "favicon.png",
        media_type="image/png",
        headers={"Cache-Control": "public, max-age=86400"},
    )


class DocsPolicyMiddleware:
    """Adds DOCS_CSP to the answers of the docs pages; every other request passes untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in DOCS_PATHS:
            await self.app(scope, receive, send)
            return

        async def send_with_policy(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    h for h in message.get("headers", []) if h[0].lower() != b"content-security-policy"
                ]
                message = {**message, "headers": [*headers, (b"content-security-policy", DOCS_CSP.encode())]}
            await send(message)

        await self.app(scope, receive, send_with_policy)


@functools.cache
def _redoc_bundle() -> bytes:
    return (
        (OFFLINE_ASSETS / "redoc.standalone.js")
        .read_bytes()
        .replace(REDOC_LOGO.encode(), b"/static-offline-docs/favicon.png")
    )


# Swagger UI draws an array of `format: binary` strings (the /predict upload) as file inputs, but
# first looks up a component named JsonSchema_string_binary that it does not ship, which logs
# "Could not find component" in the console. This plugin provides it: a file input, what the
# array's items are drawn with anyway; and it labels the upload "array<file>", not "array<string>".
SWAGGER_PLUGIN = """
<script>
const UploadsAsFiles = (system) => ({
  components: {
    JsonSchema_string_binary: (props) => system.React.createElement("input", {
      type: "file",
      disabled: props.disabled,
      onChange: (event) => props.onChange(event.target.files[0], props.keyName),
    }),
  },
  afterLoad(system) {  // and call an upload a file: "array<file>", "Add file item"
    const label = system.fn.getSchemaObjectTypeLabel;
    system.fn.getSchemaObjectTypeLabel = (schema) => {
      const plain = schema && schema.toJS ? schema.toJS() : schema;
      const binary = (s) => s && s.type === "string" && s.format === "binary";
      if (binary(plain)) return "file";
      if (plain && plain.type === "array" && binary(plain.items)) return "array<file>";
      return label(schema);
    };
  },
});
</script>
"""


@router.get("/docs", include_in_schema=False)
def swagger(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    page = get_swagger_ui_html(
        openapi_url=f"{root}/openapi.json",
        title="cifar10-cnn - Swagger UI",
        swagger_js_url=f"{root}/static-offline-docs/swagger-ui-bundle.js",
        swagger_css_url=f"{root}/static-offline-docs/swagger-ui.css",
        swagger_favicon_url=f"{root}/static-offline-docs/favicon.png",
    )
    html = bytes(page.body).decode()
    html = html.replace(
        "<script>\n    const ui = SwaggerUIBundle(",
        SWAGGER_PLUGIN + "<script>\n    const ui = SwaggerUIBundle(",
        1,
    )
    html = html.replace("presets: [", "plugins: [UploadsAsFiles],\n    presets: [", 1)
    return HTMLResponse(html)


@router.get("/redoc", include_in_schema=False)
def redoc(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    return get_redoc_html(
        openapi_url=f"{root}/openapi.json",
        title="cifar10-cnn - ReDoc",
        redoc_js_url=f"{root}/redoc-assets/redoc.standalone.js",
        with_google_fonts=False,
        redoc_favicon_url=f"{root}/static-offline-docs/favicon.png",
    )


@router.get("/redoc-assets/redoc.standalone.js", include_in_schema=False)
def redoc_bundle() -> Response:
    return Response(
        _redoc_bundle(), media_type="text/javascript", headers={"Cache-Control": "public, max-age=86400"}
    )
