"""The training curves draw what the run validated: with a weight average, both candidates."""

import pytest

from training.plots import accuracy_series, plot_curves


def row(epoch: int, val_acc: float, **extra) -> dict:
    return {
        "epoch": epoch,
        "train_loss": 1.0,
        "val_loss": 1.1,
        "train_acc": 0.5,
        "val_acc": val_acc,
        "lr": 0.1,
        **extra,
    }


def test_a_weight_averaged_run_draws_both_validated_candidates(tmp_path):
    history = [row(1, 0.60, val_acc_raw=0.55), row(2, 0.70, val_acc_raw=0.72)]  # an --ema run
    series = accuracy_series(history)
    assert list(series) == ["train (augmented)", "validation (weight average)", "validation (raw weights)"]
    assert series["validation (weight average)"] == pytest.approx([60.0, 70.0])
    assert series["validation (raw weights)"] == pytest.approx([55.0, 72.0])
    plot_curves(history, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")


def test_a_run_without_an_average_draws_one_validation_curve():
    series = accuracy_series([row(1, 0.60), row(2, 0.70)])
    assert list(series) == ["train (augmented)", "validation"]
    assert series["validation"] == pytest.approx([60.0, 70.0])


def test_a_teachers_history_draws_without_validation_loss_or_learning_rate(tmp_path):
    history = [
        {"epoch": e, "train_loss": 2.0 / e, "train_acc": 0.3 * e, "val_acc": 0.25 * e} for e in (1, 2, 3)
    ]
    plot_curves(history, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 1000
