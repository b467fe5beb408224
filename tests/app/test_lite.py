"""The small model served beside FinalModel: ?model=lite on /predict and /model/summary, its own
reload, its own metrics, and clear answers when it is not served or not a LiteModel."""

from __future__ import annotations

import io

import pytest
import torch
from fastapi.testclient import TestClient

from app import settings as settings_module
from app.checkpoint import file_sha256, save_checkpoint
from app.domain import StartupError
from app.imaging import read_upload
from app.loading import load_model
from app.main import create_app
from app.model import CLASSES, LiteModel
from app.settings import Settings

from .conftest import CHECKPOINT_META, distinct_model
from .helpers import json_body, value
from .images import png_bytes

ADMIN = {"Authorization": "Bearer s3cret"}


@pytest.fixture(scope="module")
def both(serve, lite_weights):
    with serve(lite_weights=lite_weights, admin_token="s3cret") as client:
        yield client


def expected_labels(weights, name: str, images: list[bytes]) -> list[str]:
    """What evaluation says: the checkpoint loaded outside the service, same predictor code."""
    batch = torch.stack([read_upload(io.BytesIO(image), 10**6) for image in images])
    probabilities = load_model(weights, torch.device("cpu"), name=name).probabilities(batch)
    return [CLASSES[i] for i in probabilities.argmax(1).tolist()]


def test_lite_answers_with_its_own_weights_and_final_stays_the_default(both, weights, lite_weights):
    images = [png_bytes(i) for i in range(6)]
    files = [("file", (f"{i}.png", image)) for i, image in enumerate(images)]
    lite = both.post("/predict", files=files, params={"model": "lite"})
    final = both.post("/predict", files=files)
    assert lite.status_code == 200 and final.status_code == 200, (lite.text, final.text)

    assert lite.json()["model"]["name"] == "LiteModel" and lite.json()["model"]["id"] == "lite"
    assert lite.json()["model"]["sha256"] == file_sha256(lite_weights)
    assert final.json()["model"]["name"] == "FinalModel" and final.json()["model"]["id"] == "final"
    assert final.json()["model"]["sha256"] == file_sha256(weights)
    assert [p["label"] for p in lite.json()["predictions"]] == expected_labels(lite_weights, "lite", images)
    assert [p["label"] for p in final.json()["predictions"]] == expected_labels(weights, "final", images)
    # Different networks with different weights: the probabilities cannot all agree.
    assert [p["top_k"] for p in lite.json()["predictions"]] != [
        p["top_k"] for p in final.json()["predictions"]
    ]


def test_the_summary_describes_the_model_asked_for(both):
    lite = both.get("/model/summary", params={"model": "lite"}).json()
    final = both.get("/model/summary").json()
    assert (lite["model"], lite["id"], lite["total_params"]) == ("LiteModel", "lite", 47_648)
    assert (final["model"], final["id"], final["total_params"]) == ("FinalModel", "final", 149_584)
    text = both.get("/model/summary", params={"model": "lite", "format": "text"}).text
    assert "Total params: 47,648" in text


@pytest.mark.parametrize("path", ["/predict", "/model/summary"])
def test_an_unknown_model_is_a_404_that_names_the_served_ones(both, path):
    if path == "/predict":
        r = both.post(path, files=[("file", ("a.png", png_bytes(0)))], params={"model": "huge"})
    else:
        r = both.get(path, params={"model": "huge"})
    assert r.status_code == 404, r.text
    assert r.json()["code"] == "model_not_found"
    assert "'huge'" in r.json()["detail"] and "'final', 'lite'" in r.json()["detail"]


def test_without_lite_weights_only_final_is_served(make_settings, tmp_path, monkeypatch):
    monkeypatch.setattr(settings_module, "SHIPPED_WEIGHTS", tmp_path)  # no lite_model.pt there
    settings = Settings(**make_settings().model_dump(exclude={"lite_weights"}))  # the default, unset
    assert settings.lite_weights is not None and "lite_weights" not in settings.model_fields_set
    with TestClient(create_app(settings)) as client:
        r = client.post("/predict", files=[("file", ("a.png", png_bytes(0)))], params={"model": "lite"})
        assert r.status_code == 404 and r.json()["code"] == "model_not_found"
        assert "'final'" in r.json()["detail"]
        assert client.get("/v2/models/lite").status_code == 404
        assert client.post("/predict", files=[("file", ("a.png", png_bytes(0)))]).status_code == 200


