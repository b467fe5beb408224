"""Property tests of the image path: any image, whole or damaged, is classified or refused with a 4xx.

Hypothesis draws sizes (1x1 to a few hundred pixels, extreme aspect ratios), Pillow modes, file
formats, EXIF orientations and animation frames, and damages some of the files (truncated, bytes
flipped, bytes inserted). `decode_upload` must return a uint8 (3, 32, 32) tensor or raise its
UploadError, never anything else; a whole file must decode; and the service must answer every
upload with a 200 and a valid body, or a 4xx JSON error with a code - never a 5xx.

Generation is derandomized (the same examples on every run) and bounded, so the tests are
deterministic and quick.
"""

from __future__ import annotations

import io
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from app.imaging import UploadError, decode_upload
from app.schemas import PredictResponse

FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV",
         "I", "I;16", "I;16B", "I;16L", "F")  # fmt: skip
UPLOAD_CODES = {"empty_file", "corrupt_image", "unsupported_media_type", "too_many_pixels"}
MAX_PIXELS = 1_000_000  # damaged headers may declare large images: keep the decoding they cause small
PROPERTY_SETTINGS = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _saves(mode: str, fmt: str) -> bool:
    try:
        Image.new(mode, (2, 2)).save(io.BytesIO(), fmt)
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


# Every mode each format can store as it is; the rest would only test Pillow's refusal to save.
SAVABLE = [(mode, fmt) for mode in MODES for fmt in FORMATS if _saves(mode, fmt)]


def _pixels(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    """Random pixel data in `mode` (noise or a smooth gradient of random colours)."""
    rng = random.Random(seed)
    if mode == "F":  # raw random floats would be NaN and 1e38: take finite values of any sign
        img = Image.frombytes("L", size, rng.randbytes(size[0] * size[1])).convert("F")
        return img.point(lambda v: (v - 128) * rng.choice((0.01, 1.0, 1000.0)))
    if rng.random() < 0.5:
        low = Image.frombytes("RGB", (2, 2), rng.randbytes(12)).resize(size, Image.Resampling.BILINEAR)
        return low.convert(mode) if mode not in ("La", "RGBa") else low.convert("RGBA").convert(mode)
    probe = Image.new(mode, (1, 1))
    return Image.frombytes(mode, size, rng.randbytes(len(probe.tobytes()) * size[0] * size[1]))


@st.composite
def image_files(draw) -> tuple[bytes, tuple[int, int], str, str]:
    """(file bytes, size, mode, format) of a whole image file that Pillow wrote."""
    mode, fmt = draw(st.sampled_from(SAVABLE))
    side = st.integers(1, 300)
    size = draw(
        st.one_of(
            st.tuples(side, side),
            st.sampled_from([(1, 1), (1, 400), (400, 1), (2, 300), (300, 3), (33, 1), (1, 33)]),
        )
    )
    img = _pixels(mode, size, draw(st.integers(0, 2**32)))
    params: dict = {}
    orientation = draw(st.sampled_from([None, 1, 2, 3, 4, 5, 6, 7, 8, 0, 9]))
    if orientation is not None and fmt in ("JPEG", "PNG", "WEBP", "TIFF"):
        exif = Image.Exif()
        exif[0x0112] = orientation
        params["exif"] = exif.tobytes()
    frames = draw(st.integers(1, 3)) if fmt in ("GIF", "PNG", "WEBP", "TIFF") else 1
    if frames > 1:
        params["save_all"] = True
        params["append_images"] = [img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)] * (frames - 1)
    if fmt == "JPEG":
        params["quality"] = draw(st.sampled_from([5, 75, 95]))
    buffer = io.BytesIO()
    try:
        img.save(buffer, fmt, **params)
    except (OSError, ValueError, TypeError):  # an option this mode cannot take: save it plainly
        buffer = io.BytesIO()
        img.save(buffer, fmt)
    return buffer.getvalue(), size, mode, fmt


@st.composite
def damaged(draw, files: st.SearchStrategy) -> bytes:
    """A whole file, cut short, with bytes flipped, or with bytes inserted."""
    data: bytes = draw(files)[0]
    how = draw(st.sampled_from(["truncate", "flip", "insert", "header_flip"]))
    if how == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    buffer = bytearray(data)
    rng = random.Random(draw(st.integers(0, 2**32)))
    if how == "insert":
        at = rng.randrange(len(buffer) + 1)
        buffer[at:at] = rng.randbytes(rng.randint(1, 16))
        return bytes(buffer)
    span = min(len(buffer), 64) if how == "header_flip" else len(buffer)
    for _ in range(rng.randint(1, 8)):
        buffer[rng.randrange(span)] ^= 1 << rng.randrange(8)
    return bytes(buffer)


def _decodes_or_refuses(data: bytes) -> torch.Tensor | UploadError:
    try:
        tensor = decode_upload(data, MAX_PIXELS)
    except UploadError as exc:
        assert 400 <= exc.status < 500 and exc.code in UPLOAD_CODES, exc
        assert str(exc)
        return exc
    assert tensor.dtype == torch.uint8 and tensor.shape == (3, 32, 32)
    return tensor


@PROPERTY_SETTINGS
@given(image_files())
def test_every_whole_image_decodes_to_32x32_rgb(file):
    data, size, mode, fmt = file
    result = _decodes_or_refuses(data)
    assert isinstance(result, torch.Tensor), f"{fmt} {mode} {size}: {result}"


@PROPERTY_SETTINGS
@given(image_files())
def test_the_pixel_limit_refuses_only_larger_images(file):
    data, (width, height), mode, fmt = file
    try:
        tensor = decode_upload(data, 1024)  # the smallest limit the settings allow
    except UploadError as exc:
        assert (exc.status, exc.code) == (413, "too_many_pixels"), f"{fmt} {mode}: {exc}"
        assert width * height > 1024  # JPEG may decode at reduced scale, so larger is not always refused
    else:
        assert tensor.shape == (3, 32, 32)


@PROPERTY_SETTINGS
@given(damaged(image_files()))
def test_a_damaged_file_decodes_or_raises_upload_error(data):
    _decodes_or_refuses(data)


@PROPERTY_SETTINGS
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_decode_or_raise_upload_error(data):
    _decodes_or_refuses(data)


@pytest.fixture(scope="module")
def small_limits_client(serve):
    with serve(max_pixels=MAX_PIXELS) as client:
        yield client


@PROPERTY_SETTINGS
@given(st.one_of(image_files().map(lambda f: f[0]), damaged(image_files()), st.binary(max_size=512)))
def test_the_service_classifies_or_answers_4xx_never_5xx(small_limits_client, data):
    r = small_limits_client.post("/predict", files=[("file", ("upload", data))])
    assert r.status_code == 200 or 400 <= r.status_code < 500, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    if r.status_code == 200:
        [prediction] = PredictResponse.model_validate(body).predictions
        assert len(prediction.top_k) == 3
    else:
        assert body["code"] in UPLOAD_CODES and body["detail"], body
        assert [f["code"] for f in body["files"]] == [body["code"]]
