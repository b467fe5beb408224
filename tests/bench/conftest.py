"""A tiny CIFAR-10-shaped JPEG archive for the benchmark scripts' smoke runs, made by the tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from ..tiny import make_archive, make_image_folder

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def jpeg_archive(tmp_path_factory) -> Path:
    """cifar10/{train,test}/<class>/NNNN.jpg: 4 training and 2 test 32x32 JPEGs per class."""
    tmp = tmp_path_factory.mktemp("bench-data")
    folder = make_image_folder(tmp / "cifar10", {"train": 4, "test": 2}, suffix=".jpg")
    return make_archive(folder, tmp / "cifar10-tiny.tar.gz")
