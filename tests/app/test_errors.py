"""Bad input gets a 4xx (or 503) with a JSON body that says what was wrong, and the service goes on."""

from __future__ import annotations

import pytest

from .images import PDF, SVG, TEXT, blobs, encode, jpeg_bytes, png_bytes, png_header_only


def post(client, *files: tuple[str, bytes], **params):
    return client.post("/predict", files=[("file", (name, data)) for name, data in files], params=params)


def assert_error(r, status: int, code: str, *words: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["code"] == code
    for word in words:
        assert word.lower() in body["detail"].lower(), body["detail"]
    return body


def truncated_jpeg() -> bytes:
    data = jpeg_bytes(0, (64, 64))
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    "data, status, code, words",
    [
        (b"", 400, "empty_file", ["empty"]),
        (truncated_jpeg(), 400, "corrupt_image", ["truncated"]),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, 400, "corrupt_image", ["PNG", "damaged"]),
        (TEXT, 415, "unsupported_media_type", ["text"]),
        (PDF, 415, "unsupported_media_type", ["PDF"]),
        (SVG, 415, "unsupported_media_type", ["SVG"]),
        (bytes(range(256)) * 4, 415, "unsupported_media_type", ["not an image"]),
        (b"\x00\x00\x00\x18ftypheic" + b"\x00" * 16, 415, "unsupported_media_type", ["HEIF"]),
    ],
    ids=["empty", "truncated-jpeg", "damaged-png", "text", "pdf", "svg", "binary", "heic"],
)
def test_bad_file_is_answered_with_its_reason(client, data, status, code, words):
    body = assert_error(post(client, ("upload.bin", data)), status, code, "upload.bin", *words)
    assert body["files"] == [
        {
            "index": 0,
            "filename": "upload.bin",
            "status": status,
            "code": code,
            "detail": body["files"][0]["detail"],
        }
    ]
    assert "predictions" not in body


def test_one_bad_file_fails_the_whole_request_and_is_named(client):
    """The rule: all or nothing; the status of the first bad file; every bad file listed."""
    r = post(
        client,
        ("good.png", png_bytes(1)),
        ("notes.txt", TEXT),
        ("good2.png", png_bytes(2)),
        ("empty.jpg", b""),
    )
    body = assert_error(r, 415, "unsupported_media_type", "the file at index 1", "notes.txt", "1 more")
    assert [(f["index"], f["filename"], f["status"], f["code"]) for f in body["files"]] == [
        (1, "notes.txt", 415, "unsupported_media_type"),
        (3, "empty.jpg", 400, "empty_file"),
    ]
    assert "predictions" not in body


def test_one_bad_file_among_good_ones_says_the_others_were_not_predicted(client):
    r = post(client, ("a.png", png_bytes(1)), ("b.png", b""), ("c.png", png_bytes(2)))
    words = "the file at index 1", "b.png", "no predictions were made for the other 2 file(s)"
    assert_error(r, 400, "empty_file", *words)


def test_image_over_the_pixel_limit_is_refused_before_decoding(serve):
    """The header says 9000x9000; the file is 80 bytes and could never be decoded: a 413 (not a
    400 for the missing data) shows the limit was applied to the header alone."""
    bomb = png_header_only(9000, 9000)
    assert len(bomb) < 100
    with serve(max_pixels=1_000_000) as client:
        assert_error(post(client, ("bomb.png", bomb)), 413, "too_many_pixels", "9000x9000", "1,000,000")
        real = encode(blobs(0, (1200, 1000)), "PNG")
        assert_error(post(client, ("big.png", real)), 413, "too_many_pixels", "1200x1000")
        assert post(client, ("ok.png", png_bytes(0))).status_code == 200


def test_pillows_own_bomb_limit_is_a_413_too(client):
    assert_error(post(client, ("huge.png", png_header_only(100_000, 100_000))), 413, "too_many_pixels")


def test_body_over_the_limit_is_refused_from_content_length(serve, caplog):
    with serve(max_body_bytes=20_000) as client:
        r = post(client, ("big.bmp", encode(blobs(0, (100, 100)), "BMP")))  # 30 kB
        assert_error(r, 413, "body_too_large", "20,000", "send fewer or smaller files")
        assert "CIFAR10" not in r.json()["detail"]  # the client is told what it can do
        assert "CIFAR10_MAX_BODY_BYTES" in caplog.text  # and the operator what to set
        assert post(client, ("ok.png", png_bytes(0))).status_code == 200


