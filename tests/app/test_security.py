"""Security basics: the optional API key of /predict, CORS off by default, uploads kept off named files."""

from __future__ import annotations

import io
import os
import random
import tempfile

import pytest
from PIL import Image

from .helpers import metric
from .images import png_bytes

KEY = "k3y-for-predict"


def one_image(name: str = "a.png") -> list:
    return [("file", (name, png_bytes(1)))]


def test_predict_is_open_and_documented_as_open_by_default(client):
    assert client.post("/predict", files=one_image()).status_code == 200
    operation = client.get("/openapi.json").json()["paths"]["/predict"]["post"]
    assert "401" not in operation["responses"] and "security" not in operation


@pytest.fixture(scope="module")
def keyed(serve):
    with serve(api_key=KEY) as client:
        yield client


@pytest.mark.parametrize(
    "headers",
    [{}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}],
    ids=["missing", "wrong-header", "wrong-bearer", "not-bearer"],
)
def test_a_missing_or_wrong_api_key_gets_401(keyed, headers):
    r = keyed.post("/predict", files=one_image(), headers=headers)
    assert r.status_code == 401
    assert r.json()["code"] == "unauthorized" and "X-API-Key" in r.json()["detail"]
    assert r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("headers", [{"X-API-Key": KEY}, {"Authorization": f"Bearer {KEY}"}])
def test_the_right_api_key_in_either_header_is_served(keyed, headers):
    assert keyed.post("/predict", files=one_image(), headers=headers).status_code == 200


def test_the_api_key_is_checked_before_the_body_is_read(keyed):
    """A body over the size limit still gets 401, not 413: the key is checked first, nothing is read."""
    r = keyed.post("/predict", content=b"x" * 100, headers={"Content-Length": str(10**9)})
    assert r.status_code == 401
    assert metric(keyed.get("/metrics").text, 'cifar10_rejected_requests_total{reason="unauthorized"}') >= 1


def test_the_api_key_guards_only_predict(keyed):
    assert keyed.get("/model/summary").status_code == 200
    assert keyed.get("/health/ready").status_code == 200


def test_openapi_documents_the_api_key(keyed):
    schema = keyed.get("/openapi.json").json()
    operation = schema["paths"]["/predict"]["post"]
    assert "401" in operation["responses"]
    schemes = schema["components"]["securitySchemes"]
    assert {"in": "header", "name": "X-API-Key", "type": "apiKey"}.items() <= schemes["APIKeyHeader"].items()
    assert schemes["HTTPBearer"]["scheme"] == "bearer"
    assert {name for requirement in operation["security"] for name in requirement} == set(schemes)


def preflight(client, origin: str):
    return client.options(
        "/predict",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "x-api-key",
        },
    )


def test_cors_is_off_by_default(client):
    assert "access-control-allow-origin" not in preflight(client, "https://example.org").headers
    r = client.get("/health/live", headers={"Origin": "https://example.org"})
    assert "access-control-allow-origin" not in r.headers


def test_cors_allows_the_configured_origins_only(serve):
    with serve(cors_origins=["https://app.example.org"]) as client:
        r = preflight(client, "https://app.example.org")
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "https://app.example.org"
        assert "x-api-key" in r.headers["access-control-allow-headers"].lower()
        assert preflight(client, "https://evil.example.com").status_code == 400
        r = client.get("/health/live", headers={"Origin": "https://app.example.org"})
        assert r.headers["access-control-allow-origin"] == "https://app.example.org"


def test_uploads_are_never_written_under_the_client_name(client, monkeypatch, tmp_path):
    """Starlette spools an upload in memory up to 1 MB, then to an anonymous temporary file: one with
    no name in any folder (O_TMPFILE, or unlinked at once). The client's filename is only a string."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where a rolled-over spool file would go
    noise = Image.frombytes("RGB", (700, 700), random.Random(0).randbytes(700 * 700 * 3))
    buffer = io.BytesIO()
    noise.save(buffer, "PNG")
    assert buffer.tell() > 1024 * 1024  # over starlette's in-memory spool size
    service = client.app.state.service
    seen = []
    original = service.classify

    async def spying_classify(uploads, *args, **kwargs):
        for upload in uploads:
            seen.append(
                (upload.filename, upload.file, getattr(upload.file, "_rolled", None), os.listdir(tmp_path))
            )
        return await original(uploads, *args, **kwargs)

    monkeypatch.setattr(service, "classify", spying_classify)
    hostile = "../../../../tmp/pwned.png"
    r = client.post("/predict", files=[("file", (hostile, buffer.getvalue(), "image/png"))])
    assert r.status_code == 200
    assert r.json()["predictions"][0]["filename"] == hostile  # echoed back, never used as a path
    [(filename, file, rolled, listing)] = seen
    assert filename == hostile
    assert rolled is True  # it went to a file...
    assert listing == []  # ...that has no name in the temporary folder
    assert not isinstance(file.name, str) or "pwned" not in file.name
    assert not os.path.exists("/tmp/pwned.png")
