"""POST /admin/reload: new weights swap in between batches; bad files are refused; the token guards it."""

from __future__ import annotations

import io
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from app.checkpoint import FORMAT, file_sha256
from app.imaging import read_upload
from app.loading import load_model
from app.model import CLASSES

from .conftest import HookedPredictors
from .helpers import metric, variant
from .images import png_bytes

TOKEN = "s3cret-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
WAIT = 30.0


@pytest.fixture(scope="module")
def other_weights(weights, tmp_path_factory) -> Path:
    """A second checkpoint: the classifier flipped, so other predictions, and another created_at."""
    path = tmp_path_factory.mktemp("other") / "other.pt"
    return variant(weights, path, lambda m: m.fc.weight.mul_(-0.5), created_at="2025-01-02T03:04:05+00:00")


def expected_probabilities(weights: Path, *seeds: int) -> list[list[float]]:
    """What the model in `weights` says about png_bytes(seed) for each seed, without the service."""
    images = torch.stack([read_upload(io.BytesIO(png_bytes(seed)), 10**6) for seed in seeds])
    return load_model(weights, torch.device("cpu")).probabilities(images).tolist()


def top_probabilities(prediction: dict) -> dict[str, float]:
    return {c["label"]: c["probability"] for c in prediction["top_k"]}


def matches(prediction: dict, probabilities: list[float]) -> bool:
    return all(
        abs(p - probabilities[CLASSES.index(label)]) < 1e-4
        for label, p in top_probabilities(prediction).items()
    )


def predict(client, *seeds: int):
    return client.post("/predict", files=[("file", (f"{s}.png", png_bytes(s))) for s in seeds])


def test_a_good_file_swaps_in_and_predictions_follow_it(serve, weights, other_weights):
    with serve(admin_token=TOKEN) as client:
        before = client.get("/model/summary").json()
        assert before["sha256"] == file_sha256(weights)
        assert matches(predict(client, 7).json()["predictions"][0], expected_probabilities(weights, 7)[0])

        r = client.post("/admin/reload", json={"path": str(other_weights)}, headers=AUTH)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["sha256"] == file_sha256(other_weights) != body["previous_sha256"] == before["sha256"]
        assert body["changed"] is True
        assert body["trained_at"] == "2025-01-02T03:04:05+00:00"

        after = client.get("/model/summary").json()
        assert after["sha256"] == file_sha256(other_weights)
        assert after["checkpoint"]["created_at"] == "2025-01-02T03:04:05+00:00"
        assert client.get("/health/ready").json()["model_sha256"] == after["sha256"]
        answer = predict(client, 7).json()
        assert answer["model"]["sha256"] == after["sha256"]
        assert matches(answer["predictions"][0], expected_probabilities(other_weights, 7)[0])
        assert not matches(answer["predictions"][0], expected_probabilities(weights, 7)[0])

        text = client.get("/metrics").text
        assert metric(text, 'cifar10_model_reloads_total{model="final",outcome="swapped"}') == 1
        assert f'sha256="{after["sha256"]}"' in text and 'trained_at="2025-01-02T03:04:05+00:00"' in text

        # No path: the configured file, in the query or not at all.
        r = client.post("/admin/reload", headers=AUTH)
        assert r.status_code == 200 and r.json()["sha256"] == before["sha256"]
        r = client.post("/admin/reload", params={"path": str(other_weights)}, headers=AUTH)
        assert r.status_code == 200 and r.json()["sha256"] == after["sha256"]


def write_pickle_bomb(path: Path, marker: Path) -> None:
    class Bomb:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"format": FORMAT, "model": "FinalModel", "state_dict": {}, "payload": Bomb()}, path)


