"""Bad uploads leave no memory behind: hundreds of them, bombs included, barely move the process's RSS.

The PNG and GIF bombs are real files: tens of kilobytes that decode to 16 to 25 megapixels.
The limit is refused from the header, so none of them is ever decoded; a leak or a decode would
show as tens of megabytes per request.
"""

from __future__ import annotations

import io
import resource
import sys
from pathlib import Path

from PIL import Image

from .images import TEXT, jpeg_bytes, png_header_only

MAX_PIXELS = 1_000_000
RSS_GROWTH_LIMIT_MB = 50  # generous: about 0.2 MB here; a leak of 256 KB a request would reach it


def rss_mb() -> float:
    """Resident memory now (Linux), or the peak where /proc is missing (macOS: bytes, not KB)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def bomb(mode: str, size: tuple[int, int], fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, fmt)
    return buffer.getvalue()


def bad_requests(max_files: int) -> list[tuple[list[tuple[str, tuple[str, bytes]]], int, str]]:
    """(multipart files, expected status, expected code) for each kind of bad request."""
    jpeg = jpeg_bytes(0, (64, 64))
    return [
        ([("file", ("bomb.png", bomb("RGB", (4000, 4000), "PNG")))], 413, "too_many_pixels"),
        ([("file", ("bomb.gif", bomb("P", (5000, 5000), "GIF")))], 413, "too_many_pixels"),
        ([("file", ("huge.png", png_header_only(100_000, 100_000)))], 413, "too_many_pixels"),
        ([("file", ("cut.jpg", jpeg[: len(jpeg) // 2]))], 400, "corrupt_image"),
        ([("file", ("empty.jpg", b""))], 400, "empty_file"),
        ([("file", ("notes.txt", TEXT * 100))], 415, "unsupported_media_type"),
        ([("file", (f"{i}.jpg", jpeg)) for i in range(max_files + 1)], 413, "too_many_files"),
        ([("image", ("a.jpg", jpeg))], 422, "invalid_request"),
    ]


def test_two_hundred_bad_uploads_do_not_grow_memory(serve):
    with serve(max_pixels=MAX_PIXELS, max_files=8) as client:
        requests = bad_requests(max_files=8)

        def send_all(rounds: int) -> None:
            for _ in range(rounds):
                for files, status, code in requests:
                    r = client.post("/predict", files=files)
                    assert (r.status_code, r.json()["code"]) == (status, code), r.text

        send_all(3)  # allocator pools, the multipart parser, the first decode of each format
        before = rss_mb()
        send_all(25)  # 200 requests
        growth = rss_mb() - before
        assert growth < RSS_GROWTH_LIMIT_MB, f"RSS grew {growth:.1f} MB over 200 bad requests"
        ok = client.post("/predict", files=[("file", ("ok.jpg", jpeg_bytes(1, (64, 64))))])
        assert ok.status_code == 200, ok.text  # and the service still works
