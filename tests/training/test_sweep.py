"""python -m training.sweep: recipes side by side in a time budget, chosen by validation."""

import json
import subprocess
import sys

import pytest

from app.checkpoint import load_checkpoint
from training.sweep import plan, recipe_flags, recipe_name

from .conftest import REPO


def test_recipe_flags_and_names():
    assert recipe_flags("dropout=0,label_smoothing=0.1") == ["--dropout", "0", "--label-smoothing", "0.1"]
    assert recipe_flags("") == []
    assert recipe_name("dropout=0,weight_decay=0.001") == "dropout0_weight_decay0p001"
    assert recipe_name("") == "defaults"
    # a path names its run by its stem: no folders inside the sweep's folder
    assert recipe_name("teacher=runs/t/teacher.pt,ema=0.999") == "teacher-teacher_ema0p999"
    for bad in ("dropout", "=3", "dropout=0,cutout"):
        with pytest.raises(ValueError, match="not key=value"):
            recipe_flags(bad)


@pytest.mark.parametrize(
    ("seconds", "left", "expected"),
    [
        (2.0, 400.0, (4, 200)),  # everything fits: all runs, capped at max_epochs
        (2.0, 1000.0, (4, 200)),
        (4.0, 300.0, (3, 100)),  # 4 runs would get 75 < 80 epochs: drop one, the rest speed up
        (10.0, 300.0, (1, 120)),  # even one run falls short: it gets what fits
        (4.0, 0.5, (1, 0)),
    ],
)
def test_plan_trades_runs_for_epochs(seconds, left, expected):
    assert plan(seconds, 4, left, min_epochs=80, max_epochs=200) == expected


@pytest.mark.slow
def test_sweep_trains_each_recipe_and_ranks_by_validation(tiny_data, tmp_path):
    out = tmp_path / "sweep"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "training.sweep",
            "--out",
            str(out),
            "--budget",
            "400",
            "--probe-epochs",
            "1",
            "--min-epochs",
            "1",
            "--max-epochs",
            "2",
            "--recipe",
            "dropout=0",
            "--recipe",
            "dropout=0,cutout=0",
            "--",
            "--data",
            str(tiny_data),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--val-size",
            "20",
            "--batch-size",
            "20",
            "--lr",
            "0.05",
            "--device",
            "cpu",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    runs = summary["runs"]
    assert summary["epochs"] == 2 and sorted(r["name"] for r in runs) == ["dropout0", "dropout0_cutout0"]
    assert [r["val_acc"] for r in runs] == sorted((r["val_acc"] for r in runs), reverse=True)
    assert all(r["finished"] and r["epochs"] == 2 and r["test_acc"] is not None for r in runs)
    config = load_checkpoint(out / "dropout0_cutout0" / "final_model.pt").meta["config"]
    assert (config["dropout"], config["cutout"], config["epochs"], config["batch_size"]) == (0, 0, 2, 20)
    assert "2 run(s) of 2 epochs" in proc.stderr


def test_sweep_refuses_a_malformed_recipe_before_training(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "training.sweep",
            "--out",
            str(tmp_path / "s"),
            "--budget",
            "10",
            "--recipe",
            "dropout",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "not key=value" in proc.stderr
    assert not (tmp_path / "s" / "warmup").exists()
