"""GET /model/summary: the model described from the model itself, and the original's text table."""

from __future__ import annotations

import hashlib

from app.model import CLASSES, MEAN, STD

from ..original_summary import ORIGINAL_TABLE
from .conftest import CHECKPOINT_META


def test_summary_json_describes_the_model_and_its_checkpoint(client, weights):
    r = client.get("/model/summary")
    assert r.status_code == 200
    s = r.json()
    assert s["model"] == "FinalModel"
    assert s["total_params"] == s["trainable_params"] == 149_584
    # each convolution's output pixels x output channels x inputs per output, from the layer table
    convs = [(32, 32, 3, 9), (32, 64, 32, 9), (32, 16, 64, 1), (28, 16, 16, 9), (28, 32, 16, 9),
             (28, 64, 32, 9), (28, 32, 64, 1), (24, 32, 32, 9), (24, 64, 32, 9), (24, 64, 1, 9),
             (24, 256, 64, 1), (24, 32, 256, 1), (20, 32, 32, 9), (20, 64, 32, 9), (20, 64, 1, 9),
             (20, 256, 64, 1)]  # fmt: skip  # (side, out channels, in channels per group, kernel area)
    assert s["macs"] == sum(side * side * out * inputs * k for side, out, inputs, k in convs) + 256 * 10
    assert s["non_trainable_params"] == 0
    assert s["input_shape"] == [3, 32, 32]
    assert s["device"] == "cpu" and s["dtype"] == "float32"
    assert s["classes"] == list(CLASSES)
    assert s["normalization"] == {"mean": list(MEAN), "std": list(STD)}
    assert s["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert s["weights_file"] == weights.name
    meta = s["checkpoint"]
    assert meta["metrics"] == CHECKPOINT_META["metrics"]
    assert meta["epoch"] == CHECKPOINT_META["epoch"]
    assert meta["created_at"] == CHECKPOINT_META["created_at"]
    assert "state_dict" not in meta
    assert s["serving"]["workers"] == 2 and s["serving"]["batching"] is True


def test_summary_lists_the_48_layers_in_execution_order(client):
    layers = client.get("/model/summary").json()["layers"]
    assert len(layers) == 48
    assert layers[0] == {
        "name": "Conv2d-1",
        "type": "Conv2d",
        "output_shape": [-1, 32, 32, 32],
        "params": 864,
    }
    assert layers[46] == {
        "name": "AvgPool2d-47",
        "type": "AvgPool2d",
        "output_shape": [-1, 256, 1, 1],
        "params": 0,
    }
    assert layers[-1] == {"name": "Linear-48", "type": "Linear", "output_shape": [-1, 10], "params": 2560}
    assert [layer["name"] for layer in layers] == [
        f"{layer['type']}-{i}" for i, layer in enumerate(layers, 1)
    ]
    assert sum(layer["params"] for layer in layers) == 149_584


def test_summary_as_text_is_the_original_table(client):
    r = client.get("/model/summary", params={"format": "text"})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    assert r.text == ORIGINAL_TABLE + "Device Type - cpu\n"  # the original's line, last


def test_unknown_summary_format_is_422(client):
    r = client.get("/model/summary", params={"format": "xml"})
    assert r.status_code == 422
    assert r.json()["code"] == "invalid_request"
