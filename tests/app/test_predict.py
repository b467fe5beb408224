"""POST /predict on good input: the answer's shape, the image rule, and agreement with evaluation."""

from __future__ import annotations

import hashlib
import io
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image

from app.checkpoint import build_model, load_checkpoint, save_checkpoint
from app.loading import load_model
from app.model import CLASSES
from app.preprocess import load_image, normalize

from .conftest import distinct_model
from .images import blobs, encode, png_bytes


def post(client, *files: tuple[str, bytes], **params):
    return client.post("/predict", files=[("file", (name, data)) for name, data in files], params=params)


def probabilities(prediction: dict) -> dict[str, float]:
    return {entry["label"]: entry["probability"] for entry in prediction["top_k"]}


def test_one_image_gets_label_index_confidence_and_top_k(client):
    r = post(client, ("cat.png", png_bytes(1)))
    assert r.status_code == 200, r.text
    body = r.json()
    [p] = body["predictions"]
    assert p["filename"] == "cat.png"
    assert p["label"] in CLASSES and CLASSES[p["index"]] == p["label"]
    assert len(p["top_k"]) == 3  # the default
    assert p["top_k"][0] == {"label": p["label"], "probability": p["confidence"]}
    listed = [e["probability"] for e in p["top_k"]]
    assert listed == sorted(listed, reverse=True)
    assert 0 < p["confidence"] <= 1
    assert body["model"]["name"] == "FinalModel" and len(body["model"]["sha256"]) == 64
    assert body["model"]["device"] == "cpu"
    assert body["timing"]["total_ms"] >= body["timing"]["inference_ms"] > 0
    assert body["timing"]["batch_size"] >= 1


def test_top_k_ten_lists_every_class_with_probabilities_summing_to_one(client):
    [p] = post(client, ("a.png", png_bytes(2)), top_k=10).json()["predictions"]
    assert sorted(e["label"] for e in p["top_k"]) == sorted(CLASSES)
    assert sum(e["probability"] for e in p["top_k"]) == pytest.approx(1.0, abs=1e-5)


def test_top_k_one(client):
    [p] = post(client, ("a.png", png_bytes(2)), top_k=1).json()["predictions"]
    assert [e["label"] for e in p["top_k"]] == [p["label"]]


def test_several_files_are_answered_in_upload_order(client):
    singles = [post(client, (f"{i}.png", png_bytes(i)), top_k=10).json()["predictions"][0] for i in range(5)]
    together = post(client, *[(f"{i}.png", png_bytes(i)) for i in range(5)], top_k=10).json()["predictions"]
    assert [p["filename"] for p in together] == [f"{i}.png" for i in range(5)]
    for alone, batched in zip(singles, together, strict=True):
        assert batched["label"] == alone["label"]
        assert probabilities(batched) == pytest.approx(probabilities(alone), abs=1e-5)
    assert len({p["label"] for p in together}) > 1  # the images really are told apart


def multipart(disposition: str, data: bytes) -> dict:
    body = (
        f"--B\r\nContent-Disposition: form-data; {disposition}\r\nContent-Type: image/png\r\n\r\n".encode()
        + data
        + b"\r\n--B--\r\n"
    )
    return {"content": body, "headers": {"content-type": "multipart/form-data; boundary=B"}}


def test_an_unnamed_file_is_answered_with_filename_null(client):
    r = client.post("/predict", **multipart('name="file"; filename=""', png_bytes(0)))
    assert r.status_code == 200, r.text
    assert r.json()["predictions"][0]["filename"] is None


def test_a_part_without_filename_is_a_text_field_and_is_refused_clearly(client):
    r = client.post("/predict", **multipart('name="file"', png_bytes(0)))
    assert r.status_code == 422
    assert r.json()["code"] == "invalid_request"
    assert "filename" in r.json()["detail"]


def reference_probabilities(weights, images: list[bytes]) -> torch.Tensor:
    """What `python -m training.evaluate` computes: the same pixels, FinalModel in float32."""
    model = build_model(load_checkpoint(weights))
    pixels = torch.stack([load_image(io.BytesIO(data)) for data in images])
    with torch.no_grad():
        return torch.softmax(model(normalize(pixels)).float(), dim=1)


def test_served_labels_equal_float32_evaluation_of_the_same_images(serve, weights):
    """Mixed sizes and formats, sent concurrently so that batches mix requests: the served labels
    and probabilities are those of FinalModel in float32 on app.preprocess's pixels."""
    images = [
        encode(blobs(i, size), fmt)
        for i, (size, fmt) in enumerate(
            [
                ((32, 32), "PNG"),
                ((64, 48), "JPEG"),
                ((40, 90), "PNG"),
                ((500, 300), "JPEG"),
                ((33, 31), "WEBP"),
            ]
            * 5
        )
    ]
    expected = reference_probabilities(weights, images)
    assert len(set(expected.argmax(1).tolist())) > 2  # a test that labels vary
    with serve(workers=2, max_batch_size=4, max_wait_ms=20) as client, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: post(client, (f"{i}", images[i]), top_k=10), range(len(images))))
    for i, r in enumerate(answers):
        assert r.status_code == 200, r.text
        [p] = r.json()["predictions"]
        served = torch.tensor([probabilities(p)[c] for c in CLASSES])
        assert torch.allclose(served, expected[i], atol=1e-5), i
        top2 = expected[i].topk(2).values
        if top2[0] - top2[1] > 1e-4:  # a near-tie may flip with float rounding; none here in practice
            assert p["index"] == int(expected[i].argmax())


