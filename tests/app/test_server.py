"""`uvicorn app.main:app` as a user starts it: a real process, real sockets, environment settings."""

from __future__ import annotations

import httpx
import pytest

from app import launch

from .conftest import REPO
from .images import jpeg_bytes

pytestmark = pytest.mark.slow  # a real server or subprocess: .ci/run runs these (pytest -m slow)


def test_uvicorn_serves_the_app_configured_from_the_environment(weights):
    env = {"CIFAR10_WEIGHTS": str(weights), "CIFAR10_DEVICE": "cpu", "CIFAR10_TOP_K": "2"}
    with launch.running(env, cwd=REPO) as server:
        r = httpx.post(
            f"{server.url}/predict", files=[("file", ("cat.jpg", jpeg_bytes(1), "image/jpeg"))], timeout=30
        )
        assert r.status_code == 200, r.text
        assert len(r.json()["predictions"][0]["top_k"]) == 2  # CIFAR10_TOP_K reached the app
        returncode = server.stop()  # SIGINT
        output = server.output()
    assert returncode == 0, output
    assert "serving FinalModel" in output and "on device cpu" in output


def failed_start(**env: str) -> launch.NotReady:
    with pytest.raises(launch.NotReady) as failure, launch.running(env, cwd=REPO):
        pass
    assert failure.value.returncode not in (0, None)  # it exited, and said so in its status
    return failure.value


def test_uvicorn_exits_nonzero_with_one_clear_line_when_weights_are_missing(tmp_path):
    missing = tmp_path / "missing.pt"
    output = failed_start(CIFAR10_WEIGHTS=str(missing), CIFAR10_DEVICE="cpu").output
    [line] = [line for line in output.splitlines() if "cannot start the service" in line]
    assert str(missing) in line and "does not exist" in line
    assert "Traceback" not in output


def test_an_invalid_setting_stops_the_server_naming_the_variable():
    output = failed_start(CIFAR10_MAX_BATCH_SIZE="lots").output
    assert "CIFAR10_MAX_BATCH_SIZE" in output
    assert "Traceback" not in output


def test_the_command_serves_the_shipped_weights_from_any_folder(tmp_path):
    """`cifar10-cnn serve` started in an empty folder finds the shipped weights beside the package."""
    with launch.running({"CIFAR10_DEVICE": "cpu"}, cli=True, cwd=tmp_path) as server:
        r = httpx.post(
            f"{server.url}/predict", files=[("file", ("cat.jpg", jpeg_bytes(1), "image/jpeg"))], timeout=30
        )
        summary = httpx.get(f"{server.url}/model/summary", timeout=30).json()
    assert r.status_code == 200, r.text
    assert summary["total_params"] == 149_584 and summary["weights_file"] == "final_model.pt"
    assert list(tmp_path.iterdir()) == []  # and wrote nothing there
