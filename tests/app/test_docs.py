"""/docs and /redoc work offline, and the OpenAPI schema documents the upload and every error."""

from __future__ import annotations

import re


def script_and_style_urls(html: str) -> list[str]:
    return re.findall(r"""(?:src|href)=["']([^"']+)["']""", html) + re.findall(
        r"""url:\s*['"]([^'"]+)['"]""", html
    )


def test_swagger_ui_is_served_from_the_app(client):
    r = client.get("/docs")
    assert r.status_code == 200 and "swagger" in r.text.lower()
    assert "http://" not in r.text and "https://" not in r.text  # nothing from a CDN
    urls = [u for u in script_and_style_urls(r.text) if u.endswith((".js", ".css"))]
    assert urls, r.text
    for url in urls:
        assert url.startswith("/"), f"{url} would be fetched from outside the service"
        asset = client.get(url)
        assert asset.status_code == 200 and len(asset.content) > 10_000, url


def test_redoc_is_served_from_the_app(client):
    r = client.get("/redoc")
    assert r.status_code == 200 and "redoc" in r.text.lower()
    assert "http://" not in r.text and "https://" not in r.text  # no CDN, no web fonts
    urls = [u for u in script_and_style_urls(r.text) if u.endswith(".js")]
    assert urls
    for url in urls:
        assert url.startswith("/")
        assert client.get(url).status_code == 200


def test_openapi_documents_the_multipart_upload(client):
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    if "$ref" in body:
        body = schema["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]
    field = body["properties"]["file"]
    assert field["type"] == "array"
    item = field["items"]
    assert item.get("format") == "binary" or item.get("contentMediaType") == "application/octet-stream"
    assert "file" in body["required"]
    params = {p["name"]: p for p in schema["paths"]["/predict"]["post"]["parameters"]}
    assert params["top_k"]["in"] == "query"


def test_openapi_documents_every_error_response(client):
    schema = client.get("/openapi.json").json()
    responses = schema["paths"]["/predict"]["post"]["responses"]
    for status in ("400", "413", "415", "422", "503"):
        ref = responses[status]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/ErrorBody"), status
        assert responses[status]["description"]
    assert "Retry-After" in responses["503"]["headers"]
    assert set(schema["components"]["schemas"]["ErrorBody"]["properties"]) >= {"detail", "code", "files"}
    for path in ("/model/summary", "/metrics", "/health/live", "/health/ready"):
        assert path in schema["paths"]


def test_the_favicon_every_browser_asks_for_is_served(client):
    r = client.get("/favicon.ico")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content.startswith(b"\x89PNG")
