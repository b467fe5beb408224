"""`python -m training.evaluate --backend ...`: evaluation through the service's predictor, any backend."""

import pytest

from .conftest import run_evaluate

pytestmark = pytest.mark.slow  # a real server or subprocess: .ci/run runs these (pytest -m slow)


def test_onnxruntime_evaluation_reports_its_agreement_with_pytorch_fp32(
    checkpoint_path, tiny_archive, tmp_path
):
    proc = run_evaluate(checkpoint_path, tiny_archive, tmp_path, "--backend", "onnxruntime")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "backend onnxruntime, precision fp32" in proc.stdout
    accuracy = proc.stdout.split("test accuracy: ")[1].split("%")[0]
    assert f"labels that differ from PyTorch fp32 NCHW: 0 of 30 (its accuracy {accuracy}%)" in proc.stdout


def test_the_reference_configuration_compares_with_nothing(checkpoint_path, tiny_archive, tmp_path):
    proc = run_evaluate(checkpoint_path, tiny_archive, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "backend pytorch, precision fp32, layout nchw" in proc.stdout
    assert "labels that differ" not in proc.stdout


def test_a_backend_that_cannot_run_the_precision_is_one_clear_error(checkpoint_path, tiny_archive, tmp_path):
    proc = run_evaluate(
        checkpoint_path, tiny_archive, tmp_path, "--backend", "onnxruntime", "--precision", "bf16"
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: the onnxruntime backend runs fp32 only; use the pytorch backend for bf16"
    )
