"""Signals to a real `uvicorn app.main:app`: SIGHUP reloads the weights, SIGTERM drains, then stops.

The in-flight requests of the drain tests are uploads whose bodies the test holds back: the
server has admitted them (their headers arrived) and waits for the rest, for as long as the
test wants, with no CPU spent, so the drain is observed without any timing luck.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from app import launch
from app.checkpoint import file_sha256

from .conftest import REPO
from .helpers import variant
from .images import png_bytes

pytestmark = pytest.mark.slow  # a real server or subprocess: .ci/run runs these (pytest -m slow)

WAIT = 30.0  # seconds to wait for something that should happen soon
BOUNDARY = "held-upload-boundary"


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def metric(base: str, name: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=5).text
    return float(re.search(rf"^{re.escape(name)} (\S+)$", text, re.M).group(1))


def reloads(base: str, model: str, outcome: str) -> float:
    return metric(base, f'cifar10_model_reloads_total{{model="{model}",outcome="{outcome}"}}')


@pytest.fixture
def server(weights) -> Iterator:
    """start(*args, **env) -> a ready launch.Server (uvicorn with `args`, settings `env`), which the
    test signals; the process is stopped at the end if still running."""
    with contextlib.ExitStack() as stack:

        def start(*args: str, **env: str) -> launch.Server:
            env = {
                "CIFAR10_WEIGHTS": str(weights),
                "CIFAR10_LITE_WEIGHTS": "",  # the optional models only where a test names them
                "CIFAR10_BEST_WEIGHTS": "",
                "CIFAR10_DEVICE": "cpu",
                "CIFAR10_WARMUP": "false",
                **env,
            }
            return stack.enter_context(launch.running(env, args, cwd=REPO))

        yield start


def test_sighup_reloads_the_configured_weights_and_refuses_a_bad_file(
    server, weights, lite_weights, tmp_path
):
    """Every served model reloads from its file; the lite one is untouched when final's is bad."""
    live = tmp_path / "live.pt"
    shutil.copy(weights, live)
    live_server = server(CIFAR10_WEIGHTS=str(live), CIFAR10_LITE_WEIGHTS=str(lite_weights))
    proc, base = live_server.proc, live_server.url
    assert httpx.get(f"{base}/health/ready").json()["model_sha256"] == file_sha256(weights)

    variant(
        weights, tmp_path / "new.pt", lambda m: m.fc.weight.mul_(-1), created_at="2025-06-01T00:00:00+00:00"
    )
    (tmp_path / "new.pt").replace(live)  # an atomic rename, as training's checkpoint writer does
    new_sha = file_sha256(live)
    proc.send_signal(signal.SIGHUP)
    wait_for(lambda: httpx.get(f"{base}/health/ready").json()["model_sha256"] == new_sha, "the swap")
    summary = httpx.get(f"{base}/model/summary").json()
    assert summary["checkpoint"]["created_at"] == "2025-06-01T00:00:00+00:00"
    r = httpx.post(f"{base}/predict", files=[("file", ("a.png", png_bytes(1)))], timeout=WAIT)
    assert r.status_code == 200 and r.json()["model"]["sha256"] == new_sha

    live.write_bytes(b"half a checkpoint")  # a bad file: refused, the new weights keep serving
    proc.send_signal(signal.SIGHUP)
    wait_for(lambda: reloads(base, "final", "refused") == 1, "the refusal")
    assert httpx.get(f"{base}/health/ready").json()["model_sha256"] == new_sha
    assert reloads(base, "final", "swapped") == 1
    wait_for(lambda: reloads(base, "lite", "swapped") == 2, "both reloads of the lite model")
    assert reloads(base, "lite", "refused") == 0

    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=WAIT)
    output = live_server.output()
    assert "reloaded weights from" in output and new_sha[:12] in output
    assert "SIGHUP: reload refused" in output and "damaged" in output


def held_upload(base: str, release: threading.Event, seed: int) -> httpx.Response:
    """POST /predict whose body stops halfway until `release` is set (sent chunked)."""
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{seed}.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    body = head + png_bytes(seed) + f"\r\n--{BOUNDARY}--\r\n".encode()

    def chunks() -> Iterator[bytes]:
        yield body[: len(head) + 20]
        release.wait(WAIT)
        yield body[len(head) + 20 :]

    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    return httpx.post(f"{base}/predict", content=chunks(), headers=headers, timeout=2 * WAIT)


def test_sigterm_drains_in_flight_requests_and_refuses_new_ones(server):
    draining = server(CIFAR10_DRAIN_TIMEOUT_S="60", CIFAR10_RETRY_AFTER_S="2")
    proc, base = draining.proc, draining.url
    release = threading.Event()
    count = 4
    with ThreadPoolExecutor(count) as pool:
        try:
            in_flight = [pool.submit(held_upload, base, release, seed) for seed in range(count)]
            wait_for(lambda: metric(base, "cifar10_requests_in_flight") == count, "the uploads to start")
            proc.send_signal(signal.SIGTERM)

            # Readiness turns false first, while the socket still takes connections...
            wait_for(lambda: httpx.get(f"{base}/health/ready").status_code == 503, "readiness to turn 503")
            assert httpx.get(f"{base}/health/ready").json()["status"] == "draining"
            # ...and a new request is refused at once, with Retry-After.
            started = time.perf_counter()
            r = httpx.post(f"{base}/predict", files=[("file", ("new.png", png_bytes(9)))], timeout=WAIT)
            assert time.perf_counter() - started < 5.0
            assert r.status_code == 503 and r.headers["retry-after"] == "2"
            assert r.json()["code"] == "not_ready" and "shutting down" in r.json()["detail"]
            assert proc.poll() is None  # still draining: nothing in flight has been lost
        finally:
            release.set()
        answers = [future.result(2 * WAIT) for future in in_flight]
    assert [a.status_code for a in answers] == [200] * count
    proc.wait(timeout=WAIT)  # well within the drain timeout
    output = draining.output()
    # uvicorn re-raises the SIGTERM it handled once it has shut down cleanly (the POSIX convention),
    # so the status is -SIGTERM here; as a container's PID 1 the same process exits 0.
    assert proc.returncode in (0, -signal.SIGTERM), output
    assert "SIGTERM: draining" in output and "drained in" in output
    assert "Application shutdown complete" in output and "Traceback" not in output


def test_the_drain_timeout_bounds_the_wait_for_a_stuck_request(server):
    """A client that never finishes its upload delays the stop by the drain timeout, not forever
    (uvicorn's --timeout-graceful-shutdown then bounds the wait for the connection itself)."""
    stuck_server = server("--timeout-graceful-shutdown", "1", CIFAR10_DRAIN_TIMEOUT_S="1")
    proc, base = stuck_server.proc, stuck_server.url
    release = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        stuck = pool.submit(held_upload, base, release, 0)
        try:
            wait_for(lambda: metric(base, "cifar10_requests_in_flight") == 1, "the upload to start")
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=WAIT)
            assert time.monotonic() - started < 15.0
            output = stuck_server.output()
        finally:
            release.set()
        # uvicorn cancels the request when its own timeout passes: a plain-text 500, or a reset.
        with contextlib.suppress(httpx.HTTPError):
            assert stuck.result(2 * WAIT).status_code == 500
    assert "drain timeout (CIFAR10_DRAIN_TIMEOUT_S): 1 request(s) still in flight" in output
