"""Upload decoding: the evaluation pixels for good files, a precise UploadError for bad ones."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from app.imaging import UploadError, decode_upload, supported_formats
from app.preprocess import load_image

from .images import PDF, SVG, TEXT, blobs, encode, jpeg_bytes, png_header_only

LIMIT = 40_000_000


@pytest.mark.parametrize(
    "data",
    [
        encode(blobs(0, (32, 32)), "PNG"),
        encode(blobs(1, (64, 48)), "JPEG"),
        encode(blobs(2, (31, 77)), "WEBP", lossless=True),
        encode(blobs(3, (50, 50)).convert("P"), "GIF"),
        encode(blobs(4, (40, 30)), "TIFF"),
        encode(blobs(5, (40, 30)), "BMP"),
        encode(blobs(6, (2000, 1500)), "JPEG"),
    ],
    ids=["png", "jpeg", "webp", "gif", "tiff", "bmp", "large-jpeg"],
)
def test_uploads_decode_to_the_pixels_evaluation_sees(data):
    served = decode_upload(data, LIMIT)
    assert served.dtype == torch.uint8 and served.shape == (3, 32, 32)
    assert torch.equal(served, load_image(io.BytesIO(data)))


def test_a_32x32_rgb_image_passes_unchanged():
    img = blobs(7, (32, 32))
    pixels = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(32, 32, 3).permute(2, 0, 1)
    assert torch.equal(decode_upload(encode(img, "PNG"), LIMIT), pixels)


def test_the_crop_is_centred_and_square():
    """A 96x32 image whose middle third is red: after the centre crop only red is left."""
    img = Image.new("RGB", (96, 32), (0, 0, 255))
    img.paste((255, 0, 0), (32, 0, 64, 32))
    out = decode_upload(encode(img, "PNG"), LIMIT)
    assert out[0].min() == 255 and out[2].max() == 0


def test_gif_first_frame():
    red, blue = Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 255))
    out = decode_upload(encode(red, "GIF", save_all=True, append_images=[blue]), LIMIT)
    assert out[0].float().mean() > 200 and out[2].float().mean() < 50


def test_cmyk_jpeg_becomes_rgb():
    out = decode_upload(encode(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), "JPEG"), LIMIT)
    assert out[0].float().mean() > 200 and out[1].float().mean() < 60  # cyan-free, magenta+yellow: red


def test_pixel_limit_counts_the_pixels_jpeg_really_decodes():
    """A JPEG is decoded at reduced scale (draft mode) within the limit; the same picture as PNG,
    which has no reduced decoding, is refused."""
    picture = blobs(0, (4000, 3000))
    big = encode(picture, "JPEG", quality=50)  # 12 MP, decoded at 1/8 scale: 500x375
    assert decode_upload(big, 200_000).shape == (3, 32, 32)
    with pytest.raises(UploadError) as info:
        decode_upload(big, 100_000)
    assert info.value.status == 413 and "4000x3000" in info.value.message and "500x375" in info.value.message
    with pytest.raises(UploadError) as info:
        decode_upload(encode(picture, "PNG", compress_level=1), 200_000)
    assert info.value.status == 413 and "4000x3000" in info.value.message


def test_pixel_limit_is_applied_before_decoding():
    with pytest.raises(UploadError) as info:
        decode_upload(png_header_only(5000, 5000), 1_000_000)  # the data for those pixels is not there
    assert (info.value.status, info.value.code) == (413, "too_many_pixels")


@pytest.mark.parametrize(
    "data, status, code, words",
    [
        (b"", 400, "empty_file", "empty"),
        (jpeg_bytes(0, (64, 64))[:200], 400, "corrupt_image", "damaged"),
        (b"GIF89a" + b"\x00" * 5, 400, "corrupt_image", "GIF"),
        (TEXT, 415, "unsupported_media_type", "text"),
        (PDF, 415, "unsupported_media_type", "PDF"),
        (SVG, 415, "unsupported_media_type", "SVG"),
        (b"PK\x03\x04" + b"\x00" * 60, 415, "unsupported_media_type", "ZIP"),
        (encode(Image.new("RGB", (16, 16)), "ICO"), 415, "unsupported_media_type", "supported format"),
    ],
    ids=["empty", "truncated-jpeg", "damaged-gif", "text", "pdf", "svg", "zip", "ico"],
)
def test_bad_uploads_raise_one_precise_error(data, status, code, words):
    with pytest.raises(UploadError) as info:
        decode_upload(data, LIMIT)
    assert (info.value.status, info.value.code) == (status, code)
    assert words.lower() in info.value.message.lower()


def test_supported_formats_are_named_for_people():
    names = supported_formats()
    for name in ("JPEG", "PNG", "WebP", "BMP", "GIF", "TIFF"):
        assert name in names


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_16_bit_greyscale_is_scaled_not_clipped(mode):
    """Mid-grey in 16 bits (32768) must come out mid-grey (128), in either mode Pillow may use."""
    img = Image.new("I;16", (32, 32), 32768)
    img = img if mode == "I;16" else img.convert("I")
    out = decode_upload(encode(img, "PNG" if mode == "I;16" else "TIFF"), LIMIT)
    assert out.min() == 128 and out.max() == 128


@pytest.mark.parametrize("mode", ["I;16B", "I;16L"])
def test_16_bit_greyscale_in_either_byte_order_is_scaled_too(mode):
    """A big-endian 16-bit TIFF opens as I;16B, which Pillow's point() refuses (found by the
    property tests): it must decode like any other 16-bit image."""
    out = decode_upload(encode(Image.new(mode, (32, 32), 32768), "TIFF"), LIMIT)
    assert out.min() == 128 and out.max() == 128


def test_transparent_pixels_come_out_white():
    img = Image.new("RGBA", (32, 32), (255, 0, 0, 0))
    img.paste((0, 0, 255, 255), (0, 0, 16, 32))
    out = decode_upload(encode(img, "PNG"), LIMIT)
    assert out[:, :, 16:].min() == 255  # transparent half: white, not the hidden red
    assert out[2, :, :16].min() == 255 and out[0, :, :16].max() == 0