@pytest.mark.parametrize(
    "fmt, params",
    [
        ("JPEG", {}),
        ("PNG", {}),
        ("WEBP", {}),
        ("BMP", {}),
        ("GIF", {}),
        ("TIFF", {}),
        ("TIFF", {"compression": "tiff_lzw"}),
    ],
)
def test_common_formats_are_read(client, fmt, params):
    data = encode(blobs(3, (48, 40)), fmt, **params)
    r = post(client, (f"x.{fmt.lower()}", data))
    assert r.status_code == 200, r.text


def image_in_mode(mode: str) -> bytes:
    base = blobs(4, (40, 40))
    if mode == "I;16":
        grey = base.convert("L")
        wide = Image.new("I;16", grey.size)
        wide.putdata([v * 257 for v in grey.tobytes()])
        return encode(wide, "PNG")
    if mode == "CMYK":
        return encode(base.convert("CMYK"), "JPEG")
    if mode == "P+transparency":
        pal = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
        return encode(pal, "PNG", transparency=0)
    return encode(base.convert(mode), "PNG" if mode != "1" else "BMP")


@pytest.mark.parametrize("mode", ["L", "LA", "P", "P+transparency", "RGBA", "CMYK", "I;16", "1"])
def test_any_mode_is_converted_to_rgb(client, mode):
    r = post(client, ("m", image_in_mode(mode)))
    assert r.status_code == 200, r.text


def test_sixteen_bit_greyscale_reads_like_its_eight_bit_version(client):
    grey = blobs(5, (32, 32)).convert("L")
    wide = Image.new("I;16", grey.size)
    wide.putdata([v * 257 for v in grey.tobytes()])  # 0..255 -> 0..65535
    a = post(client, ("8", encode(grey, "PNG")), top_k=10).json()["predictions"][0]
    b = post(client, ("16", encode(wide, "PNG")), top_k=10).json()["predictions"][0]
    assert probabilities(a) == pytest.approx(probabilities(b), abs=1e-5)


def test_transparent_pixels_count_as_white(client):
    clear = Image.new("RGBA", (32, 32), (10, 200, 30, 0))
    white = Image.new("RGB", (32, 32), (255, 255, 255))
    a = post(client, ("clear", encode(clear, "PNG")), top_k=10).json()["predictions"][0]
    b = post(client, ("white", encode(white, "PNG")), top_k=10).json()["predictions"][0]
    assert probabilities(a) == pytest.approx(probabilities(b), abs=1e-6)


def test_exif_orientation_is_applied(client):
    upright = blobs(6, (48, 32))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a camera held sideways writes
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    with_tag = post(client, ("tagged", encode(stored, "PNG", exif=exif.tobytes())), top_k=10)
    without = post(client, ("raw", encode(stored, "PNG")), top_k=10)
    expected = post(client, ("upright", encode(upright, "PNG")), top_k=10)
    tagged_p = probabilities(with_tag.json()["predictions"][0])
    assert tagged_p == pytest.approx(probabilities(expected.json()["predictions"][0]), abs=1e-6)
    assert tagged_p != pytest.approx(probabilities(without.json()["predictions"][0]), abs=1e-6)


def test_animated_gif_uses_its_first_frame(client):
    first, second = blobs(7, (32, 32)), blobs(8, (32, 32))
    animated = encode(first, "GIF", save_all=True, append_images=[second], duration=100, loop=0)
    a = post(client, ("anim.gif", animated), top_k=10).json()["predictions"][0]
    b = post(client, ("first.gif", encode(first, "GIF")), top_k=10).json()["predictions"][0]
    c = post(client, ("second.gif", encode(second, "GIF")), top_k=10).json()["predictions"][0]
    assert probabilities(a) == pytest.approx(probabilities(b), abs=1e-6)
    assert probabilities(a) != pytest.approx(probabilities(c), abs=1e-6)


def test_a_swapped_model_serves_the_next_request(serve, tmp_path):
    """The hook a weights reload will use: swap() replaces the model between batches, no restart."""
    other = tmp_path / "other.pt"
    save_checkpoint(other, distinct_model(seed=1))
    with serve() as client:
        before = post(client, ("a.png", png_bytes(0)), top_k=10).json()
        service = client.app.state.service
        service.swap(load_model(other, service.device))
        after = post(client, ("a.png", png_bytes(0)), top_k=10).json()
        assert (
            after["model"]["sha256"]
            == hashlib.sha256(other.read_bytes()).hexdigest()
            != before["model"]["sha256"]
        )
        assert client.get("/health/ready").json()["model_sha256"] == after["model"]["sha256"]
        assert probabilities(after["predictions"][0]) != pytest.approx(
            probabilities(before["predictions"][0])
        )