def bad_files(weights: Path, tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, a phrase its refusal must contain)."""
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(b"not a checkpoint" * 64)
    other_model = tmp_path / "other_model.pt"
    torch.save({"layer.weight": torch.zeros(3, 3)}, other_model)
    nan = variant(weights, tmp_path / "nan.pt", lambda m: m.fc.weight[0].fill_(float("nan")))
    # Finite weights whose logits overflow to infinity: only the test forward pass catches them.
    exploding = variant(weights, tmp_path / "exploding.pt", lambda m: m.fc.weight.fill_(3e38))
    pickled = tmp_path / "pickled.pt"
    write_pickle_bomb(pickled, tmp_path / "pwned")
    return {
        "missing": (tmp_path / "missing.pt", "does not exist"),
        "damaged": (damaged, "damaged"),
        "other_model": (other_model, "does not fit FinalModel"),
        "nan": (nan, "NaN or infinite"),
        "exploding": (exploding, "test forward pass"),
        "pickled": (pickled, "GLOBAL posix.system"),  # the blocked global is named
    }


def test_a_bad_file_is_refused_and_the_old_weights_keep_serving(serve, weights, tmp_path):
    with serve(admin_token=TOKEN) as client:
        live = file_sha256(weights)
        for name, (path, phrase) in bad_files(weights, tmp_path).items():
            r = client.post("/admin/reload", json={"path": str(path)}, headers=AUTH)
            assert r.status_code == 422, (name, r.text)
            assert r.json()["code"] == "invalid_weights"
            assert phrase in r.json()["detail"] and str(path) in r.json()["detail"], name
            assert "old weights keep serving" in r.json()["detail"]
            answer = predict(client, 3)
            assert answer.status_code == 200 and answer.json()["model"]["sha256"] == live, name
        assert not (tmp_path / "pwned").exists()  # weights_only=True: the pickle never ran
        assert client.get("/model/summary").json()["sha256"] == live
        text = client.get("/metrics").text
        assert metric(text, 'cifar10_model_reloads_total{model="final",outcome="refused"}') == 6
        assert metric(text, 'cifar10_model_reloads_total{model="final",outcome="swapped"}') == 0


def test_reload_needs_the_admin_token(serve, other_weights):
    body = {"path": str(other_weights)}
    with serve(admin_token=TOKEN) as client:
        live = client.get("/model/summary").json()["sha256"]
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
            r = client.post("/admin/reload", json=body, headers=headers)
            assert r.status_code == 401, headers
            assert r.json()["code"] == "unauthorized"
            assert r.headers["www-authenticate"] == "Bearer"
        assert client.get("/model/summary").json()["sha256"] == live


def test_reload_is_disabled_without_an_admin_token(client, other_weights):
    r = client.post("/admin/reload", json={"path": str(other_weights)}, headers=AUTH)
    assert r.status_code == 403
    assert r.json()["code"] == "admin_disabled" and "CIFAR10_ADMIN_TOKEN" in r.json()["detail"]


def test_the_path_is_given_once(serve, weights, other_weights):
    with serve(admin_token=TOKEN) as client:
        r = client.post(
            "/admin/reload", params={"path": str(weights)}, json={"path": str(other_weights)}, headers=AUTH
        )
        assert r.status_code == 422 and r.json()["code"] == "invalid_request"


def test_a_misspelt_query_parameter_reloads_nothing(serve, other_weights):
    with serve(admin_token=TOKEN) as client:
        live = client.get("/model/summary").json()["sha256"]
        r = client.post("/admin/reload", params={"paht": str(other_weights)}, headers=AUTH)
        assert r.status_code == 422 and "unknown query parameter 'paht'" in r.json()["detail"]
        assert client.get("/model/summary").json()["sha256"] == live


def test_no_request_fails_or_mixes_weights_while_weights_swap(serve, weights, other_weights):
    """Clients post 3-image requests (batches of 2, so a request spans batches) while the weights
    swap back and forth: every answer is a 200 whose every image was classified by the weights its
    `model.sha256` names."""
    seeds = (11, 12, 13)
    expected = {file_sha256(path): expected_probabilities(path, *seeds) for path in (weights, other_weights)}
    with serve(admin_token=TOKEN, workers=2, max_batch_size=2, warmup=False) as client:
        stop = threading.Event()

        def hammer() -> list:
            answers = []
            while not stop.is_set() or len(answers) < 3:
                answers.append(predict(client, *seeds))
            return answers

        with ThreadPoolExecutor(3) as pool:
            running = [pool.submit(hammer) for _ in range(3)]
            for i in range(4):
                path = other_weights if i % 2 == 0 else weights
                r = client.post("/admin/reload", json={"path": str(path)}, headers=AUTH)
                assert r.status_code == 200, r.text
            stop.set()
            answers = [a for future in running for a in future.result(WAIT)]
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200]
    served = {a.json()["model"]["sha256"] for a in answers}
    assert served <= set(expected)
    for answer in answers:
        body = answer.json()
        for prediction, probabilities in zip(
            body["predictions"], expected[body["model"]["sha256"]], strict=True
        ):
            assert matches(prediction, probabilities)


def test_a_request_split_across_a_swap_is_answered_by_the_new_weights_alone(serve, other_weights):
    """A reload lands during the first of a request's two batches (the first forward pass swaps)."""
    predictors = HookedPredictors()
    with serve(predictors, workers=1, max_batch_size=1, warmup=False) as client:
        service = client.app.state.service
        [swapping] = predictors
        new = load_model(other_weights, torch.device("cpu"))

        def swap_once() -> None:
            swapping.on_forward = None
            service.swap(new)

        swapping.on_forward = swap_once
        answer = predict(client, 21, 22)
        assert answer.status_code == 200
        assert swapping.calls == [1]  # image 1 on the old weights, then the swap
        body = answer.json()
        assert body["model"]["sha256"] == new.sha256
        expected = expected_probabilities(other_weights, 21, 22)
        for prediction, probabilities in zip(body["predictions"], expected, strict=True):
            assert matches(prediction, probabilities)
