"""The schema as the interactive docs need it, and ReDoc's bundle with no CDN address left."""

from __future__ import annotations


def test_uploads_are_binary_and_top_k_is_a_plain_integer(client):
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    name = body["$ref"].rsplit("/", 1)[-1]
    items = schema["components"]["schemas"][name]["properties"]["file"]["items"]
    assert items["format"] == "binary"  # Swagger UI offers a file chooser for each item
    [top_k] = [p for p in schema["paths"]["/predict"]["post"]["parameters"] if p["name"] == "top_k"]
    assert top_k["schema"]["type"] == "integer" and "anyOf" not in top_k["schema"]
    assert (top_k["schema"]["minimum"], top_k["schema"]["maximum"]) == (1, 10)


def test_redocs_bundle_points_at_nothing_outside_the_service(client):
    page = client.get("/redoc")
    assert page.status_code == 200 and "content-security-policy" in page.headers
    bundle = client.get("/redoc-assets/redoc.standalone.js")
    assert bundle.status_code == 200 and len(bundle.content) > 100_000
    assert b"cdn.redoc.ly" not in bundle.content


def test_the_page_is_served_at_the_root_with_its_policy(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert "https://" not in r.text and "http://" not in r.text
