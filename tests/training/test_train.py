"""The training module end to end, as a user runs it: real subprocesses on tiny data; runs
refused before their first step are called in this process (`train_main`)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from app.checkpoint import build_model, load_checkpoint
from app.model import CLASSES

from .conftest import (
    BEST_KEYS,
    REPO,
    SUBPROCESS_TIMEOUT,
    TRAIN_STATE_KEYS,
    run_evaluate,
    run_training,
    signal_one_torchrun_worker,
)

# Small enough for seconds on a CPU: 120 images, 20 of them held out, batches of 20.
TINY = ["--val-size", "20", "--batch-size", "20", "--lr", "0.05"]


@pytest.mark.slow
def test_training_writes_a_checkpoint_that_loads_into_finalmodel(tiny_archive, tmp_path):
    out = tmp_path / "run"
    proc = run_training(
        "--data",
        str(tiny_archive),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out",
        str(out),
        "--epochs",
        "2",
        *TINY,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "epoch 2/2" in proc.stderr

    ckpt = load_checkpoint(out / "final_model.pt")
    model = build_model(ckpt)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, len(CLASSES))
    meta = ckpt.meta
    assert meta["complete"] is True and meta["epoch"] == 2
    assert set(meta["metrics"]) >= {"train_acc", "val_acc", "test_acc", "test_acc_tta", "per_class_accuracy"}
    assert set(meta["metrics"]["per_class_accuracy"]) == set(CLASSES)
    assert meta["metrics"]["test_images"] == 30
    assert meta["config"]["epochs"] == 2 and len(meta["data_fingerprint"]) == 64
    assert meta["code_version"] and meta["device"].startswith("cpu") and meta["created_at"]

    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(h["images_per_s"] > 0 for h in history)
    for picture in ("curves.png", "confusion_matrix.png", "misclassified.png"):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_training_learns_an_easy_task(tiny_data, tmp_path):
    """Each tiny class is one colour plus noise: a few epochs must beat chance by far.

    No augmentation, dropout or label smoothing on 100 images (until the zero-flag fix, the
    zeros given here silently fell back to the defaults: cutout 8, dropout 0.05).
    """
    out = tmp_path / "run"
    proc = run_training(
        "--data",
        str(tiny_data),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out",
        str(out),
        "--epochs",
        "20",
        "--val-size",
        "20",
        "--batch-size",
        "10",
        "--lr",
        "0.05",
        "--cutout",
        "0",
        "--dropout",
        "0",
        "--translate",
        "0",
        "--label-smoothing",
        "0",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert load_checkpoint(out / "final_model.pt").meta["metrics"]["test_acc"] >= 0.5


@pytest.mark.slow
def test_dry_run_flag_runs_the_pipeline(tiny_data, tmp_path):
    proc = run_training(
        "--data",
        str(tiny_data),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--dry-run",
        "--limit",
        "100",
        "--val-size",
        "10",
        "--batch-size",
        "10",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    said = re.search(r"dry run: .* into (\S+); its accuracy figures mean nothing by design", proc.stderr)
    assert said is not None, proc.stderr[-2000:]
    out = Path(said.group(1))  # a temporary folder of its own, outside the repository
    assert REPO not in out.parents and load_checkpoint(out / "final_model.pt").meta["epoch"] == 1
    shutil.rmtree(out)


def test_bad_data_source_is_one_clear_error(tmp_path, train_main):
    missing = tmp_path / "missing.tar.gz"
    code, stderr = train_main("--data", missing, "--out", tmp_path / "o")
    assert code == 2
    assert stderr.strip().splitlines()[-1] == f"error: data source {missing} does not exist"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_killed_run_resumes_where_it_stopped(tiny_data, tmp_path, sig):
    """Kill a real run after its first epoch; --resume finishes it without starting over."""
    out = tmp_path / "run"
    args = [
        "--data",
        str(tiny_data),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out",
        str(out),
        "--epochs",
        "8",
        *TINY,
        "--threads",
        "2",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "training", *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    history_file = out / "history.json"
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT
    while not history_file.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    os.kill(proc.pid, sig)
    stderr = proc.communicate(timeout=60)[1]
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "continue with --resume" in stderr

    state = torch.load(out / "last.pt", weights_only=True)  # never half written
    assert set(state) == TRAIN_STATE_KEYS and set(state["best"]) == BEST_KEYS
    stopped_epoch, stopped_batch = state["epoch"], state["batch"]
    assert 1 <= stopped_epoch < 8
    before = json.loads(history_file.read_text())

    # where it runs may change on resume (a GPU run finishing on a CPU, say); the recipe may not
    resumed = run_training("--out", str(out), "--resume", "--threads", "1")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming at epoch {stopped_epoch + 1}, batch {stopped_batch}" in resumed.stderr
    assert "1 process(es), 1 thread(s) each" in resumed.stderr
    after = json.loads(history_file.read_text())
    assert [h["epoch"] for h in after] == list(range(1, 9))
    assert after[: len(before)] == before  # the finished epochs were kept, not redone
    meta = load_checkpoint(out / "final_model.pt").meta
    assert meta["epoch"] == 8 and meta["config"]["threads"] == 1 and meta["config"]["epochs"] == 8
    assert all(h["wall_s"] >= h["seconds"] > 0 for h in after[len(before) :])


def test_resume_refuses_to_change_the_recipe(tmp_path, train_main):
    code, stderr = train_main("--out", tmp_path / "run", "--resume", "--epochs", "30", "--lr", "0.1")
    assert code == 2
    assert "--epochs, --lr cannot change" in stderr and "--threads" in stderr


def test_resume_without_a_saved_run_is_refused(tmp_path, train_main):
    code, stderr = train_main("--out", tmp_path / "empty", "--resume")
    assert code == 2 and "last.pt does not exist" in stderr


def torchrun_two_cpu(tiny_data, tmp_path, out, epochs: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "training"] + [
        *("--data", str(tiny_data), "--cache-dir", str(tmp_path / "cache"), "--out", str(out)),
        *("--epochs", str(epochs), *TINY, "--device", "cpu"),
    ]


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tiny_data, tmp_path):
    out = tmp_path / "ddp"
    proc = subprocess.run(
        torchrun_two_cpu(tiny_data, tmp_path, out, epochs=2),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es), 1 thread(s) each" in proc.stderr
    assert proc.stderr.count("epoch 2/2  loss") == 1  # only rank 0 logs and writes
    meta = load_checkpoint(out / "final_model.pt").meta
    assert meta["device"].startswith("cpu") and "2 process(es)" in meta["device"]
    assert sorted(p.name for p in out.iterdir()) == [
        "confusion_matrix.png",
        "curves.png",
        "final_model.pt",
        "history.json",
        "last.pt",
        "misclassified.png",
        "reliability.png",
    ]


@pytest.mark.slow
def test_evaluate_reports_accuracy_that_matches_the_model(tiny_data, tmp_path, checkpoint_path):
    out = tmp_path / "eval"
    proc = run_evaluate(checkpoint_path, tiny_data, tmp_path, "--tta", "--out", str(out), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((out / "evaluation.json").read_text())

    from training.data import load_cifar10
    from training.evaluate import predict

    test = load_cifar10(str(tiny_data), tmp_path / "cache").test
    model = build_model(load_checkpoint(checkpoint_path))
    predicted = predict(model, test.images, torch.device("cpu")).argmax(1)
    expected = (predicted == test.labels).float().mean().item()
    assert result["test"]["accuracy"] == pytest.approx(expected)
    assert result["test"]["count"] == 30 and "test_tta" in result
    assert f"test accuracy: {100 * expected:.2f}% on 30 images" in proc.stdout
    assert "test accuracy with flip TTA" in proc.stdout
    for name in CLASSES:
        assert name in proc.stdout
    assert (out / "confusion_matrix.png").exists() and (out / "misclassified.png").exists()


@pytest.mark.slow
def test_evaluate_min_accuracy_fails_below_the_bar(tiny_data, tmp_path, checkpoint_path):
    proc = run_evaluate(checkpoint_path, tiny_data, tmp_path, "--min-accuracy", "1.01")
    assert proc.returncode == 1 and "below the required" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize(("max_drop", "code"), [("0.3", 1), ("100", 0)])
def test_evaluate_max_drop_compares_with_recorded(tiny_data, tmp_path, checkpoint_path, max_drop, code):
    """The fixture checkpoint records test_acc 0.5; a random model scores far lower on the tiny set."""
    proc = run_evaluate(checkpoint_path, tiny_data, tmp_path, "--max-drop", max_drop)
    assert proc.returncode == code, proc.stderr
    assert "recorded in the checkpoint: 50.00%" in proc.stdout
    if code:
        assert "points below the recorded 50.00%" in proc.stderr


@pytest.mark.slow
def test_init_continues_from_a_finished_run(tiny_data, tmp_path):
    """--init starts a new cycle from a parent's weights and records where they came from."""
    common = ["--data", str(tiny_data), "--cache-dir", str(tmp_path / "cache"), *TINY]
    parent = run_training(*common, "--out", str(tmp_path / "a"), "--epochs", "2")
    assert parent.returncode == 0, parent.stderr[-2000:]
    parent_ckpt = load_checkpoint(tmp_path / "a" / "final_model.pt")

    # lr 0: the learned weights cannot move (only BatchNorm's running statistics do)
    child = run_training(
        *common,
        "--out",
        str(tmp_path / "b"),
        "--epochs",
        "1",
        "--lr",
        "0",
        "--init",
        str(tmp_path / "a" / "final_model.pt"),
    )
    assert child.returncode == 0, child.stderr[-2000:]
    child_ckpt = load_checkpoint(tmp_path / "b" / "final_model.pt")
    meta = child_ckpt.meta
    assert meta["init"]["sha256"] == parent_ckpt.sha256 and meta["init"]["epochs"] == 2
    assert meta["total_epochs"] == 3
    buffers = ("running_mean", "running_var", "batches_tracked")
    learned = [k for k in parent_ckpt.state_dict if not k.endswith(buffers)]
    assert learned and all(torch.equal(child_ckpt.state_dict[k], parent_ckpt.state_dict[k]) for k in learned)
    scratch = run_training(*common, "--out", str(tmp_path / "c"), "--epochs", "1", "--lr", "0")
    assert scratch.returncode == 0, scratch.stderr[-2000:]
    fresh = load_checkpoint(tmp_path / "c" / "final_model.pt").state_dict
    assert not all(torch.equal(fresh[k], parent_ckpt.state_dict[k]) for k in learned)


