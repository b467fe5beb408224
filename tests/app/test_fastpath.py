"""The /predict fast path answers exactly as the FastAPI route does, and hands it everything else.

Each case is posted to two services on the same weights, one with the fast path (the default)
and one without (CIFAR10_FAST_PATH=false), and the answers are compared. Which of the two
answered is observed, not assumed: the route resolves its dependencies (the service) for every
request it handles, the fast path resolves none, so each app counts its route's requests through
a dependency override.
"""

from __future__ import annotations

import re
from collections import Counter

import httpx
import pytest
from fastapi import Request

from app.fastpath import split_multipart
from app.routes import get_service

from .images import jpeg_bytes, png_bytes


@pytest.fixture(scope="module")
def both(serve):
    with serve(workers=2) as fast, serve(workers=2, fast_path=False) as route:
        yield fast, route


@pytest.fixture(scope="module")
def routed(both) -> Counter:
    """How many requests the FastAPI route of each app has handled: routed["fast"], routed["route"]."""
    counts: Counter = Counter()
    for name, client in zip(("fast", "route"), both, strict=True):

        async def counting(request: Request, name: str = name):
            counts[name] += 1
            return await get_service(request)

        client.app.dependency_overrides[get_service] = counting
    yield counts
    for client in both:
        client.app.dependency_overrides.clear()


def without_timing(answer: dict) -> dict:
    return {k: v for k, v in answer.items() if k != "timing"}


def test_the_fast_path_answers_unless_the_setting_turns_it_off(both, routed):
    fast, route = both
    files = [("file", ("a.png", png_bytes(1), "image/png"))]
    before = routed.copy()
    assert fast.post("/predict", files=files).status_code == 200
    assert routed["fast"] == before["fast"]  # answered before the route
    assert route.post("/predict", files=files).status_code == 200
    assert routed["route"] == before["route"] + 1  # CIFAR10_FAST_PATH=false: the route answered


@pytest.mark.parametrize(
    "files, query",
    [
        ([("file", ("a.png", png_bytes(1), "image/png"))], ""),
        ([("file", ("a.jpg", jpeg_bytes(2), "image/jpeg"))], "?top_k=5"),
        (
            [
                ("file", ("été 1.png", png_bytes(3), "image/png")),
                ("file", ("b.jpg", jpeg_bytes(4), "image/jpeg")),
                ("file", ("c.png", png_bytes(5), "application/octet-stream")),
            ],
            "?top_k=10",
        ),
        ([("file", ("a.png", png_bytes(7), "image/png"))], "?model=fin%61l&explain=cam&top_k=2"),
    ],
    ids=["one-png", "jpeg-top5", "three-files-unicode-name", "model-explain-top2-percent-encoded"],
)
def test_plain_requests_get_the_routes_answer(both, routed, files, query):
    fast, route = both
    before = routed.copy()
    a, b = fast.post(f"/predict{query}", files=files), route.post(f"/predict{query}", files=files)
    assert routed - before == Counter(route=1)  # the fast path answered `a`, the route `b`
    assert a.status_code == b.status_code == 200
    assert a.headers["content-type"] == b.headers["content-type"] == "application/json"
    assert without_timing(a.json()) == without_timing(b.json())
    assert set(a.json()["timing"]) == set(b.json()["timing"])


def raw_body(parts: list[tuple[bytes, bytes]], boundary: bytes = b"xyz", preamble: bytes = b"") -> bytes:
    out = [preamble]
    for headers, data in parts:
        out += [b"--" + boundary + b"\r\n", headers, b"\r\n\r\n", data, b"\r\n"]
    out.append(b"--" + boundary + b"--\r\n")
    return b"".join(out)


IMAGE = png_bytes(6)
FILE_PART = (b'Content-Disposition: form-data; name="file"; filename="x.png"', IMAGE)

