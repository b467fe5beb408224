"""Fixtures for the training tests: a tiny data set as a folder and as an archive (built by
tests/tiny.py), a checkpoint, and training or evaluation runs as a user starts them."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

from app.checkpoint import save_checkpoint
from app.model import FinalModel

from ..tiny import make_archive, make_image_folder

REPO = Path(__file__).resolve().parents[2]

# last.pt's keys, as the code before the flat train.py wrote them (weights/lite-run/last.pt, say):
# a run saved by an older version must still resume.
TRAIN_STATE_KEYS = {
    "format", "config", "epoch", "batch", "sums", "elapsed", "model", "optimizer", "scheduler",
    "history", "best", "data_fingerprint", "init", "teacher", "ema", "saved_at",
}  # fmt: skip
BEST_KEYS = {"val_acc", "epoch", "train_acc", "state_dict", "weights"}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """12 training and 3 test images per class."""
    return make_image_folder(tmp_path_factory.mktemp("tiny"), {"train": 12, "test": 3})


@pytest.fixture(scope="session")
def tiny_archive(tiny_data, tmp_path_factory) -> Path:
    """The same images as a .tar.gz with one top-level folder, like the shipped archive."""
    return make_archive(tiny_data, tmp_path_factory.mktemp("archive") / "tiny.tar.gz")


@pytest.fixture
def checkpoint_path(tmp_path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "model.pt"
    save_checkpoint(path, FinalModel(), metrics={"test_acc": 0.5}, epoch=1, created_at="2026-01-01T00:00:00")
    return path


def png_bytes(color=(200, 30, 30), size=(32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def python_cmd(*args: str) -> list[str]:
    return [sys.executable, *args]


# A bound against a hang, not a speed check: on a loaded two-core machine a tiny run has taken 4 minutes.
SUBPROCESS_TIMEOUT = 900.0


def run_training(*args: str, timeout: float = SUBPROCESS_TIMEOUT) -> subprocess.CompletedProcess:
    """`python -m training ARGS` in a process of its own, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "training", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def run_evaluate(weights, data, tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "training.evaluate", "--weights", str(weights), "--data", str(data),
         "--cache-dir", str(tmp_path / "cache"), *args],
        cwd=REPO, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT,
    )  # fmt: skip


@pytest.fixture
def train_main(capsys) -> Callable[..., tuple[int, str]]:
    """`python -m training ARGS` in this process, for runs refused before the first step:
    (exit code, stderr). argparse's own errors count as exit code 2. The torch thread count a
    run sets is put back afterwards."""
    from training.train import main

    threads = torch.get_num_threads()

    def call(*args: str) -> tuple[int, str]:
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        return code, capsys.readouterr().err

    yield call
    torch.set_num_threads(threads)


def signal_one_torchrun_worker(cmd: list[str], out: Path) -> str:
    """Start a two-process torchrun `cmd`; once its first epoch is in out/history.json, SIGINT one
    worker only (as a late-arriving signal is) and wait for the launcher; its stderr."""
    launcher = subprocess.Popen(
        cmd,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT
    while not (out / "history.json").exists() and time.monotonic() < deadline and launcher.poll() is None:
        time.sleep(0.05)
    assert launcher.poll() is None, "the run ended before it could be interrupted"
    workers = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    assert len(workers) == 2
    os.kill(int(workers[-1]), signal.SIGINT)
    return launcher.communicate(timeout=60)[1]
