"""Fixtures for the service tests: a checkpoint made here, settings, and running apps.

The checkpoint holds a FinalModel initialised with a fixed seed, its BatchNorm statistics
measured on smooth random images and its classifier scaled up, so that different images get
different labels (a freshly initialised model gives every image the same answer).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from app.checkpoint import save_checkpoint
from app.main import create_app
from app.model import AirbenchNet, FinalModel, LiteModel
from app.predictor import Forward, Predictor, build_predictor
from app.preprocess import normalize
from app.settings import ENV_PREFIX, Settings

from ..tiny import smooth_images

REPO = Path(__file__).resolve().parents[2]

CHECKPOINT_META = {
    "metrics": {"test_acc": 0.5, "train_acc": 0.4},
    "epoch": 3,
    "created_at": "2024-05-01T12:00:00+00:00",
    "config": {"epochs": 3, "dropout": 0.05},
}


# A small AirbenchNet (the served `best` model's network) for quick tests: its shape is in the checkpoint.
SMALL_AIRBENCH = {"widths": [8, 16, 16], "depth": 3, "bn_momentum": 0.1}


def distinct_model(
    seed: int = 0, architecture: type[torch.nn.Module] = FinalModel, **arch
) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = architecture(**arch)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.reset_running_stats()
                module.momentum = None  # a plain average over the calibration batch
        model.train()
        model(normalize(smooth_images(64, seed)))
        model.eval()
        model.fc.weight.mul_(20)
    return model


class HookedPredictor(Predictor):
    """The configured predictor for a model, with a hook a test sets: `on_forward()` runs at the start
    of every forward pass while it is set (to hold a batch, to swap the model...), and `calls`
    records the batch sizes it saw meanwhile."""

    def __init__(self, inner: Predictor) -> None:
        self.inner = inner
        self.info = inner.info
        self.on_forward: Callable[[], None] | None = None
        self.calls: list[int] = []

    def forward(self, images: torch.Tensor, stats: bool = True, fmap: bool = False) -> Forward:
        hook = self.on_forward
        if hook is not None:
            self.calls.append(len(images))
            hook()
        return self.inner.forward(images, stats, fmap)


class HookedPredictors(list):
    """A predictor factory for `create_app` that keeps every HookedPredictor it made, newest last."""

    def __call__(self, model: torch.nn.Module, device: torch.device) -> Predictor:
        self.append(HookedPredictor(build_predictor(model, device, threads=1)))
        return self[-1]


@pytest.fixture(autouse=True)
def no_service_environment(monkeypatch):
    """Tests set what they need; CIFAR10_* variables of the shell running pytest must not leak in."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "model.pt"
    save_checkpoint(path, distinct_model(), **CHECKPOINT_META)
    return path


@pytest.fixture(scope="session")
def lite_weights(tmp_path_factory) -> Path:
    """A LiteModel checkpoint, for the service's second model."""
    path = tmp_path_factory.mktemp("weights") / "lite.pt"
    save_checkpoint(path, distinct_model(1, LiteModel), **CHECKPOINT_META)
    return path


@pytest.fixture(scope="session")
def best_weights(tmp_path_factory) -> Path:
    """A small AirbenchNet checkpoint, for the service's third model, `best`."""
    path = tmp_path_factory.mktemp("weights") / "best.pt"
    save_checkpoint(
        path, distinct_model(2, AirbenchNet, **SMALL_AIRBENCH), arch=SMALL_AIRBENCH, **CHECKPOINT_META
    )
    return path


@pytest.fixture(scope="session")
def make_settings(weights):
    """Settings for a small, quick service on the CPU; keyword arguments override."""

    def make(**overrides) -> Settings:
        values = dict(
            weights=weights,
            lite_weights=None,  # tests that serve the small model set it
            best_weights=None,  # and the best model
            device="cpu",
            workers=1,
            torch_threads=1,
            decode_threads=2,
            max_batch_size=8,
            max_wait_ms=5.0,
        )
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture(scope="session")
def serve(make_settings):
    """serve(**overrides) -> context manager yielding a TestClient with the lifespan running;
    `make_predictor=` hands the service a predictor factory of the test's own."""

    @contextlib.contextmanager
    def run(make_predictor=None, **overrides) -> Iterator[TestClient]:
        with TestClient(create_app(make_settings(**overrides), make_predictor)) as client:
            yield client

    return run


@pytest.fixture(scope="module")
def client(serve) -> Iterator[TestClient]:
    """One running service shared by a module's read-mostly tests."""
    with serve(workers=2) as client:
        yield client
