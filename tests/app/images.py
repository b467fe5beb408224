"""Images the tests make with Pillow, and the bytes of files that only pretend to be images."""

from __future__ import annotations

import io
import random
import struct
import zlib

from PIL import Image


def blobs(seed: int, size: tuple[int, int] = (32, 32), mode: str = "RGB") -> Image.Image:
    """Smooth random colour patches (like a blurry photo): a 4x4 random image scaled up."""
    rng = random.Random(seed)
    low = Image.frombytes("RGB", (4, 4), rng.randbytes(48))
    img = low.resize(size, Image.Resampling.BILINEAR)
    return img if mode == "RGB" else img.convert(mode)


def encode(img: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **params)
    return buffer.getvalue()


def png_bytes(seed: int = 0, size: tuple[int, int] = (32, 32)) -> bytes:
    return encode(blobs(seed, size), "PNG")


def jpeg_bytes(seed: int = 0, size: tuple[int, int] = (32, 32), quality: int = 90) -> bytes:
    return encode(blobs(seed, size), "JPEG", quality=quality)


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height: decoding it would need the whole image."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))


PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
SVG = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="32" height="32"></svg>\n'
TEXT = b"just some notes, not a picture\n"
