import torch

from app.model import CLASSES, FinalModel, count_parameters, format_layer_table, layer_table

# The original project's printed summary (seed README), kept here because CI has no shared/ folder:
# (layer type, output shape without the batch dimension, parameter count), in execution order.
EXPECTED = [
    ("Conv2d", (32, 32, 32), 864), ("ReLU", (32, 32, 32), 0), ("BatchNorm2d", (32, 32, 32), 64),
    ("Dropout", (32, 32, 32), 0), ("Conv2d", (64, 32, 32), 18432), ("ReLU", (64, 32, 32), 0),
    ("BatchNorm2d", (64, 32, 32), 128), ("Dropout", (64, 32, 32), 0), ("Conv2d", (16, 32, 32), 1040),
    ("Conv2d", (16, 28, 28), 2304), ("ReLU", (16, 28, 28), 0), ("BatchNorm2d", (16, 28, 28), 32),
    ("Conv2d", (32, 28, 28), 4608), ("ReLU", (32, 28, 28), 0), ("BatchNorm2d", (32, 28, 28), 64),
    ("Dropout", (32, 28, 28), 0), ("Conv2d", (64, 28, 28), 18432), ("ReLU", (64, 28, 28), 0),
    ("BatchNorm2d", (64, 28, 28), 128), ("Dropout", (64, 28, 28), 0), ("Conv2d", (32, 28, 28), 2080),
    ("Conv2d", (32, 24, 24), 9216), ("ReLU", (32, 24, 24), 0), ("BatchNorm2d", (32, 24, 24), 64),
    ("Conv2d", (64, 24, 24), 18432), ("ReLU", (64, 24, 24), 0), ("BatchNorm2d", (64, 24, 24), 128),
    ("Dropout", (64, 24, 24), 0), ("Conv2d", (64, 24, 24), 576), ("Conv2d", (256, 24, 24), 16384),
    ("ReLU", (256, 24, 24), 0), ("BatchNorm2d", (256, 24, 24), 512), ("Dropout", (256, 24, 24), 0),
    ("Conv2d", (32, 24, 24), 8224), ("Conv2d", (32, 20, 20), 9216), ("ReLU", (32, 20, 20), 0),
    ("BatchNorm2d", (32, 20, 20), 64), ("Conv2d", (64, 20, 20), 18432), ("ReLU", (64, 20, 20), 0),
    ("BatchNorm2d", (64, 20, 20), 128), ("Dropout", (64, 20, 20), 0), ("Conv2d", (64, 20, 20), 576),
    ("Conv2d", (256, 20, 20), 16384), ("ReLU", (256, 20, 20), 0), ("BatchNorm2d", (256, 20, 20), 512),
    ("Dropout", (256, 20, 20), 0), ("AvgPool2d", (256, 1, 1), 0), ("Linear", (10,), 2560),
]


def test_layer_table_matches_the_original_summary_row_by_row():
    rows = layer_table(FinalModel())
    assert len(rows) == 48
    for i, (row, (kind, shape, params)) in enumerate(zip(rows, EXPECTED, strict=True), start=1):
        assert (row.name, row.type, row.output_shape, row.params) == (
            f"{kind}-{i}", kind, (-1, *shape), params
        ), f"row {i}"


def test_parameter_count_is_149584_all_trainable():
    assert count_parameters(FinalModel()) == (149_584, 149_584)
    assert sum(p for _, _, p in EXPECTED) == 149_584


def test_forward_returns_logits_not_probabilities():
    model = FinalModel().eval()
    with torch.no_grad():
        out = model(torch.randn(4, 3, 32, 32) * 3)
    assert out.shape == (4, len(CLASSES))
    assert not torch.allclose(out.softmax(1).sum(1), out.sum(1))  # not already normalised


def test_text_table_uses_the_original_layout():
    model = FinalModel()
    text = format_layer_table(layer_table(model), *count_parameters(model))
    assert "Conv2d-1           [-1, 32, 32, 32]             864" in text
    assert "Linear-48                   [-1, 10]           2,560" in text
    assert "Total params: 149,584" in text
    assert "Non-trainable params: 0" in text
