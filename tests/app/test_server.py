"""`uvicorn app.main:app` as a user starts it: a real process, real sockets, environment settings."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx

from .conftest import REPO
from .images import jpeg_bytes

STARTUP_TIMEOUT = 90.0  # importing torch on a busy two-core machine can take a while


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def uvicorn(port: int, *args: str, **env: str) -> subprocess.Popen:
    """`uvicorn app.main:app` on loopback `port`, with extra command-line `args` and environment `env`."""
    environment = {**os.environ, "PYTHONPATH": str(REPO), **env}
    command = [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)]
    command += args
    return subprocess.Popen(
        command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_uvicorn_serves_the_app_configured_from_the_environment(weights):
    port = free_port()
    proc = uvicorn(port, CIFAR10_WEIGHTS=str(weights), CIFAR10_DEVICE="cpu", CIFAR10_TOP_K="2")
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{base}/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        r = httpx.post(
            f"{base}/predict", files=[("file", ("cat.jpg", jpeg_bytes(1), "image/jpeg"))], timeout=30
        )
        assert r.status_code == 200, r.text
        assert len(r.json()["predictions"][0]["top_k"]) == 2  # CIFAR10_TOP_K reached the app
    finally:
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output
    assert "serving FinalModel" in output and "on device cpu" in output


def test_uvicorn_exits_nonzero_with_one_clear_line_when_weights_are_missing(tmp_path):
    missing = tmp_path / "missing.pt"
    proc = uvicorn(free_port(), CIFAR10_WEIGHTS=str(missing), CIFAR10_DEVICE="cpu")
    output, _ = proc.communicate(timeout=STARTUP_TIMEOUT)
    assert proc.returncode != 0
    [line] = [line for line in output.splitlines() if "cannot start the service" in line]
    assert str(missing) in line and "does not exist" in line
    assert "Traceback" not in output


def test_an_invalid_setting_stops_the_server_naming_the_variable():
    proc = uvicorn(free_port(), CIFAR10_MAX_BATCH_SIZE="lots")
    output, _ = proc.communicate(timeout=STARTUP_TIMEOUT)
    assert proc.returncode != 0
    assert "CIFAR10_MAX_BATCH_SIZE" in output
    assert "Traceback" not in output