# case: (parts, query, the status both answer)
OTHER = {
    "misnamed-field": ([(b'Content-Disposition: form-data; name="image"; filename="x.png"', IMAGE)], "", 422),
    "no-filename": ([(b'Content-Disposition: form-data; name="file"', IMAGE)], "", 422),
    "extra-text-field": ([FILE_PART, (b'Content-Disposition: form-data; name="note"', b"hi")], "", 200),
    "top-k-zero": ([FILE_PART], "?top_k=0", 422),
    "top-k-eleven": ([FILE_PART], "?top_k=11", 422),
    "top-k-word": ([FILE_PART], "?top_k=three", 422),
    "unknown-query": ([FILE_PART], "?top_k=2&debug=1", 422),
    "top-k-twice": ([FILE_PART], "?top_k=2&top_k=3", 200),  # the route takes the last
    "empty-file": ([(b'Content-Disposition: form-data; name="file"; filename="e.png"', b"")], "", 400),
    "text-file": ([(b'Content-Disposition: form-data; name="file"; filename="t.txt"', b"hello")], "", 415),
}
# Plain in form, so the fast path answers these itself, with the service's error for the file.
ANSWERED_WITH_AN_ERROR = {"empty-file", "text-file"}


@pytest.mark.parametrize("case", sorted(OTHER))
def test_other_requests_get_the_routes_answer_too(both, routed, case):
    parts, query, status = OTHER[case]
    body = raw_body(parts)
    headers = {"content-type": "multipart/form-data; boundary=xyz"}
    fast, route = both
    before = routed.copy()
    a = fast.post(f"/predict{query}", content=body, headers=headers)
    b = route.post(f"/predict{query}", content=body, headers=headers)
    declined = case not in ANSWERED_WITH_AN_ERROR
    assert routed - before == Counter(fast=int(declined), route=1)  # declined: both routes answered
    assert a.status_code == b.status_code == status
    assert without_timing(a.json()) == without_timing(b.json())


def requests_total(client, route: str, status: int) -> float:
    """The value of cifar10_http_requests_total for POST `route` and `status` (0 before the first)."""
    series = f'cifar10_http_requests_total{{method="POST",route="{route}",status="{status}"}}'
    found = re.search(rf"^{re.escape(series)} (\S+)$", client.get("/metrics").text, re.M)
    return float(found[1]) if found else 0.0


@pytest.mark.parametrize(
    "body, query, status",
    [(raw_body([FILE_PART]), "", 200), (raw_body(OTHER["top-k-zero"][0]), "?top_k=0", 422)],
    ids=["answered", "declined"],
)
def test_a_request_is_counted_once_under_the_route_whoever_answers(both, routed, body, query, status):
    fast, _ = both
    before = requests_total(fast, "/predict", status)
    routed_before = routed["fast"]
    headers = {"content-type": "multipart/form-data; boundary=xyz"}
    assert fast.post(f"/predict{query}", content=body, headers=headers).status_code == status
    assert routed["fast"] - routed_before == (status != 200)  # the fast path answered the plain one
    assert requests_total(fast, "/predict", status) == before + 1


def encoded_by_httpx(files) -> tuple[bytes, bytes]:
    request = httpx.Request("POST", "http://x/predict", files=files)
    boundary = request.headers["content-type"].split("boundary=")[1].encode()
    return request.read(), boundary


def test_split_multipart_reads_what_clients_send():
    data = b"\r\n--not-the-boundary\r\n" + IMAGE  # CRLF and dashes inside the data are data
    body, boundary = encoded_by_httpx([("file", ("a.png", data)), ("file", ("ü.png", IMAGE))])
    assert split_multipart(body, boundary) == [("a.png", data), ("ü.png", IMAGE)]


@pytest.mark.parametrize(
    "body",
    [
        raw_body([FILE_PART], preamble=b"preamble\r\n"),
        raw_body([FILE_PART])[:-4],  # no closing delimiter
        raw_body([(b"Content-Type: image/png", IMAGE)]),  # no Content-Disposition
        raw_body([(b'Content-Disposition: attachment; name="file"; filename="x.png"', IMAGE)]),
        raw_body([FILE_PART]) + b"trailing junk",
        raw_body([(FILE_PART[0], IMAGE + b"\r\n--xyz--\r\n" + IMAGE)]),  # a closing delimiter in the data
    ],
    ids=["preamble", "unterminated", "no-disposition", "not-form-data", "epilogue", "two-closings"],
)
def test_split_multipart_declines_anything_unusual(body):
    assert split_multipart(body, b"xyz") is None
