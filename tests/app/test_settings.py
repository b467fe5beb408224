"""Settings from CIFAR10_* variables, and how the device and the thread counts are chosen."""

from __future__ import annotations

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.device import resolve_device
from app.domain import StartupError
from app.main import create_app, settings_from_env
from app.settings import Settings, available_cpus

from .conftest import REPO
from .images import blobs, encode, png_bytes


def test_settings_come_from_prefixed_environment_variables(monkeypatch):
    monkeypatch.setenv("CIFAR10_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("CIFAR10_BATCHING", "false")
    monkeypatch.setenv("CIFAR10_WEIGHTS", "elsewhere/model.pt")
    monkeypatch.setenv("MAX_WAIT_MS", "999")  # no prefix: not ours
    s = Settings()
    assert s.max_batch_size == 7 and s.batching is False
    assert str(s.weights) == "elsewhere/model.pt"
    assert s.max_wait_ms == 5.0


def test_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the shipped weights are found wherever the service starts
    s = Settings()
    assert s.weights == REPO / "weights" / "final_model.pt" and s.weights.is_file()
    assert s.lite_weights == REPO / "weights" / "lite_model.pt"
    assert s.device == "auto" and s.batching is True and s.top_k == 3


def test_a_bad_variable_is_reported_by_its_name(monkeypatch):
    monkeypatch.setenv("CIFAR10_MAX_FILES", "0")
    with pytest.raises(SystemExit, match="CIFAR10_MAX_FILES"):
        settings_from_env()


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "tpu"])
def test_unknown_devices_are_refused(device):
    with pytest.raises(ValidationError):
        Settings(device=device)


def test_settings_that_contradict_each_other_are_refused():
    with pytest.raises(ValidationError, match="max_queue_size"):
        Settings(max_files=64, max_queue_size=16)


def test_module_level_app_is_what_uvicorn_imports():
    import app.main

    assert isinstance(app.main.app, FastAPI)


def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto").type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("app.device.mps_available", lambda: True)
    assert resolve_device("auto").type == "mps"
    monkeypatch.setattr("app.device.mps_available", lambda: False)
    assert resolve_device("auto").type == "cpu"


def test_auto_serves_on_the_cpu_when_nothing_else_is_there(monkeypatch, make_settings):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("app.device.mps_available", lambda: False)
    with TestClient(create_app(make_settings(device="auto"))) as client:
        assert client.get("/model/summary").json()["device"] == "cpu"
        r = client.post("/predict", files=[("file", ("a.bmp", encode(blobs(0), "BMP")))])
        assert r.json()["model"]["device"] == "cpu"


def test_asking_for_an_absent_gpu_stops_startup_clearly(monkeypatch, make_settings):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with (
        pytest.raises(StartupError, match="CUDA is not available.*CIFAR10_DEVICE"),
        TestClient(create_app(make_settings(device="cuda"))),
    ):
        pass


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_serving_on_cuda_gives_the_cpu_answers(make_settings):
    files = [("file", (f"{i}.png", png_bytes(i))) for i in range(4)]
    answers = {}
    for device in ("cpu", "cuda"):
        with TestClient(create_app(make_settings(device=device))) as client:
            r = client.post("/predict", files=files, params={"top_k": 10})
            assert r.json()["model"]["device"].startswith(device)
            answers[device] = r.json()["predictions"]
    for cpu, gpu in zip(answers["cpu"], answers["cuda"], strict=True):
        assert cpu["label"] == gpu["label"]
        assert cpu["confidence"] == pytest.approx(gpu["confidence"], abs=1e-4)


def test_thread_counts_follow_the_cores():
    cores = available_cpus()
    s = Settings()
    assert s.resolved_workers("cpu") == cores  # one single-threaded model worker per core
    assert s.resolved_torch_threads("cpu") == 1
    assert s.resolved_workers("cuda") == 1
    one = Settings(workers=1)
    assert one.resolved_torch_threads("cpu") == cores  # one worker gets every core
    assert Settings(torch_threads=3).resolved_torch_threads("cpu") == 3
    assert Settings().resolved_decode_threads() == cores
