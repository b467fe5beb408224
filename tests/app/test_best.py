"""The most accurate model, `best` (an AirbenchNet), served beside FinalModel and LiteModel on every
surface: /predict, /model/summary, /v2, reload, metrics; refused when the file holds another network."""

from __future__ import annotations

import io

import pytest
import torch
from fastapi.testclient import TestClient

from app.checkpoint import file_sha256, save_checkpoint
from app.domain import StartupError
from app.imaging import read_upload
from app.loading import load_model
from app.main import create_app
from app.model import CLASSES, AirbenchNet

from .conftest import CHECKPOINT_META, SMALL_AIRBENCH, distinct_model
from .helpers import json_body, value
from .images import png_bytes

ADMIN = {"Authorization": "Bearer s3cret"}


@pytest.fixture(scope="module")
def three(serve, lite_weights, best_weights):
    with serve(lite_weights=lite_weights, best_weights=best_weights, admin_token="s3cret") as client:
        yield client


def labels_outside_the_service(weights, images: list[bytes]) -> list[str]:
    batch = torch.stack([read_upload(io.BytesIO(image), 10**6) for image in images])
    probabilities = load_model(weights, torch.device("cpu"), name="best").probabilities(batch)
    return [CLASSES[i] for i in probabilities.argmax(1).tolist()]


def test_best_answers_with_its_own_weights(three, best_weights):
    images = [png_bytes(i) for i in range(6)]
    files = [("file", (f"{i}.png", image)) for i, image in enumerate(images)]
    r = three.post("/predict", files=files, params={"model": "best"})
    assert r.status_code == 200, r.text
    assert r.json()["model"]["name"] == "AirbenchNet" and r.json()["model"]["id"] == "best"
    assert r.json()["model"]["sha256"] == file_sha256(best_weights)
    assert [p["label"] for p in r.json()["predictions"]] == labels_outside_the_service(best_weights, images)
    assert three.post("/predict", files=files).json()["model"]["id"] == "final"  # still the default


def test_the_summary_of_best_is_built_from_the_shape_its_checkpoint_records(three):
    summary = three.get("/model/summary", params={"model": "best"}).json()
    expected = sum(p.numel() for p in AirbenchNet(**SMALL_AIRBENCH).parameters())
    assert (summary["model"], summary["id"], summary["total_params"]) == ("AirbenchNet", "best", expected)
    text = three.get("/model/summary", params={"model": "best", "format": "text"}).text
    assert f"Total params: {expected:,}" in text


def test_v2_lists_and_serves_best(three):
    images = [png_bytes(i) for i in range(3)]
    body = json_body(images)
    assert three.get("/v2/models/best/ready").json() == {"name": "best", "ready": True}
    r = three.post("/v2/models/best/infer", json=body)
    assert r.status_code == 200, r.text
    labels = next(o["data"] for o in r.json()["outputs"] if o["name"] == "label")
    files = [("file", (f"{i}.png", image)) for i, image in enumerate(images)]
    predicted = three.post("/predict", files=files, params={"model": "best"}).json()["predictions"]
    assert labels == [p["label"] for p in predicted]


def test_an_unknown_model_names_all_three(three):
    r = three.post("/predict", files=[("file", ("a.png", png_bytes(0)))], params={"model": "huge"})
    assert r.status_code == 404 and "'final', 'lite', 'best'" in r.json()["detail"]


def test_reload_best_and_its_metrics(three, best_weights, weights, tmp_path):
    other = tmp_path / "best-2.pt"
    save_checkpoint(
        other, distinct_model(9, AirbenchNet, **SMALL_AIRBENCH), arch=SMALL_AIRBENCH, **CHECKPOINT_META
    )
    r = three.post("/admin/reload", params={"model": "best", "path": str(other)}, headers=ADMIN)
    assert r.status_code == 200 and r.json()["sha256"] == file_sha256(other), r.text
    r = three.post("/admin/reload", params={"model": "best", "path": str(weights)}, headers=ADMIN)
    assert r.status_code == 422 and "holds a FinalModel, not AirbenchNet" in r.json()["detail"]
    r = three.post("/admin/reload", params={"model": "best", "path": str(best_weights)}, headers=ADMIN)
    assert r.status_code == 200
    text = three.get("/metrics").text
    assert value(text, "cifar10_model_reloads_total", model="best", outcome="swapped") == 2
    assert value(text, "cifar10_model_reloads_total", model="best", outcome="refused") == 1


def test_a_best_file_with_an_unusable_shape_is_refused_at_startup(make_settings, tmp_path):
    path = tmp_path / "bad.pt"
    model = distinct_model(3, AirbenchNet, **SMALL_AIRBENCH)
    save_checkpoint(path, model, arch={**SMALL_AIRBENCH, "depth": 7}, **CHECKPOINT_META)
    with (
        pytest.raises(StartupError, match="unusable AirbenchNet shape.*CIFAR10_BEST_WEIGHTS"),
        TestClient(create_app(make_settings(best_weights=path))),
    ):
        pass
