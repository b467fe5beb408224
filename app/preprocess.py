"""The one image rule, shared by training, evaluation and serving, so all of them see the same pixels.

An image becomes model input in two steps:

1. `to_model_image`: apply the EXIF orientation, convert any mode to RGB (transparent pixels
   over white), center-crop to a square, and resize to 32x32 with Pillow's bicubic filter
   (antialiased when shrinking). A 32x32 RGB image - every CIFAR-10 picture - passes unchanged.
2. `normalize`: a uint8 (N, 3, 32, 32) batch -> float, scaled to 0..1, minus MEAN, over STD.
"""

from __future__ import annotations

from typing import cast

import torch
from PIL import Image, ImageOps

from app.model import IMAGE_SIZE, MEAN, STD


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") and img.mode != "I;16":
        img = img.convert("I")  # I;16B (TIFF), I;16L...: point() and getextrema() refuse them
    if img.mode in ("I;16", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of letting convert() clip at 255. Some
        # Pillow versions open 16-bit PNGs as mode "I", so the scale follows the values' range.
        low, high = cast(tuple[int, int], img.getextrema())  # one band: (min, max)
        scale = 256 if img.mode != "I" or (low >= 0 and high <= 65535) else 16_777_216
        img = img.point(lambda v: v / scale).convert("L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def to_model_image(img: Image.Image) -> Image.Image:
    """Any Pillow image -> a 32x32 RGB image, by the rule in this module's docstring."""
    img = ImageOps.exif_transpose(img) or img
    img = _to_rgb(img)
    w, h = img.size
    if (w, h) != (IMAGE_SIZE, IMAGE_SIZE):
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.resize(
            (IMAGE_SIZE, IMAGE_SIZE),
            Image.Resampling.BICUBIC,
            box=(left, top, left + side, top + side),
            reducing_gap=3.0 if side > 3 * IMAGE_SIZE else None,
        )
    return img


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """A 32x32 RGB Pillow image -> uint8 tensor (3, 32, 32)."""
    if img.mode != "RGB" or img.size != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"expected a {IMAGE_SIZE}x{IMAGE_SIZE} RGB image, got {img.mode} {img.size}")
    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return data.view(IMAGE_SIZE, IMAGE_SIZE, 3).permute(2, 0, 1).contiguous()


def prepare_image(img: Image.Image) -> torch.Tensor:
    """An opened, not yet decoded Pillow image -> uint8 (3, 32, 32), by the whole rule."""
    img.draft("RGB", (IMAGE_SIZE, IMAGE_SIZE))  # JPEG: decode at reduced scale when large
    return image_to_tensor(to_model_image(img))


def load_image(path_or_file) -> torch.Tensor:
    """Open an image file and apply the whole rule -> uint8 (3, 32, 32)."""
    with Image.open(path_or_file) as img:
        return prepare_image(img)


_MEAN = torch.tensor(MEAN).view(1, 3, 1, 1) * 255
_STD = torch.tensor(STD).view(1, 3, 1, 1) * 255


def normalize(batch: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (N, 3, 32, 32) -> normalised float (N, 3, 32, 32) on the batch's device."""
    mean = _MEAN.to(batch.device, dtype)
    std = _STD.to(batch.device, dtype)
    return (batch.to(dtype) - mean) / std
