"""The /predict fast path answers exactly as the FastAPI route does, and hands it a query to refuse.

Each case is posted to two services on the same weights, one with the fast path (the default)
and one without (CIFAR10_FAST_PATH=false), and the answers are compared. Which of the two
answered is observed, not assumed: the route resolves its dependencies (the service) for every
request it handles, the fast path resolves none, so each app counts its route's requests through
a dependency override. The body has one parser (app/uploads.py) whoever answers: the fast path
reads every body itself, however it is laid out, sized or sent.
"""

from __future__ import annotations

import re
from collections import Counter

import pytest
from fastapi import Request

from app.routes import get_service

from .forms import raw_body
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


IMAGE = png_bytes(6)
FILE_PART = (b'Content-Disposition: form-data; name="file"; filename="x.png"', IMAGE)
MULTIPART = "multipart/form-data; boundary=xyz"

# case: (content type, body, query, the status both answer); the fast path reads every one of them
BODIES = {
    "misnamed-field": (MULTIPART, raw_body([(FILE_PART[0].replace(b'"file"', b'"image"'), IMAGE)]), "", 422),
    "no-filename": (MULTIPART, raw_body([(b'Content-Disposition: form-data; name="file"', IMAGE)]), "", 422),
    "extra-text-field": (
        MULTIPART,
        raw_body([FILE_PART, (b'Content-Disposition: form-data; name="n"', b"hi")]),
        "",
        200,
    ),
    "browser-empty-input": (
        MULTIPART,
        raw_body([(b'Content-Disposition: form-data; name="file"; filename=""', b"")]),
        "",
        422,
    ),
    "empty-file": (
        MULTIPART,
        raw_body([(b'Content-Disposition: form-data; name="file"; filename="e.png"', b"")]),
        "",
        400,
    ),
    "text-file": (
        MULTIPART,
        raw_body([(b'Content-Disposition: form-data; name="file"; filename="t.txt"', b"hello")]),
        "",
        415,
    ),
    "preamble": (MULTIPART, raw_body([FILE_PART], preamble=b"preamble\r\n"), "", 400),
    "unterminated": (MULTIPART, raw_body([FILE_PART])[:-4], "", 422),
    "no-name": (MULTIPART, raw_body([(b'Content-Disposition: form-data; filename="x.png"', IMAGE)]), "", 400),
    "no-boundary": ("multipart/form-data", raw_body([FILE_PART]), "", 400),
    "quoted-boundary": ('multipart/form-data; boundary="xyz"', raw_body([FILE_PART]), "", 200),
    "over-1-MiB": (MULTIPART, raw_body([(FILE_PART[0], IMAGE + bytes(2 * 1024 * 1024))]), "", 200),
    "json": ("application/json", b'{"file": "x.png"}', "", 415),
    "urlencoded-text": ("application/x-www-form-urlencoded", b"file=cat.jpg", "", 422),
    "too-many-files": (MULTIPART, raw_body([FILE_PART] * 40), "", 413),
    "top-k-twice": (MULTIPART, raw_body([FILE_PART]), "?top_k=2&top_k=3", 200),  # the route takes the last
}
# The query is checked first, and a query the route would refuse is left to it.
QUERIES = {
    "top-k-zero": "?top_k=0",
    "top-k-eleven": "?top_k=11",
    "top-k-word": "?top_k=three",
    "unknown-query": "?top_k=2&debug=1",
}


def post_both(both, query: str, content, content_type: str | None):
    headers = {"content-type": content_type} if content_type else {}
    return [client.post(f"/predict{query}", content=content, headers=headers) for client in both]


@pytest.mark.parametrize("case", sorted(BODIES))
def test_every_body_is_read_by_the_fast_path_with_the_routes_answer(both, routed, case):
    content_type, body, query, status = BODIES[case]
    before = routed.copy()
    a, b = post_both(both, query, body, content_type)
    assert routed - before == Counter(route=1)  # the fast path answered `a` itself
    assert a.status_code == b.status_code == status
    assert without_timing(a.json()) == without_timing(b.json())


@pytest.mark.parametrize("case", sorted(QUERIES))
def test_a_query_the_route_refuses_is_left_to_it(both, routed, case):
    before = routed.copy()
    a, b = post_both(both, QUERIES[case], raw_body([FILE_PART]), MULTIPART)
    assert routed - before == Counter(fast=1, route=1)
    assert a.status_code == b.status_code == 422
    assert a.json() == b.json()
    assert a.json()["fields"][0]["loc"][0] == "query"


def test_a_body_sent_in_chunks_without_length_is_read_too(both, routed):
    body = raw_body([FILE_PART])
    before = routed.copy()
    answers = [
        client.post("/predict", content=iter([body[:100], body[100:]]), headers={"content-type": MULTIPART})
        for client in both
    ]
    assert routed - before == Counter(route=1)
    assert [r.status_code for r in answers] == [200, 200]
    assert without_timing(answers[0].json()) == without_timing(answers[1].json())


def requests_total(client, route: str, status: int) -> float:
    """The value of cifar10_http_requests_total for POST `route` and `status` (0 before the first)."""
    series = f'cifar10_http_requests_total{{method="POST",route="{route}",status="{status}"}}'
    found = re.search(rf"^{re.escape(series)} (\S+)$", client.get("/metrics").text, re.M)
    return float(found[1]) if found else 0.0


@pytest.mark.parametrize(
    "body, query, status",
    [(raw_body([FILE_PART]), "", 200), (raw_body([FILE_PART]), "?top_k=0", 422), (b"junk", "", 400)],
    ids=["answered", "declined", "refused-by-the-fast-path"],
)
def test_a_request_is_counted_once_under_the_route_whoever_answers(both, routed, body, query, status):
    fast, _ = both
    before = requests_total(fast, "/predict", status)
    routed_before = routed["fast"]
    headers = {"content-type": MULTIPART}
    assert fast.post(f"/predict{query}", content=body, headers=headers).status_code == status
    assert routed["fast"] - routed_before == (status == 422)  # only the bad query reached the route
    assert requests_total(fast, "/predict", status) == before + 1
