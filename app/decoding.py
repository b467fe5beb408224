"""The decode policy: a request's uploads -> one uint8 tensor, on the event loop or in the decode threads.

A few kilobytes decode in well under a millisecond, less than the hop to a thread and back costs,
so a small request is decoded right on the event loop (`INLINE_DECODE_BYTES`), with a pixel cap
(`INLINE_DECODE_PIXELS`) that keeps a small file that unpacks big (a bomb) off it: such a file,
and every bigger request, is decoded in the decode threads with the configured limit. Every bad
file of a request is named in one `BadUploads`.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from app.domain import BadUploads, Upload, UploadProblem
from app.imaging import UploadError, read_upload
from app.metrics import Metrics

# Requests up to this size are decoded on the event loop instead of in the decode threads.
INLINE_DECODE_BYTES = 64 * 1024
INLINE_DECODE_PIXELS = 256 * 256


def decode_all(uploads: list[Upload], max_pixels: int) -> torch.Tensor:
    """All of a request's uploads -> uint8 (k, 3, 32, 32); every bad file named in one BadUploads."""
    tensors, problems = [], []
    for index, upload in enumerate(uploads):
        try:
            tensors.append(read_upload(upload.file, max_pixels))
        except UploadError as exc:
            problems.append(UploadProblem(index=index, filename=upload.filename, error=exc))
    if problems:
        first = problems[0]
        name = f" ({first.filename!r})" if first.filename else ""
        more = ""
        if len(problems) > 1:
            more = f"; {len(problems) - 1} more of the {len(uploads)} files are bad too (see 'files')"
        elif len(uploads) > 1:
            more = f"; no predictions were made for the other {len(uploads) - 1} file(s)"
        raise BadUploads(f"the file at index {first.index}{name}: {first.error.message}{more}", problems)
    return torch.stack(tensors)


def decode_inline(uploads: list[Upload], max_pixels: int) -> torch.Tensor | None:
    """Decode a small request right here, or return None to send it to the decode threads."""
    sizes = [u.size for u in uploads]
    if None in sizes or sum(size or 0 for size in sizes) > INLINE_DECODE_BYTES:
        return None
    try:
        return decode_all(uploads, min(INLINE_DECODE_PIXELS, max_pixels))
    except BadUploads as exc:
        if any(problem.error.code == "too_many_pixels" for problem in exc.problems):
            return None  # the threads decide it, with the real limit
        raise


class Decoder:
    """The decode threads and the policy above; every decode is timed in the decode histogram."""

    def __init__(self, threads: int, max_pixels: int, metrics: Metrics) -> None:
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="decode")
        self.max_pixels = max_pixels
        self.metrics = metrics

    async def decode(self, uploads: list[Upload]) -> tuple[torch.Tensor, float]:
        """uint8 (k, 3, 32, 32) and the seconds it took. Raises BadUploads."""
        started = time.perf_counter()
        try:
            images = decode_inline(uploads, self.max_pixels)
            if images is None:
                loop = asyncio.get_running_loop()
                images = await loop.run_in_executor(self.pool, decode_all, uploads, self.max_pixels)
        finally:
            decode_s = time.perf_counter() - started
            self.metrics.decode_seconds.observe(decode_s)  # refused uploads too: checking them is work
        return images, decode_s

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
