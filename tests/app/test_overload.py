"""Slow clients, the connection cap and the admission gate (app/connections.py) on a real server.

One `cifar10-cnn serve` process with small limits: headers within 1 s, a body within 1.5 s, at
most 2 POST requests in the app (others wait up to 0.5 s), at most 40 connections.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from ..live import live_service
from .images import jpeg_bytes

pytestmark = pytest.mark.slow  # a real server or subprocess: .ci/run runs these (pytest -m slow)

HEADER_S, BODY_S, WAIT_S, MAX_CONNECTIONS = 1.0, 1.5, 0.5, 40
SLACK_S = 1.5  # a busy two-core machine answers late; the limits are what is checked
FLOOD_FILES = 32  # images per flood request: a full batch (CIFAR10_MAX_FILES' default)
BOUNDARY = "overload-test"


def predict_request(jpeg: bytes, files: int = 1) -> bytes:
    part = (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + jpeg
        + b"\r\n"
    )
    body = part * files + f"--{BOUNDARY}--\r\n".encode()
    head = (
        "POST /predict HTTP/1.1\r\nHost: test\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


@pytest.fixture(scope="module")
def url():
    with live_service(
        CIFAR10_HEADER_TIMEOUT_S=str(HEADER_S),
        CIFAR10_BODY_TIMEOUT_S=str(BODY_S),
        CIFAR10_MAX_ACTIVE_REQUESTS="2",
        CIFAR10_ADMISSION_WAIT_S=str(WAIT_S),
        CIFAR10_MAX_CONNECTIONS=str(MAX_CONNECTIONS),
    ) as url:
        yield url


def connect(url: str) -> socket.socket:
    host, port = httpx.URL(url).host, httpx.URL(url).port
    sock = socket.create_connection((host, port), timeout=15)
    return sock


def read_until_closed(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when it closed (monotonic)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data, time.monotonic()


def slow_clients(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return dict(re.findall(r'^cifar10_slow_clients_total\{phase="(\w+)"\} (\S+)$', text, re.M))


def test_a_stalled_body_is_cut_off_within_its_limit(url):
    before = float(slow_clients(url)["body"])
    with connect(url) as sock:
        request = predict_request(jpeg_bytes())
        sock.sendall(request[: len(request) - 100])  # headers and most of the body, then nothing
        sent = time.monotonic()
        answer, closed = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["code"] == "request_timeout"
    assert BODY_S - 0.1 <= closed - sent <= BODY_S + SLACK_S
    assert float(slow_clients(url)["body"]) == before + 1


def test_stalled_headers_are_cut_off_within_their_limit(url):
    before = float(slow_clients(url)["headers"])
    with connect(url) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: multipart/form-da")
        sent = time.monotonic()
        answer, closed = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert HEADER_S - 0.1 <= closed - sent <= HEADER_S + SLACK_S
    assert float(slow_clients(url)["headers"]) == before + 1


def test_a_connection_that_sends_nothing_is_closed_without_an_answer(url):
    with connect(url) as sock:
        opened = time.monotonic()
        answer, closed = read_until_closed(sock)
    assert answer == b""
    assert closed - opened <= HEADER_S + SLACK_S


def test_a_trickle_of_header_bytes_does_not_keep_a_connection_open(url):
    """uvicorn's keep-alive timer restarts with every byte; the header deadline does not."""
    with connect(url) as sock:
        started = time.monotonic()
        try:
            for byte in b"GET /health/live HTTP/1.1\r\nHost: test\r\n":
                sock.sendall(bytes([byte]))
                time.sleep(0.2)
        except OSError:  # closed under us: what should happen
            pass
        answer, closed = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert closed - started <= HEADER_S + SLACK_S


