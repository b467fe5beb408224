"""Probes and startup: ready only after load and warm-up, a clear stop on bad weights."""

from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient

from app.domain import StartupError
from app.main import create_app

from .images import png_bytes


def test_live_and_ready_once_started(client, weights):
    live = client.get("/health/live").json()
    assert live["status"] == "alive"
    assert live["model_sha256"] == client.get("/model/summary").json()["sha256"]  # once loaded
    r = client.get("/health/ready")
    assert r.status_code == 200
    assert r.json()["status"] == "ready"
    assert r.json()["model_sha256"] == client.get("/model/summary").json()["sha256"]


def test_before_startup_only_liveness_answers(make_settings):
    """Without the lifespan (the model not loaded yet) every model route answers 503 + Retry-After."""
    client = TestClient(create_app(make_settings(retry_after_s=2)))  # not entered: no lifespan
    assert client.get("/health/live").json() == {"status": "alive", "model_sha256": None}
    r = client.get("/health/ready")
    assert r.status_code == 503 and r.json()["status"] == "starting"
    r = client.post("/predict", files=[("file", ("a.png", png_bytes(0)))])
    assert r.status_code == 503
    assert r.json()["code"] == "not_ready"
    assert r.headers["retry-after"] == "2"
    assert client.get("/model/summary").status_code == 503


def test_after_shutdown_ready_turns_503(make_settings):
    app = create_app(make_settings())
    with TestClient(app) as client:
        assert client.get("/health/ready").status_code == 200
    assert TestClient(app).get("/health/ready").json()["status"] == "stopping"


@pytest.mark.parametrize(
    ("backend", "named"),
    [
        ("onnxruntime", "backend onnxruntime, precision fp32, 1 thread(s)"),
        ("pytorch", "backend pytorch, precision fp32, layout channels_last, 1 thread(s)"),
    ],
)
def test_startup_logs_the_device_backend_and_warm_up(make_settings, caplog, backend, named):
    caplog.set_level(logging.INFO, logger="app")
    with TestClient(create_app(make_settings(backend=backend))):
        pass
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("serving FinalModel")]
    assert "on device cpu, " + named in line
    assert "warm-up took" in line and "test accuracy 50.00%" in line


def test_missing_weights_stop_startup_with_one_sentence(make_settings, tmp_path):
    missing = tmp_path / "nowhere.pt"
    with (
        pytest.raises(StartupError, match="does not exist") as info,
        TestClient(create_app(make_settings(weights=missing))),
    ):
        pass
    assert str(missing) in str(info.value) and "CIFAR10_WEIGHTS" in str(info.value)
    assert "\n" not in str(info.value)


def test_damaged_weights_stop_startup(make_settings, tmp_path):
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(b"not a checkpoint at all" * 100)
    with pytest.raises(StartupError, match="damaged"), TestClient(create_app(make_settings(weights=damaged))):
        pass


def test_weights_of_another_model_stop_startup(make_settings, tmp_path):
    import torch

    other = tmp_path / "other.pt"
    torch.save({"layer.weight": torch.zeros(3, 3)}, other)
    with (
        pytest.raises(StartupError, match="does not fit FinalModel"),
        TestClient(create_app(make_settings(weights=other))),
    ):
        pass