@pytest.mark.slow
def test_init_refuses_a_parent_with_another_validation_split(tiny_data, tmp_path, train_main):
    common = ["--data", str(tiny_data), "--cache-dir", str(tmp_path / "cache"), *TINY]
    assert run_training(*common, "--out", str(tmp_path / "a"), "--epochs", "1").returncode == 0
    code, stderr = train_main(*common, "--out", tmp_path / "b", "--epochs", "1", "--seed", "1",
                              "--init", tmp_path / "a" / "final_model.pt")  # fmt: skip
    assert code == 2
    assert "used --seed 0, this run 1; the validation split must be the same" in stderr


def test_code_version_prefers_the_given_one(monkeypatch):
    """A tree copied to another machine may carry a stale .git: the version given wins."""
    from training.runtime import code_version

    monkeypatch.setenv("CIFAR10_CODE_VERSION", "abc1234")
    assert code_version() == "abc1234"
    monkeypatch.delenv("CIFAR10_CODE_VERSION")
    assert code_version() != "abc1234" and code_version()


@pytest.mark.slow
def test_model_lite_writes_lite_model_pt_and_init_refuses_the_other_architecture(
    tiny_data, tmp_path, train_main
):
    out = tmp_path / "lite"
    common = ["--data", str(tiny_data), "--cache-dir", str(tmp_path / "cache"), *TINY, "--epochs", "2"]
    proc = run_training(*common, "--model", "lite", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (out / "final_model.pt").exists()
    ckpt = load_checkpoint(out / "lite_model.pt")
    assert ckpt.meta["model"] == "LiteModel" and ckpt.meta["config"]["model"] == "lite"
    assert type(build_model(ckpt)).__name__ == "LiteModel"

    code, stderr = train_main(*common, "--init", out / "lite_model.pt", "--out", tmp_path / "final")
    assert code == 2
    assert "holds a LiteModel, this run trains a FinalModel" in stderr


@pytest.mark.slow
def test_a_signal_that_reaches_one_torchrun_worker_stops_both_and_saves(tiny_data, tmp_path):
    """The ranks agree on the step to stop at: a rank that stopped alone would leave the other
    blocked in the gradient all-reduce, and the launcher would kill both before last.pt is saved."""
    out = tmp_path / "ddp"
    stderr = signal_one_torchrun_worker(torchrun_two_cpu(tiny_data, tmp_path, out, epochs=50), out)
    assert "continue with --resume" in stderr, stderr[-3000:]
    state = torch.load(out / "last.pt", weights_only=True)
    assert 1 <= state["epoch"] < 50
    assert [h["epoch"] for h in json.loads((out / "history.json").read_text())] == list(
        range(1, state["epoch"] + 1)
    )
