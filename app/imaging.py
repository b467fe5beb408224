"""Uploads -> model input, safely: the checks an untrusted file must pass before it is decoded.

The pixels themselves come from `app.preprocess.prepare_image`, the rule evaluation uses, so a
served image and an evaluated one are identical tensors. What this module adds:

- a format allow-list (JPEG, PNG, WebP, BMP, GIF, TIFF, and AVIF where Pillow has it); only the
  first frame of an animation or multi-page file is used;
- a pixel limit decided from the header alone, after JPEG's reduced-scale decoding is set up
  (a 48-megapixel photo decodes at 1/8 scale, so it costs about 0.75 megapixels), so a
  decompression bomb is refused before any pixel is decoded;
- one `UploadError` per bad file, with the HTTP status and a sentence that says what is wrong.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from typing import BinaryIO

import torch
from PIL import Image, UnidentifiedImageError

from app.model import IMAGE_SIZE
from app.preprocess import prepare_image

# Pillow format ids and the names people know them by. MPO (the multi-picture JPEG that some
# cameras write) is a plugin of its own in older Pillow versions; AVIF needs a Pillow built with it.
ALLOWED_FORMATS = {
    "JPEG": "JPEG",
    "MPO": "",
    "PNG": "PNG",
    "WEBP": "WebP",
    "BMP": "BMP",
    "GIF": "GIF",
    "TIFF": "TIFF",
    "AVIF": "AVIF",
}

# Leading bytes of the allowed formats: a file that starts like one but does not open is damaged
# (400), not of the wrong kind (415).
_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
)


@dataclass
class UploadError(Exception):
    """One upload that cannot be used; `message` completes "file N (name): ..."."""

    status: int  # 400 damaged, 413 too large, 415 not a supported image
    code: str
    message: str

    def __str__(self) -> str:
        return self.message


@functools.cache
def _pillow_formats() -> tuple[str, ...]:
    """ALLOWED_FORMATS that this Pillow build can open (WebP needs libwebp, for one)."""
    Image.init()
    return tuple(f for f in ALLOWED_FORMATS if f in Image.OPEN)


@functools.cache
def supported_formats() -> str:
    """'JPEG, PNG, ... or TIFF': the formats this service accepts, for messages and docs."""
    names = [ALLOWED_FORMATS[f] for f in _pillow_formats() if ALLOWED_FORMATS[f]]
    return f"{', '.join(names[:-1])} or {names[-1]}"


def _signature(head: bytes) -> str | None:
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    for magic, name in _SIGNATURES:
        if head.startswith(magic):
            return name
    return None


def _what_else(head: bytes) -> str:
    """A sentence fragment naming what a non-image upload looks like."""
    stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    lowered = stripped[:1024].lower()
    if stripped.startswith(b"%PDF"):
        return "is a PDF document, not an image"
    if b"<svg" in lowered:
        return f"is an SVG (vector) image; send a raster image ({supported_formats()})"
    if head[4:8] == b"ftyp" and head[8:12] in (b"heic", b"heix", b"hevc", b"mif1", b"msf1", b"avif"):
        return f"is a HEIF image, which this service does not decode; convert it to {supported_formats()}"
    if head.startswith(b"PK\x03\x04"):
        return "is a ZIP archive, not an image"
    try:
        text = head[:1024].decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\t\r\n" for c in text.rstrip("\x00")):
        return "is text, not an image"
    return f"is not an image in a supported format ({supported_formats()})"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:160] if text else type(exc).__name__


def _damaged(what: str, exc: BaseException | None = None) -> UploadError:
    reason = f" ({_first_line(exc)})" if exc is not None else ""
    return UploadError(400, "corrupt_image", f"{what}{reason}")


def decode_upload(data: bytes, max_pixels: int) -> torch.Tensor:
    """The bytes of one uploaded file -> uint8 (3, 32, 32); raises `UploadError`."""
    if not data:
        raise UploadError(400, "empty_file", "the file is empty")
    kind = _signature(data[:16])
    try:
        img = Image.open(io.BytesIO(data), formats=_pillow_formats())  # reads the header only
    except Image.DecompressionBombError:  # Pillow's own hard stop, past 2 * Image.MAX_IMAGE_PIXELS
        raise UploadError(
            413,
            "too_many_pixels",
            f"the image header declares over {2 * (Image.MAX_IMAGE_PIXELS or 0):,} pixels; "
            f"the limit is {max_pixels:,}",
        ) from None
    except UnidentifiedImageError:
        if kind:
            raise _damaged(f"the file starts like a {kind} image but is damaged") from None
        raise UploadError(415, "unsupported_media_type", f"the file {_what_else(data[:2048])}") from None
    except Exception as exc:  # Pillow raises SyntaxError, OSError, ValueError... for broken headers
        raise _damaged("the image header is damaged", exc) from None
    with img:
        width, height = img.size
        try:
            # The call prepare_image makes (a second one is a no-op): a large JPEG is decoded at
            # 1/2, 1/4 or 1/8 scale, and img.size becomes the size that will really be decoded.
            img.draft("RGB", (IMAGE_SIZE, IMAGE_SIZE))
        except Exception as exc:
            raise _damaged("the image cannot be decoded", exc) from None
        decoded = img.size[0] * img.size[1]
        if decoded > max_pixels:
            scaled = f", {img.size[0]}x{img.size[1]} at reduced scale" if img.size != (width, height) else ""
            raise UploadError(
                413,
                "too_many_pixels",
                f"the image is {width}x{height} pixels{scaled} ({decoded:,} to decode); "
                f"the limit is {max_pixels:,}",
            )
        try:
            return prepare_image(img)
        except Exception as exc:  # truncated data, bad EXIF, a mode Pillow cannot convert...
            raise _damaged(f"the {img.format} image is truncated or damaged", exc) from None


def read_upload(file: BinaryIO, max_pixels: int) -> torch.Tensor:
    """`decode_upload` for an open file (an UploadFile's spooled file), read from its start."""
    file.seek(0)
    return decode_upload(file.read(), max_pixels)
