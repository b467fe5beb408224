"""The teacher and distillation into FinalModel: real subprocesses on tiny data, and the loss itself."""

import copy
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from app.checkpoint import load_checkpoint
from app.model import CLASSES, AirbenchNet, FinalModel
from app.preprocess import normalize
from training.data import Split
from training.runtime import Runtime
from training.teacher import load_teacher
from training.teacher import main as teacher_main
from training.train import TrainConfig, averaged_model, training_loss

from .conftest import REPO, SUBPROCESS_TIMEOUT

TINY = ["--val-size", "20", "--batch-size", "20"]
TINY_TEACHER = [*TINY, "--widths", "8,16,16", "--lr", "0.05"]


def run_module(module: str, *args: str, timeout: float = SUBPROCESS_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def interrupt_after_first_epoch(module: str, args: list[str], out, sig: int) -> tuple[int, str]:
    """Start `python -m module args`, send `sig` once it has written out/history.json; (exit code, stderr)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT
    while not (out / "history.json").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    os.kill(proc.pid, sig)
    _, stderr = proc.communicate(timeout=60)
    return proc.returncode, stderr


@pytest.fixture(scope="module")
def teacher(tiny_data, tmp_path_factory):
    """A tiny teacher trained for two epochs on the tiny data's training split."""
    tmp = tmp_path_factory.mktemp("teacher")
    proc = run_module(
        "training.teacher",
        "--data",
        str(tiny_data),
        "--cache-dir",
        str(tmp / "cache"),
        "--out",
        str(tmp / "run"),
        "--epochs",
        "2",
        "--test",
        *TINY_TEACHER,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return tmp / "run" / "teacher.pt"


@pytest.mark.slow
def test_teacher_writes_a_weights_only_checkpoint_with_its_split(teacher):
    blob = torch.load(teacher, weights_only=True)  # no pickled objects
    assert blob["val_size"] == 20 and blob["seed"] == 0 and blob["widths"] == [8, 16, 16]
    assert blob["model"] == "AirbenchNet" and blob["arch"]["widths"] == [8, 16, 16]
    assert set(blob["metrics"]) >= {"val_acc", "val_acc_tta", "test_acc"}
    assert len(blob["data_fingerprint"]) == 64
    model, meta = load_teacher(teacher)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, len(CLASSES))
    assert len(meta["sha256"]) == 64
    history = json.loads((teacher.parent / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]


def test_default_teacher_is_airbench94_size():
    assert sum(p.numel() for p in AirbenchNet().parameters()) == 1_972_792


@pytest.mark.slow
def test_distilled_run_records_teacher_ema_and_mixup(teacher, tiny_data, tmp_path):
    out = tmp_path / "student"
    proc = run_module(
        "training",
        "--data",
        str(tiny_data),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out",
        str(out),
        "--epochs",
        "2",
        *TINY,
        "--lr",
        "0.05",
        "--teacher",
        str(teacher),
        "--kd-weight",
        "0.7",
        "--kd-temperature",
        "3",
        "--ema",
        "0.9",
        "--mixup",
        "0.2",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "distilling from" in proc.stderr
    meta = load_checkpoint(out / "final_model.pt").meta
    _, teacher_meta = load_teacher(teacher)
    assert meta["teacher"]["sha256"] == teacher_meta["sha256"]
    assert meta["teacher"]["val_acc"] == teacher_meta["metrics"]["val_acc"]
    cfg = meta["config"]
    assert (cfg["teacher"], cfg["kd_weight"], cfg["kd_temperature"], cfg["ema"], cfg["mixup"]) == (
        str(teacher),
        0.7,
        3.0,
        0.9,
        0.2,
    )
    history = json.loads((out / "history.json").read_text())
    assert all("val_acc_raw" in h for h in history)  # the average and the raw weights, both validated


@pytest.mark.slow
def test_a_distilled_second_cycle_starts_its_average_from_the_parent(teacher, tiny_data, tmp_path):
    """--init with --teacher and --ema: the run records both, and the weight average it saves
    starts from the parent's weights (at lr 0 the learned weights cannot move), not the random
    initialisation the model had before --init loaded them."""
    common = ["--data", str(tiny_data), "--cache-dir", str(tmp_path / "cache"), *TINY]
    parent = run_module("training", *common, "--out", str(tmp_path / "parent"), "--epochs", "1")
    assert parent.returncode == 0, parent.stderr[-2000:]
    parent_ckpt = load_checkpoint(tmp_path / "parent" / "final_model.pt")
    child = run_module(
        "training",
        *common,
        "--out",
        str(tmp_path / "child"),
        "--epochs",
        "1",
        "--lr",
        "0",
        "--init",
        str(tmp_path / "parent" / "final_model.pt"),
        "--teacher",
        str(teacher),
        "--ema",
        "0.9",
    )
    assert child.returncode == 0, child.stderr[-2000:]
    child_ckpt = load_checkpoint(tmp_path / "child" / "final_model.pt")
    assert child_ckpt.meta["init"]["sha256"] == parent_ckpt.sha256
    assert child_ckpt.meta["teacher"]["sha256"] == load_teacher(teacher)[1]["sha256"]
    saved = child_ckpt.state_dict
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    learned = [k for k in parent_ckpt.state_dict if not k.endswith(buffers)]
    assert learned and all(torch.allclose(saved[k], parent_ckpt.state_dict[k]) for k in learned)


@pytest.mark.slow
def test_the_raw_weights_are_kept_when_they_validate_better_than_the_average(tiny_data, tmp_path):
    """--ema validates both the average and the raw weights each epoch and keeps the better one.
    At decay 0.9999 the average stays near the random initialisation, so the raw weights win."""
    out = tmp_path / "run"
    common = ["--data", str(tiny_data), "--cache-dir", str(tmp_path / "cache"), "--out", str(out), *TINY]
    proc = run_module("training", *common, "--epochs", "3", "--lr", "0.05", "--ema", "0.9999")
    assert proc.returncode == 0, proc.stderr[-2000:]
    history = json.loads((out / "history.json").read_text())
    best_raw = max(h["val_acc_raw"] for h in history)
    assert best_raw > max(h["val_acc"] for h in history)  # the setting does what the docstring says
    ckpt = load_checkpoint(out / "final_model.pt")
    assert ckpt.meta["weights"] == "raw" and ckpt.meta["metrics"]["val_acc"] == best_raw
    # the best raw epoch here is the last, whose raw weights last.pt holds: the saved ones are those
    assert history[-1]["val_acc_raw"] == best_raw
    last = torch.load(out / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(t, last[k]) for k, t in ckpt.state_dict.items())


def test_the_average_is_validated_with_batchnorm_statistics_of_its_own():
    """Whatever statistics the running average carries, the average that is validated has them
    recomputed on training images: in eval mode it answers as its weights do on those images in one
    training-mode batch (batch statistics). The running average itself is left as it was."""
    torch.manual_seed(0)
    ema = AveragedModel(FinalModel(dropout=0.0), multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    for bn in ema.modules():
        if isinstance(bn, nn.BatchNorm2d):  # averaged statistics that fit no weights
            bn.running_mean.add_(3.0)
            bn.running_var.mul_(100.0)
    running = {k: t.clone() for k, t in ema.state_dict().items()}
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    train = Split(images, torch.zeros(64, dtype=torch.int64))

    average = averaged_model(ema, train, Runtime(torch.device("cpu")), seed=0, n=64, batch_size=64)

    with torch.no_grad():
        batch_statistics = copy.deepcopy(ema.module).train()(normalize(images))
        stale = copy.deepcopy(ema.module).eval()(normalize(images))
        validated = average(normalize(images))
    assert not torch.allclose(stale, batch_statistics, atol=1e-2)  # the corruption shows
    torch.testing.assert_close(validated, batch_statistics, rtol=1e-3, atol=1e-3)
    assert all(torch.equal(t, ema.state_dict()[k]) for k, t in running.items())


@pytest.mark.slow
def test_a_teacher_that_saw_the_validation_images_is_refused(teacher, tiny_data, tmp_path, train_main):
    code, stderr = train_main(
        "--data",
        tiny_data,
        "--cache-dir",
        tmp_path / "cache",
        "--out",
        tmp_path / "s",
        "--epochs",
        "2",
        "--val-size",
        "30",
        "--batch-size",
        "20",
        "--teacher",
        teacher,
    )
    assert code == 2
    assert stderr.strip().splitlines()[-1].startswith(f"error: --teacher: {teacher} used --val-size 20")


def test_a_file_that_is_not_a_teacher_is_refused(tiny_data, tmp_path, checkpoint_path, train_main):
    code, stderr = train_main(
        "--data",
        tiny_data,
        "--cache-dir",
        tmp_path / "cache",
        "--out",
        tmp_path / "s",
        "--epochs",
        "2",
        *TINY,
        "--teacher",
        checkpoint_path,
    )
    assert code == 2
    assert "is not a checkpoint written by python -m training.teacher" in stderr


@pytest.mark.slow
def test_killed_distilled_run_resumes_only_with_the_same_teacher(teacher, tiny_data, tmp_path, train_main):
    out = tmp_path / "run"
    args = [
        "--data",
        str(tiny_data),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out",
        str(out),
        "--epochs",
        "6",
        *TINY,
        "--lr",
        "0.05",
        "--teacher",
        str(teacher),
        "--ema",
        "0.9",
    ]
    code, _ = interrupt_after_first_epoch("training", args, out, signal.SIGTERM)
    assert code == 130
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["ema"] and state["teacher"]["sha256"]

    other = tmp_path / "other.pt"
    blob = torch.load(teacher, weights_only=True)
    blob["state_dict"] = {k: v + 1 if v.is_floating_point() else v for k, v in blob["state_dict"].items()}
    torch.save(blob, other)
    code, stderr = train_main("--out", out, "--resume", "--teacher", other)
    assert code == 2 and "is not the teacher the run started with" in stderr

    resumed = run_module("training", "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [h["epoch"] for h in json.loads((out / "history.json").read_text())] == list(range(1, 7))


@pytest.mark.slow
def test_killed_teacher_resumes_where_it_stopped(tiny_data, tmp_path, capsys):
    out = tmp_path / "teacher"
    args = [
        "--data",
        str(tiny_data),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out",
        str(out),
        "--epochs",
        "6",
        *TINY_TEACHER,
    ]
    code, stderr = interrupt_after_first_epoch("training.teacher", args, out, signal.SIGINT)
    assert code == 130 and "continue with --resume" in stderr
    before = json.loads((out / "history.json").read_text())

    capsys.readouterr()
    assert teacher_main(["--out", str(out), "--resume", "--epochs", "9"]) == 2  # in this process
    assert "--epochs cannot change" in capsys.readouterr().err
    resumed = run_module("training.teacher", "--out", str(out), "--resume", "--threads", "1")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    after = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in after] == list(range(1, 7)) and after[: len(before)] == before
    assert load_teacher(out / "teacher.pt")[1]["config"]["threads"] == 1


def test_training_loss_terms():
    torch.manual_seed(0)
    logits, other = torch.randn(8, 10), torch.randn(8, 10)
    y, y2 = torch.randint(0, 10, (8,)), torch.randint(0, 10, (8,))
    cfg = TrainConfig(label_smoothing=0.1, kd_weight=0.75, kd_temperature=4.0)
    ce = F.cross_entropy(logits, y, label_smoothing=0.1)
    assert torch.allclose(training_loss(logits, y, cfg), ce)
    # a teacher that agrees with the student adds nothing; one that disagrees adds T^2 * KL
    assert torch.allclose(training_loss(logits, y, cfg, logits.clone()), 0.25 * ce)
    kl = F.kl_div(F.log_softmax(logits / 4, 1), F.softmax(other / 4, 1), reduction="batchmean")
    assert torch.allclose(training_loss(logits, y, cfg, other), 0.25 * ce + 0.75 * 16 * kl)
    # mixup blends the cross-entropy over the pair of labels
    ce2 = F.cross_entropy(logits, y2, label_smoothing=0.1)
    assert torch.allclose(training_loss(logits, y, cfg, mix=(0.3, y2)), 0.3 * ce + 0.7 * ce2)
