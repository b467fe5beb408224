"""GET /model/summary: the model described from the model itself, and the original's text table."""

from __future__ import annotations

import hashlib

from app.model import CLASSES, MEAN, STD

from .conftest import CHECKPOINT_META

# The table the original project printed for FinalModel (torchsummary's layout), verbatim.
ORIGINAL_TABLE = """\
----------------------------------------------------------------
        Layer (type)               Output Shape         Param #
================================================================
            Conv2d-1           [-1, 32, 32, 32]             864
              ReLU-2           [-1, 32, 32, 32]               0
       BatchNorm2d-3           [-1, 32, 32, 32]              64
           Dropout-4           [-1, 32, 32, 32]               0
            Conv2d-5           [-1, 64, 32, 32]          18,432
              ReLU-6           [-1, 64, 32, 32]               0
       BatchNorm2d-7           [-1, 64, 32, 32]             128
           Dropout-8           [-1, 64, 32, 32]               0
            Conv2d-9           [-1, 16, 32, 32]           1,040
           Conv2d-10           [-1, 16, 28, 28]           2,304
             ReLU-11           [-1, 16, 28, 28]               0
      BatchNorm2d-12           [-1, 16, 28, 28]              32
           Conv2d-13           [-1, 32, 28, 28]           4,608
             ReLU-14           [-1, 32, 28, 28]               0
      BatchNorm2d-15           [-1, 32, 28, 28]              64
          Dropout-16           [-1, 32, 28, 28]               0
           Conv2d-17           [-1, 64, 28, 28]          18,432
             ReLU-18           [-1, 64, 28, 28]               0
      BatchNorm2d-19           [-1, 64, 28, 28]             128
          Dropout-20           [-1, 64, 28, 28]               0
           Conv2d-21           [-1, 32, 28, 28]           2,080
           Conv2d-22           [-1, 32, 24, 24]           9,216
             ReLU-23           [-1, 32, 24, 24]               0
      BatchNorm2d-24           [-1, 32, 24, 24]              64
           Conv2d-25           [-1, 64, 24, 24]          18,432
             ReLU-26           [-1, 64, 24, 24]               0
      BatchNorm2d-27           [-1, 64, 24, 24]             128
          Dropout-28           [-1, 64, 24, 24]               0
           Conv2d-29           [-1, 64, 24, 24]             576
           Conv2d-30          [-1, 256, 24, 24]          16,384
             ReLU-31          [-1, 256, 24, 24]               0
      BatchNorm2d-32          [-1, 256, 24, 24]             512
          Dropout-33          [-1, 256, 24, 24]               0
           Conv2d-34           [-1, 32, 24, 24]           8,224
           Conv2d-35           [-1, 32, 20, 20]           9,216
             ReLU-36           [-1, 32, 20, 20]               0
      BatchNorm2d-37           [-1, 32, 20, 20]              64
           Conv2d-38           [-1, 64, 20, 20]          18,432
             ReLU-39           [-1, 64, 20, 20]               0
      BatchNorm2d-40           [-1, 64, 20, 20]             128
          Dropout-41           [-1, 64, 20, 20]               0
           Conv2d-42           [-1, 64, 20, 20]             576
           Conv2d-43          [-1, 256, 20, 20]          16,384
             ReLU-44          [-1, 256, 20, 20]               0
      BatchNorm2d-45          [-1, 256, 20, 20]             512
          Dropout-46          [-1, 256, 20, 20]               0
        AvgPool2d-47            [-1, 256, 1, 1]               0
           Linear-48                   [-1, 10]           2,560
================================================================
Total params: 149,584
Trainable params: 149,584
Non-trainable params: 0
----------------------------------------------------------------
"""


def test_summary_json_describes_the_model_and_its_checkpoint(client, weights):
    r = client.get("/model/summary")
    assert r.status_code == 200
    s = r.json()
    assert s["model"] == "FinalModel"
    assert s["total_params"] == s["trainable_params"] == 149_584
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
    assert r.text == ORIGINAL_TABLE


def test_unknown_summary_format_is_422(client):
    r = client.get("/model/summary", params={"format": "xml"})
    assert r.status_code == 422
    assert r.json()["code"] == "invalid_request"
