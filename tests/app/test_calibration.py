"""Calibrated confidence, the unsure flag and heatmaps: the pieces, and the service answering with
them (/predict, its fast path, /v2, the summary), and nothing extra computed unless asked."""

from __future__ import annotations

import io

import pytest
import torch
from fastapi.testclient import TestClient

from app.calibration import KEEP, Calibration, Detector, expected_calibration_error, stage_statistics
from app.checkpoint import build_model, load_checkpoint, save_checkpoint
from app.domain import StartupError
from app.explain import heatmaps
from app.imaging import read_upload
from app.main import create_app
from app.model import FinalModel
from app.preprocess import normalize
from training.calibrate import fit_detector, fit_temperature, stage_sizes

from ..tiny import smooth_images
from .conftest import CHECKPOINT_META, HookedPredictors, distinct_model
from .helpers import json_body
from .images import png_bytes


def test_the_fitted_temperature_undoes_a_known_overconfidence():
    g = torch.Generator().manual_seed(0)
    honest = torch.randn(20_000, 10, generator=g) * 2
    labels = torch.multinomial(torch.softmax(honest, 1), 1, generator=g).flatten()
    overconfident = honest * 3  # the same ranking, three times too sure
    assert abs(fit_temperature(overconfident, labels) - 3.0) < 0.15
    before = expected_calibration_error(torch.softmax(overconfident, 1), labels)
    after = expected_calibration_error(torch.softmax(overconfident / 3, 1), labels)
    assert before > 0.15 and after < 0.02


def test_the_detector_keeps_its_share_of_the_validation_images_and_flags_far_ones():
    g = torch.Generator().manual_seed(1)
    fit, val = torch.randn(4000, 6, generator=g), torch.randn(4000, 6, generator=g)
    detector = fit_detector(fit, val, sizes=[4, 2])
    kept = (detector.score(val) <= detector.threshold).float().mean()
    assert abs(kept - KEEP) < 0.002
    far = torch.randn(100, 6, generator=g)
    far[:, 4:] += 8  # only the second stage's statistics are off
    assert (detector.score(far) > detector.threshold).all()
    restored = Detector.from_meta(detector.to_meta())
    assert torch.equal(restored.score(far), detector.score(far))


def test_a_checkpoint_without_calibration_gets_temperature_one_and_no_detector():
    calibration = Calibration.from_meta({"metrics": {}})
    assert calibration.temperature == 1.0 and calibration.detector is None
    with pytest.raises(ValueError, match="not positive"):
        Calibration.from_meta({"calibration": {"temperature": -1.0}})


def test_cam_is_exact_its_mean_over_the_map_is_the_logit():
    model = distinct_model(0).eval()
    x = normalize(
        torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    )
    with torch.no_grad():
        maps, _, logits = model.forward_stages(x)
    cam = torch.einsum("nchw,kc->nkhw", maps[-1], model.class_weights())
    assert torch.allclose(cam.mean((2, 3)), logits, atol=1e-4)


def test_a_heatmap_lies_over_the_pixels_its_map_cell_sees():
    model = FinalModel().eval()
    fmap = torch.zeros(1, 256, 20, 20)
    fmap[0, :, 3, 15] = 1.0  # evidence in one cell of the 20x20 map
    with torch.no_grad():
        model.fc.weight.fill_(1.0)
    heat = heatmaps(model, fmap, torch.tensor([0]))
    assert heat.shape == (1, 32, 32) and float(heat.max()) == 1.0 and float(heat.min()) == 0.0
    assert (heat[0] == 1.0).nonzero().tolist() == [[3 + 6, 15 + 6]]  # map cell i sits over pixel i + 6


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, weights):
    """The test checkpoint with a temperature of 2 and a detector fitted on smooth random images."""
    model = build_model(load_checkpoint(weights)).eval()
    images = smooth_images(600, seed=3)
    with torch.no_grad():
        maps, pooled, _ = model.forward_stages(normalize(images))
    stats = stage_statistics(maps, pooled)
    detector = fit_detector(stats[:400], stats[400:], stage_sizes(model, torch.device("cpu")))
    path = tmp_path_factory.mktemp("calibrated") / "model.pt"
    save_checkpoint(path, model, **CHECKPOINT_META, calibration={"temperature": 2.0}, ood=detector.to_meta())
    return path


