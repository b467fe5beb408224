"""The OpenAPI schema as the interactive docs need it: the upload, top_k and every error."""

from __future__ import annotations

import json
import re


def test_uploads_are_binary_files_and_top_k_is_a_plain_integer(client):
    schema = client.get("/openapi.json").json()
    predict = schema["paths"]["/predict"]["post"]
    body = predict["requestBody"]["content"]["multipart/form-data"]["schema"]
    if "$ref" in body:
        body = schema["components"]["schemas"][body["$ref"].rsplit("/", 1)[-1]]
    field = body["properties"]["file"]
    assert field["type"] == "array" and "file" in body["required"]
    assert field["items"]["format"] == "binary"  # Swagger UI offers a file chooser for each item
    [top_k] = [p for p in predict["parameters"] if p["name"] == "top_k"]
    assert top_k["in"] == "query"
    assert top_k["schema"]["type"] == "integer" and "anyOf" not in top_k["schema"]
    assert (top_k["schema"]["minimum"], top_k["schema"]["maximum"]) == (1, 10)


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


def test_every_reference_in_the_schema_resolves_in_its_components(client):
    """A body schema given whole keeps no `$defs` of its own (ReDoc cannot resolve those)."""
    schema = client.get("/openapi.json").json()
    text = json.dumps(schema)
    assert "$defs" not in text
    names = set(schema["components"]["schemas"])
    refs = set(re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', text))
    assert refs and refs <= names
    infer = schema["paths"]["/v2/models/final/infer"]["post"]["requestBody"]["content"]["application/json"]
    assert "InferInput" in json.dumps(infer) and "InferInput" in names
