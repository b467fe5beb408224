"""The page at `/`, and /docs and /redoc served by the app itself: nothing loads from elsewhere."""

from __future__ import annotations

import re


def script_and_style_urls(html: str) -> list[str]:
    return re.findall(r"""(?:src|href)=["']([^"']+)["']""", html) + re.findall(
        r"""url:\s*['"]([^'"]+)['"]""", html
    )


def test_the_page_is_served_at_the_root_with_its_policy(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert "https://" not in r.text and "http://" not in r.text


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


def test_redoc_is_served_from_the_app_and_its_bundle_points_at_nothing_outside(client):
    r = client.get("/redoc")
    assert r.status_code == 200 and "redoc" in r.text.lower()
    assert "content-security-policy" in r.headers
    assert "http://" not in r.text and "https://" not in r.text  # no CDN, no web fonts
    urls = [u for u in script_and_style_urls(r.text) if u.endswith(".js")]
    assert urls
    for url in urls:
        assert url.startswith("/")
        assert client.get(url).status_code == 200
    bundle = client.get("/redoc-assets/redoc.standalone.js")
    assert bundle.status_code == 200 and len(bundle.content) > 100_000
    assert b"cdn.redoc.ly" not in bundle.content  # its "powered by" logo, made local


def test_the_favicon_every_browser_asks_for_is_served(client):
    r = client.get("/favicon.ico")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content.startswith(b"\x89PNG")