def test_chunked_body_over_the_limit_is_refused_while_reading(serve):
    def chunks():
        yield b'--B\r\nContent-Disposition: form-data; name="file"; filename="x.bin"\r\n\r\n'
        for _ in range(40):
            yield b"\x00" * 1024
        yield b"\r\n--B--\r\n"

    with serve(max_body_bytes=20_000) as client:
        r = client.post(
            "/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=B"}
        )
        assert "content-length" not in {k.lower() for k in r.request.headers}
        assert_error(r, 413, "body_too_large", "20,000")
        assert post(client, ("ok.png", png_bytes(0))).status_code == 200


def test_too_many_files_is_413(serve, caplog):
    with serve(max_files=3) as client:
        r = post(client, *[(f"{i}.png", png_bytes(i)) for i in range(4)])
        assert_error(r, 413, "too_many_files", "4 files", "at most 3", "split them over several requests")
        assert "CIFAR10" not in r.json()["detail"] and "CIFAR10_MAX_FILES" in caplog.text
        assert post(client, *[(f"{i}.png", png_bytes(i)) for i in range(3)]).status_code == 200


def test_more_files_than_the_multipart_parser_takes_is_413(client):
    r = post(client, *[(f"{i}.png", b"x") for i in range(1001)])
    assert_error(r, 413, "too_many_files", "at most 32")


def test_malformed_multipart_is_400(client):
    r = client.post(
        "/predict", content=b"garbage", headers={"content-type": "multipart/form-data; boundary=B"}
    )
    assert_error(r, 400, "malformed_body", "could not be parsed")
    r = client.post("/predict", content=b"x", headers={"content-type": "multipart/form-data"})
    assert_error(r, 400, "malformed_body", "boundary")


def test_missing_file_field_is_422(client):
    r = client.post("/predict", data={"other": "x"}, files=[("image", ("a.png", png_bytes(0)))])
    body = assert_error(r, 422, "invalid_request", "'file'", "image")
    assert body["fields"][0]["loc"] == ["body", "file"]


def test_empty_post_is_422(client):
    assert_error(client.post("/predict"), 422, "invalid_request", "'file'")


def test_text_value_in_the_file_field_is_422(client):
    assert_error(client.post("/predict", data={"file": "cat.jpg"}), 422, "invalid_request", "file upload")


def test_json_body_is_415(client):
    assert_error(client.post("/predict", json={"file": "x"}), 415, "unsupported_media_type", "multipart")


@pytest.mark.parametrize("top_k", ["0", "11", "abc", "2.5"])
def test_bad_top_k_is_422(client, top_k):
    r = post(client, ("a.png", png_bytes(0)), top_k=top_k)
    body = assert_error(r, 422, "invalid_request", "top_k", "1 to 10")
    assert body["fields"][0]["loc"] == ["query", "top_k"]


@pytest.mark.parametrize(
    "method, path, params, unknown, takes",
    [
        ("POST", "/predict", {"topk": "5"}, "'topk'", "top_k, model"),
        ("POST", "/predict", {"top_k": "2", "modle": "lite"}, "'modle'", "top_k, model"),
        ("GET", "/model/summary", {"formt": "text", "x": "1"}, "'formt', 'x'", "format, model"),
    ],
)
def test_an_unknown_query_parameter_is_422_not_ignored(client, method, path, params, unknown, takes):
    files = [("file", ("a.png", png_bytes(0)))] if method == "POST" else None
    r = client.request(method, path, params=params, files=files)
    body = assert_error(r, 422, "invalid_request", "unknown query parameter", unknown, f"takes: {takes}")
    named = [f["loc"] for f in body["fields"] if f["type"] == "extra_forbidden"]
    assert named == [["query", name] for name in params if name not in takes.split(", ")]


def test_unknown_path_and_wrong_method_are_json(client):
    assert_error(client.get("/nope"), 404, "not_found", "/nope")
    assert_error(client.get("/predict"), 405, "method_not_allowed", "GET")


def test_service_keeps_serving_after_bad_input(client):
    for data in (b"", TEXT, truncated_jpeg(), png_header_only(100_000, 100_000)):
        assert post(client, ("bad", data)).status_code in (400, 413, 415)
    r = post(client, ("good.png", png_bytes(3)))
    assert r.status_code == 200
    text = client.get("/metrics").text
    assert "cifar10_queue_images 0.0" in text  # nothing left reserved by the failed requests
