"""The predictor seam: every backend gives PyTorch fp32's answers, and the service serves whatever
predictor it is handed, naming it in the summary, the metrics and the answers."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.calibration import stage_statistics
from app.checkpoint import build_model, load_checkpoint
from app.main import create_app
from app.model import CLASSES
from app.predictor import (
    Forward,
    OnnxPredictor,
    Predictor,
    PredictorError,
    PredictorInfo,
    TorchPredictor,
    build_predictor,
)
from app.preprocess import normalize
from app.settings import Settings

from ..tiny import smooth_images
from .helpers import samples
from .images import png_bytes


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Smooth random images, so that labels vary (noise gets one label from the test model)."""
    return smooth_images(40)


@pytest.fixture(scope="module")
def reference(weights, images) -> torch.Tensor:
    """FinalModel's fp32 logits, written out by hand: the answer every fp32 backend must give."""
    model = build_model(load_checkpoint(weights)).eval()
    with torch.no_grad():
        return model(normalize(images))


def fresh_model(weights) -> torch.nn.Module:
    return build_model(load_checkpoint(weights))


@pytest.mark.parametrize(
    ("backend", "layout"), [("pytorch", "nchw"), ("pytorch", "channels_last"), ("onnxruntime", "auto")]
)
def test_every_fp32_backend_gives_the_reference_logits(weights, images, reference, backend, layout):
    predictor = build_predictor(fresh_model(weights), torch.device("cpu"), backend, "fp32", layout, threads=1)
    logits = predictor.logits(images)
    assert logits.dtype == torch.float32 and logits.shape == (len(images), len(CLASSES))
    assert torch.allclose(logits, reference, atol=1e-4)
    assert torch.equal(logits.argmax(1), reference.argmax(1))
    assert len(set(reference.argmax(1).tolist())) > 2  # labels vary, so agreement means something
    assert predictor.info.backend == backend and predictor.info.precision == "fp32"
    # the unsure detector's statistics and the heatmaps' map come from the same pass, the same on each
    model = fresh_model(weights).eval()
    with torch.no_grad():
        maps, pooled, _ = model.forward_stages(normalize(images))
    out = predictor.forward(images, stats=True, fmap=True)
    assert torch.allclose(out.stats, stage_statistics(maps, pooled), atol=1e-4, rtol=1e-4)
    assert torch.allclose(out.fmap, maps[-1], atol=1e-4)
    plain = predictor.forward(images, stats=False)
    assert plain.stats is None and plain.fmap is None


def test_onnx_runs_any_batch_size(weights, images, reference):
    predictor = OnnxPredictor(fresh_model(weights), threads=1)
    for size in (1, 7, 33):
        assert torch.allclose(predictor.logits(images[:size]), reference[:size], atol=1e-4)


def test_bf16_runs_close_to_fp32_and_says_so(weights, images, reference):
    predictor = build_predictor(fresh_model(weights), torch.device("cpu"), "auto", "bf16", "auto")
    assert isinstance(predictor, TorchPredictor)  # auto never picks onnxruntime for bf16
    assert predictor.info.precision == "bf16" and predictor.info.layout == "channels_last"
    logits = predictor.logits(images)
    assert logits.dtype == torch.float32
    assert not torch.equal(logits, reference)  # it really ran in bf16
    assert torch.allclose(logits, reference, atol=0.05 * reference.abs().max().item())


def test_auto_is_onnxruntime_fp32_on_the_cpu(weights):
    predictor = build_predictor(fresh_model(weights), torch.device("cpu"))
    assert predictor.info == PredictorInfo("onnxruntime", "fp32", "cpu", 1)


def test_combinations_that_cannot_run_are_refused(weights):
    with pytest.raises(PredictorError, match="fp32 only"):
        build_predictor(fresh_model(weights), torch.device("cpu"), "onnxruntime", "bf16")
    with pytest.raises(ValidationError, match="bf16 needs backend pytorch"):
        Settings(backend="onnxruntime", precision="bf16")
    with pytest.raises(ValidationError):
        Settings(backend="tensorrt")


class FixedPredictor(Predictor):
    """A fake backend: every image is a 'ship' with 70%, whatever the model."""

    info = PredictorInfo(backend="fake", precision="fp32", device="cpu", threads=1)

    def __init__(self) -> None:
        self.batches: list[int] = []

    def forward(self, images: torch.Tensor, stats: bool = True, fmap: bool = False) -> Forward:
        self.batches.append(len(images))
        probabilities = torch.full((len(images), len(CLASSES)), 0.3 / 9)
        probabilities[:, CLASSES.index("ship")] = 0.7
        return Forward(probabilities.log(), None, None)


def test_the_service_serves_the_predictor_it_is_handed(make_settings):
    fake = FixedPredictor()
    with TestClient(create_app(make_settings(), lambda model, device: fake)) as client:
        r = client.post("/predict", files=[("file", (f"{i}.png", png_bytes(i))) for i in range(3)])
        assert r.status_code == 200, r.text
        assert [p["label"] for p in r.json()["predictions"]] == ["ship"] * 3
        assert r.json()["predictions"][0]["confidence"] == pytest.approx(0.7)
        assert 3 in fake.batches
        summary = client.get("/model/summary").json()
        assert summary["inference"] == {
            "backend": "fake",
            "precision": "fp32",
            "device": "cpu",
            "threads": 1,
            "layout": "nchw",
        }
        metrics = client.get("/metrics").text
    assert _info_labels(metrics)["backend"] == "fake"


def _info_labels(text: str) -> dict[str, str]:
    """The labels of the one cifar10_model_info sample."""
    [labels] = [dict(key) for name, key in samples(text) if name == "cifar10_model_info"]
    return labels


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({}, ("onnxruntime", "fp32", "nchw", "float32")),
        ({"backend": "pytorch"}, ("pytorch", "fp32", "channels_last", "float32")),
        ({"backend": "pytorch", "layout": "nchw"}, ("pytorch", "fp32", "nchw", "float32")),
        ({"precision": "bf16"}, ("pytorch", "bf16", "channels_last", "bfloat16")),
    ],
)
def test_summary_and_metric_name_the_configured_backend(serve, overrides, expected):
    backend, precision, layout, dtype = expected
    with serve(torch_threads=1, **overrides) as client:
        summary = client.get("/model/summary").json()
        r = client.post("/predict", files=[("file", ("a.png", png_bytes(0)))])
        metrics = client.get("/metrics").text
    assert r.status_code == 200
    assert summary["inference"] == {
        "backend": backend,
        "precision": precision,
        "device": "cpu",
        "threads": 1,
        "layout": layout,
    }
    assert summary["dtype"] == dtype
    labels = _info_labels(metrics)
    assert (labels["backend"], labels["precision"], labels["threads"]) == (backend, precision, "1")