def noise_png(seed: int) -> bytes:
    from PIL import Image

    pixels = torch.randint(
        0, 256, (32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, "PNG")
    return buffer.getvalue()


def test_the_service_answers_with_the_checkpoints_temperature_and_flags(serve, calibrated):
    images = [png_bytes(5), noise_png(0)]
    with serve(weights=calibrated) as client:
        r = client.post("/predict", files=[("file", (f"{i}.png", b)) for i, b in enumerate(images)])
        summary = client.get("/model/summary").json()
    assert r.status_code == 200, r.text
    model = build_model(load_checkpoint(calibrated)).eval()
    batch = torch.stack([read_upload(io.BytesIO(b), 10**6) for b in images])
    with torch.no_grad():
        expected = torch.softmax(model(normalize(batch)) / 2.0, 1)
    for p, row in zip(r.json()["predictions"], expected, strict=True):
        assert p["confidence"] == pytest.approx(float(row.max()), abs=1e-5)
        assert "heatmap" not in p  # not asked for
    assert [p["unsure"] for p in r.json()["predictions"]] == [False, True]
    assert r.json()["predictions"][1]["ood_score"] > summary["calibration"]["ood_threshold"]
    assert summary["calibration"] | {"ood_threshold": None} == {
        "temperature": 2.0, "calibrated": True, "unsure_detector": True,
        "ood_threshold": None, "explain": "cam",
    }  # fmt: skip
    assert summary["checkpoint"]["ood"]["means"][0].startswith("tensor [")  # tensors shown as shapes


def test_without_calibration_predictions_say_so_with_nulls(client):
    p = client.post("/predict", files=[("file", ("a.png", png_bytes(1)))]).json()["predictions"][0]
    assert p["unsure"] is None and p["ood_score"] is None
    summary = client.get("/model/summary").json()["calibration"]
    assert summary == {"temperature": 1.0, "calibrated": False, "unsure_detector": False,
                       "ood_threshold": None, "explain": "cam"}  # fmt: skip


@pytest.mark.parametrize("fast_path", [True, False])
def test_explain_returns_a_heatmap_per_image_and_nothing_extra_runs_without_it(serve, calibrated, fast_path):
    hooked = HookedPredictors()
    with serve(make_predictor=hooked, weights=calibrated, fast_path=fast_path) as client:
        predictor = hooked[-1]
        asked: list[bool] = []
        inner = predictor.forward
        predictor.forward = lambda images, stats=True, fmap=False: (
            asked.append(fmap) or inner(images, stats, fmap)
        )
        files = [("file", (f"{i}.png", png_bytes(i))) for i in range(3)]
        plain = client.post("/predict", files=files, params={"top_k": 2})
        explained = client.post("/predict", files=files, params={"explain": "cam", "top_k": 2})
        bad = client.post("/predict", files=files, params={"explain": "gradients"})
    assert plain.status_code == explained.status_code == 200
    assert asked == [False, True]  # the last map is fetched only for the request that asks
    for p, q in zip(plain.json()["predictions"], explained.json()["predictions"], strict=True):
        assert "heatmap" not in p
        heat = torch.tensor(q["heatmap"])
        assert heat.shape == (32, 32) and float(heat.min()) == 0.0 and float(heat.max()) == 1.0
        assert {k: v for k, v in q.items() if k != "heatmap"} == p  # the same answer otherwise
    assert bad.status_code == 422


def test_v2_gives_the_optional_outputs_when_named(serve, calibrated):
    images = [png_bytes(2), noise_png(1)]
    wanted = [{"name": "label"}, {"name": "unsure"}, {"name": "ood_score"}, {"name": "heatmap"}]
    body = json_body(images, outputs=wanted)
    with serve(weights=calibrated) as client:
        names = [o["name"] for o in client.get("/v2/models/final").json()["outputs"]]
        r = client.post("/v2/models/final/infer", json=body)
        default = client.post("/v2/models/final/infer", json={"inputs": body["inputs"]})
        predicted = client.post("/predict", files=[("file", (f"{i}.png", b)) for i, b in enumerate(images)])
    assert names == ["probabilities", "label", "ood_score", "unsure", "heatmap"]
    assert r.status_code == 200, r.text
    outputs = {o["name"]: o for o in r.json()["outputs"]}
    assert outputs["unsure"]["datatype"] == "BOOL" and outputs["unsure"]["data"] == [False, True]
    assert outputs["heatmap"]["shape"] == [2, 32, 32] and len(outputs["heatmap"]["data"]) == 2 * 32 * 32
    scores = [p["ood_score"] for p in predicted.json()["predictions"]]
    assert outputs["ood_score"]["data"] == pytest.approx(scores, abs=1e-5)
    assert [o["name"] for o in default.json()["outputs"]] == ["probabilities", "label"]  # unchanged


def test_v2_refuses_unsure_outputs_of_a_model_without_a_detector(client):
    body = json_body([png_bytes(0)], outputs=[{"name": "unsure"}])
    r = client.post("/v2/models/final/infer", json=body)
    assert r.status_code == 400 and "unknown output 'unsure'" in r.json()["error"]


def test_a_detector_that_does_not_fit_the_network_is_refused(make_settings, calibrated, tmp_path):
    ckpt = load_checkpoint(calibrated)
    ood = dict(ckpt.meta["ood"])
    ood["sizes"] = [*ood["sizes"][:-1], ood["sizes"][-1] + 2]
    path = tmp_path / "bad.pt"
    save_checkpoint(path, build_model(ckpt), **{**CHECKPOINT_META, "ood": ood})
    with (
        pytest.raises(StartupError, match="stage statistics"),
        TestClient(create_app(make_settings(weights=path))),
    ):
        pass
