"""`cifar10-cnn predict` / `python -m app` and the Client class against a real service process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from app.checkpoint import build_model, load_checkpoint
from app.client import CHUNK, Client, ClientError, FileError
from app.model import CLASSES
from app.preprocess import load_image, normalize

from ..live import REPO, SHIPPED, free_port, live_service

pytestmark = pytest.mark.slow  # a real server or subprocess: .ci/run runs these (pytest -m slow)

SAMPLES = sorted((REPO / "samples").glob("*.jpg"))


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


@pytest.fixture(scope="module")
def service(lite_weights) -> Iterator[str]:
    """`python -m app serve` on the shipped weights and a LiteModel made here, on a free loopback port."""
    with live_service(CIFAR10_LITE_WEIGHTS=str(lite_weights)) as url:
        yield url


def expected_labels(paths: list[Path], weights: Path = SHIPPED) -> list[str]:
    """What a checkpoint says for each file, computed here by the shared preprocessing."""
    model = build_model(load_checkpoint(weights))
    with torch.no_grad():
        logits = model(normalize(torch.stack([load_image(p) for p in paths])))
    return [CLASSES[i] for i in logits.argmax(1).tolist()]


def test_the_repository_ships_one_sample_image_per_class():
    assert [p.stem for p in SAMPLES] == sorted(CLASSES)


def test_predict_prints_each_files_label(service):
    proc = cli("predict", *map(str, SAMPLES), "--url", service, "--top-k", "2")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == len(SAMPLES)
    for line, path, label in zip(lines, SAMPLES, expected_labels(SAMPLES), strict=True):
        name, printed, confidence, *rest = line.split()
        assert (name, printed) == (path.name, label)
        assert 0 < float(confidence) <= 1 and len(rest) == 2  # "(second 0.123)"


def test_predict_json_is_the_services_answer(service):
    proc = cli("predict", str(SAMPLES[3]), "--url", service, "--json", "--top-k", "4")
    assert proc.returncode == 0, proc.stderr
    [prediction] = json.loads(proc.stdout)
    assert prediction["filename"] == SAMPLES[3].name and len(prediction["top_k"]) == 4
    assert prediction["label"] == expected_labels([SAMPLES[3]])[0]


@pytest.mark.parametrize(
    ("make", "code", "message"),
    [
        (lambda tmp: tmp / "missing.jpg", 2, "missing.jpg: no such file"),
        (lambda tmp: tmp, 2, "is a folder, not an image file"),
        (
            lambda tmp: (tmp / "notes.jpg").write_text("hello") and tmp / "notes.jpg",
            1,
            "the service answered 415",
        ),
    ],
)
def test_a_bad_file_is_one_clear_line_and_a_nonzero_exit(service, tmp_path, make, code, message):
    proc = cli("predict", str(make(tmp_path)), "--url", service)
    assert proc.returncode == code
    assert proc.stdout == "" and len(proc.stderr.splitlines()) == 1
    assert proc.stderr.startswith("error: ") and message in proc.stderr


def test_an_unreachable_service_is_one_clear_line():
    url = f"http://127.0.0.1:{free_port()}"
    proc = cli("predict", str(SAMPLES[0]), "--url", url)
    assert proc.returncode == 1 and len(proc.stderr.splitlines()) == 1
    assert f"cannot reach the service at {url}" in proc.stderr


def test_top_k_out_of_range_is_a_usage_error():
    proc = cli("predict", str(SAMPLES[0]), "--top-k", "11")
    assert proc.returncode == 2 and "--top-k must be between 1 and 10" in proc.stderr


def test_client_keeps_order_across_requests(service):
    paths = [SAMPLES[i % len(SAMPLES)] for i in range(CHUNK + 5)]  # two requests
    with Client(service) as client:
        assert client.ready()
        predictions = client.predict(paths, top_k=1)
        assert client.summary()["total_params"] == 149_584
    assert [p["filename"] for p in predictions] == [p.name for p in paths]
    assert [p["label"] for p in predictions] == expected_labels(paths)


def test_client_errors_carry_the_services_status_and_code(service, tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with Client(service) as client, pytest.raises(ClientError) as caught:
        client.predict([SAMPLES[0], empty])
    assert caught.value.status == 400 and caught.value.code == "empty_file"
    with Client(service) as client, pytest.raises(FileError):
        client.predict([tmp_path / "nope.png"])


def test_model_lite_asks_the_small_model(service, lite_weights):
    proc = cli("predict", *map(str, SAMPLES[:4]), "--url", service, "--model", "lite", "--top-k", "1")
    assert proc.returncode == 0, proc.stderr
    printed = [line.split()[1] for line in proc.stdout.splitlines()]
    assert printed == expected_labels(SAMPLES[:4], lite_weights)
    with Client(service) as client:
        assert client.summary("lite")["total_params"] == 47_648
    proc = cli("predict", str(SAMPLES[0]), "--url", service, "--model", "huge")
    assert proc.returncode == 1 and proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and "'huge'" in proc.stderr


def test_the_console_script_is_installed():
    script = shutil.which("cifar10-cnn")
    assert script, "pip install -e . installs the cifar10-cnn command"
    proc = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "predict" in proc.stdout and "serve" in proc.stdout
