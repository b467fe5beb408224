import torch

from app.model import CLASSES, FinalModel, LiteModel, count_parameters, format_layer_table, layer_table

from ..original_summary import ORIGINAL_TABLE, original_rows


def test_layer_table_matches_the_original_summary_row_by_row():
    expected = original_rows()
    assert len(expected) == 48
    rows = [(r.name, r.type, r.output_shape, r.params) for r in layer_table(FinalModel())]
    assert rows == expected


def test_parameter_count_is_149584_all_trainable():
    assert count_parameters(FinalModel()) == (149_584, 149_584)
    assert sum(params for *_, params in original_rows()) == 149_584


def test_forward_returns_logits_not_probabilities():
    model = FinalModel().eval()
    with torch.no_grad():
        out = model(torch.randn(4, 3, 32, 32) * 3)
    assert out.shape == (4, len(CLASSES))
    assert not torch.allclose(out.softmax(1).sum(1), out.sum(1))  # not already normalised


def test_text_table_is_the_original_verbatim():
    model = FinalModel()
    text = format_layer_table(layer_table(model), *count_parameters(model))
    assert text.strip("\n") == ORIGINAL_TABLE.strip("\n")


def test_lite_model_is_under_50000_parameters_with_finalmodels_shape_of_blocks():
    model = LiteModel().eval()
    assert count_parameters(model) == (47_648, 47_648)
    kinds = {r.type for r in layer_table(model)}
    assert kinds == {r.type for r in layer_table(FinalModel())}  # the same kinds of layer, no pooling added
    assert not any(r.type.startswith("MaxPool") for r in layer_table(model))
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, len(CLASSES))
