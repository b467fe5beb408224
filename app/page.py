"""The page for people at `/`: pick or drop images, see each one's top classes as bars.

One self-contained HTML file (no CDN, no build step) that posts to `POST /predict` on the same
origin. Its Content-Security-Policy lets it load nothing from anywhere else.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

PAGE = Path(__file__).parent / "static" / "index.html"
# Inline script and style are the page's own; images are the user's files (blob: URLs).
CSP = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self' 'unsafe-inline'; "
       "script-src 'self' 'unsafe-inline'; connect-src 'self'; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'none'")

router = APIRouter()


@router.get("/", include_in_schema=False)
def page() -> FileResponse:
    return FileResponse(PAGE, media_type="text/html; charset=utf-8",
                        headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache"})
