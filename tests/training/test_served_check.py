"""`python -m training.evaluate --check-service`: the served labels against evaluation's, end to end."""

import json

import pytest
import torch

from app.checkpoint import save_checkpoint
from app.model import CLASSES, FinalModel, LiteModel
from training.served import local_service

from .conftest import run_evaluate

pytestmark = pytest.mark.slow  # a real server or subprocess: .ci/run runs these (pytest -m slow)


def test_the_service_on_the_same_weights_agrees_on_every_test_image(checkpoint_path, tiny_archive, tmp_path):
    out = tmp_path / "eval"
    proc = run_evaluate(checkpoint_path, tiny_archive, tmp_path, "--check-service", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "served labels: 30 of 30 agree with this evaluation" in proc.stdout
    assert "HTTP Request" not in proc.stderr  # no log line per served request
    service = json.loads((out / "evaluation.json").read_text())["service"]
    assert service["images"] == 30 and service["disagree"] == 0
    assert service["served_accuracy"] == json.loads((out / "evaluation.json").read_text())["test"]["accuracy"]


def test_a_lite_checkpoint_is_checked_against_the_served_lite_model(tiny_archive, tmp_path):
    """The service serves it as model "lite" beside its default FinalModel, and the check asks for
    that model: a service answering with FinalModel (or another lite file) would agree on few."""
    torch.manual_seed(1)
    lite = tmp_path / "lite.pt"
    save_checkpoint(lite, LiteModel(), metrics={"test_acc": 0.5}, epoch=1, created_at="2026-01-01T00:00:00")
    out = tmp_path / "eval"
    proc = run_evaluate(lite, tiny_archive, tmp_path, "--check-service", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "served labels: 30 of 30 agree with this evaluation" in proc.stdout
    assert json.loads((out / "evaluation.json").read_text())["service"]["disagree"] == 0


def test_a_service_on_other_weights_is_caught(checkpoint_path, tiny_archive, tmp_path):
    """The other model's classifier rows are rolled by one: every served label moves to the next class."""
    torch.manual_seed(0)  # the seed checkpoint_path was made with: the same model
    model = FinalModel()
    with torch.no_grad():
        model.fc.weight.copy_(model.fc.weight.roll(1, dims=0))
    shifted = tmp_path / "shifted.pt"
    save_checkpoint(shifted, model, metrics={"test_acc": 0.5}, epoch=1, created_at="2026-01-01T00:00:00")

    with local_service(shifted) as url:
        proc = run_evaluate(
            checkpoint_path, tiny_archive, tmp_path, "--service-url", url, "--max-disagree", "3"
        )
    assert proc.returncode == 1
    assert "served labels: 0 of 30 agree with this evaluation" in proc.stdout
    assert "30 served labels differ from this evaluation (at most 3 allowed)" in proc.stderr
    first = next(line for line in proc.stdout.splitlines() if line.startswith("  "))
    served, evaluated = first.split("served ")[1].split(", evaluated ")
    assert CLASSES.index(served) == (CLASSES.index(evaluated.strip()) + 1) % len(CLASSES)


def test_the_torchvision_source_is_refused_plainly(checkpoint_path, tmp_path):
    proc = run_evaluate(checkpoint_path, "cifar10", tmp_path, "--check-service")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: --check-service: the torchvision download has no image files; "
        "use an ImageFolder folder or archive"
    )


def test_an_unreachable_service_is_one_clear_error(checkpoint_path, tiny_archive, tmp_path):
    proc = run_evaluate(checkpoint_path, tiny_archive, tmp_path, "--service-url", "http://127.0.0.1:9")
    assert proc.returncode == 1
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("error: --check-service: cannot reach the service at http://127.0.0.1:9 (ConnectError: ")
    )