def test_past_the_connection_cap_new_connections_are_refused_at_once(url):
    """Each connection is read until the server closes it: an accepted one that sends nothing is
    closed silently at the header deadline, a refused one gets its 503 before that."""
    socks = []
    try:
        for _ in range(MAX_CONNECTIONS + 5):  # all within the header deadline, so none is closed yet
            socks.append(connect(url))
        with ThreadPoolExecutor(len(socks)) as pool:
            ends = list(pool.map(read_until_closed, socks))
    finally:
        for sock in socks:
            sock.close()
    refused = [(answer, closed) for answer, closed in ends if answer]
    accepted = [closed for answer, closed in ends if not answer]
    assert len(refused) >= 5, ends
    assert len(accepted) <= MAX_CONNECTIONS
    assert max(closed for _, closed in refused) < min(accepted)  # at once, not at the deadline
    for answer, _ in refused:
        assert answer.startswith(b"HTTP/1.1 503 "), answer[:200]
        assert b"too_many_connections" in answer and b"retry-after: " in answer
    text = httpx.get(f"{url}/metrics", timeout=10).text
    assert float(re.search(r"^cifar10_connections_refused_total (\S+)$", text, re.M)[1]) >= 5


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(re.search(rb"content-length: (\d+)", head, re.I)[1])
    await reader.readexactly(length)
    return int(head[9:12])


async def _flood_and_probe(
    url: str, flooders: int, probes: int, admissions: int, max_seconds: float
) -> tuple[list[float], int, list[int], float]:
    """`flooders` connections resend at once whatever they are told; meanwhile `probes` connections
    post one image at a time, honouring Retry-After, until they have been admitted `admissions`
    times in all or `max_seconds` have passed. Returns the probes' latencies of their 200 answers,
    how many times they were refused, the flood's statuses, and the slowest /health/live answer.

    Every connection waits its turn in the same FIFO, so a probe's attempt is admitted about as
    often as a flooder's (places freed / requests arriving, a fifth on a busy two-core machine):
    the flood runs until the probes have had enough attempts for that share to show, not for a
    fixed time that a slow machine would fill with refusals."""
    host, port = httpx.URL(url).host, httpx.URL(url).port
    # Each flood request carries FLOOD_FILES images, so that the app's two places stay busy for
    # longer than the admission wait on any CPU and the gate must refuse; the probes send one.
    flood_request = predict_request(jpeg_bytes(), files=FLOOD_FILES)
    request = predict_request(jpeg_bytes())
    loop = asyncio.get_running_loop()
    give_up = loop.time() + max_seconds
    statuses: list[int] = []
    admitted: list[float] = []
    refused = 0
    health: list[float] = []

    engaged = asyncio.Event()  # the gate has refused the flood: the probes start

    def running() -> bool:
        return len(admitted) < admissions and loop.time() < give_up

    async def flooder() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while running():
                statuses.append(await _exchange(reader, writer, flood_request))
                if statuses[-1] == 503:
                    engaged.set()
        finally:
            writer.close()

    async def probe() -> None:
        nonlocal refused
        try:  # into the flood, once it is refused; a gate that never engages fails the test
            await asyncio.wait_for(engaged.wait(), max_seconds)
        except TimeoutError:
            return
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while running():
                started = loop.time()
                status = await _exchange(reader, writer, request)
                if status == 200:
                    admitted.append(loop.time() - started)
                else:
                    refused += 1
                    await asyncio.sleep(1.0)
        finally:
            writer.close()

    async def live() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            while running():
                started = loop.time()
                assert (await client.get("/health/live")).status_code == 200
                health.append(loop.time() - started)
                await asyncio.sleep(0.2)

    await asyncio.wait_for(
        asyncio.gather(live(), *(probe() for _ in range(probes)), *(flooder() for _ in range(flooders))),
        max_seconds + 30,
    )
    return admitted, refused, statuses, max(health)


def test_a_flood_that_ignores_retry_after_does_not_starve_admitted_requests(url):
    # 30 + 3 + 1 connections stay under MAX_CONNECTIONS, so none is refused at the door.
    admitted, refused, statuses, slowest_health = asyncio.run(
        _flood_and_probe(url, flooders=30, probes=3, admissions=3, max_seconds=45.0)
    )
    assert 503 in statuses, "the flood was never refused: the gate did not engage"
    assert set(statuses) <= {200, 503}
    assert statuses.count(200) > 0
    assert admitted, f"the probes were refused {refused} times and never admitted"
    # An admitted request waits at most admission_wait_s for a place, then its share of the app's
    # two places; the flood's refusals do not hold it up.
    assert max(admitted) <= WAIT_S + 2.0 + SLACK_S, admitted
    assert slowest_health <= 2.0
