"""The training curves draw what the run validated: with a weight average, both candidates."""

import json

from training.plots import accuracy_series, plot_curves

from .conftest import REPO


def test_a_weight_averaged_run_draws_both_validated_candidates(tmp_path):
    history = json.loads((REPO / "weights" / "history.json").read_text())  # the shipped --ema run
    series = accuracy_series(history)
    assert list(series) == ["train (augmented)", "validation (weight average)", "validation (raw weights)"]
    assert series["validation (raw weights)"] == [100 * h["val_acc_raw"] for h in history]
    assert series["validation (weight average)"] == [100 * h["val_acc"] for h in history]
    plot_curves(history, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")


def test_a_run_without_an_average_draws_one_validation_curve():
    history = json.loads((REPO / "weights" / "lite" / "history.json").read_text())
    series = accuracy_series(history)
    assert list(series) == ["train (augmented)", "validation"]
    assert series["validation"] == [100 * h["val_acc"] for h in history]