def test_lite_weights_set_on_purpose_must_exist(make_settings, tmp_path):
    settings = make_settings(lite_weights=tmp_path / "missing.pt")
    with (
        pytest.raises(StartupError, match=r"missing\.pt does not exist.*CIFAR10_LITE_WEIGHTS"),
        TestClient(create_app(settings)),
    ):
        pass


def test_a_finalmodel_file_is_refused_as_the_lite_model(make_settings, weights):
    with (
        pytest.raises(StartupError, match="holds a FinalModel, not LiteModel.*CIFAR10_LITE_WEIGHTS"),
        TestClient(create_app(make_settings(lite_weights=weights))),
    ):
        pass


def test_reload_swaps_only_the_model_named(serve, lite_weights, weights, tmp_path):
    other = tmp_path / "lite-2.pt"
    save_checkpoint(other, distinct_model(7, LiteModel), **CHECKPOINT_META)
    with serve(lite_weights=lite_weights, admin_token="s3cret") as client:
        r = client.post("/admin/reload", params={"model": "lite", "path": str(other)}, headers=ADMIN)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "lite" and r.json()["sha256"] == file_sha256(other)
        assert r.json()["previous_sha256"] == file_sha256(lite_weights)
        summary = client.get("/model/summary", params={"model": "lite"}).json()
        assert summary["sha256"] == file_sha256(other)
        assert client.get("/model/summary").json()["sha256"] == file_sha256(weights)

        # A FinalModel file is not a LiteModel: refused, and the lite model keeps serving.
        r = client.post("/admin/reload", params={"model": "lite", "path": str(weights)}, headers=ADMIN)
        assert r.status_code == 422 and "holds a FinalModel, not LiteModel" in r.json()["detail"]
        r = client.post("/predict", files=[("file", ("a.png", png_bytes(0)))], params={"model": "lite"})
        assert r.json()["model"]["sha256"] == file_sha256(other)

        r = client.post("/admin/reload", params={"model": "huge"}, headers=ADMIN)
        assert r.status_code == 404 and r.json()["code"] == "model_not_found"

        text = client.get("/metrics").text  # the outcomes are counted per model
        assert value(text, "cifar10_model_reloads_total", model="lite", outcome="swapped") == 1
        assert value(text, "cifar10_model_reloads_total", model="lite", outcome="refused") == 1
        assert value(text, "cifar10_model_reloads_total", model="final", outcome="swapped") == 0
        assert value(text, "cifar10_model_reloads_total", model="final", outcome="refused") == 0


def test_metrics_name_each_model(both):
    r = both.post("/predict", files=[("file", ("a.png", png_bytes(3)))], params={"model": "lite"})
    label = r.json()["predictions"][0]["label"]
    text = both.get("/metrics").text
    assert value(text, "cifar10_model_parameters", model="lite") == 47_648
    assert value(text, "cifar10_model_parameters", model="final") == 149_584
    assert value(text, "cifar10_predictions_total", model="lite", label=label) >= 1
    assert "cifar10_model_info{" in text and 'model="lite"' in text and 'name="LiteModel"' in text


def test_v2_serves_lite_with_the_same_labels_as_predict(both):
    images = [png_bytes(i) for i in range(4)]
    body = json_body(images)
    assert both.get("/v2/models/lite").json()["name"] == "lite"
    assert both.get("/v2/models/lite/ready").json() == {"name": "lite", "ready": True}
    r = both.post("/v2/models/lite/infer", json=body)
    assert r.status_code == 200, r.text
    labels = next(o["data"] for o in r.json()["outputs"] if o["name"] == "label")
    files = [("file", (f"{i}.png", image)) for i, image in enumerate(images)]
    predicted = both.post("/predict", files=files, params={"model": "lite"}).json()["predictions"]
    assert labels == [p["label"] for p in predicted]
