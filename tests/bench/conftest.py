"""A tiny CIFAR-10-shaped JPEG archive for the benchmark scripts' smoke runs, made by the tests."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from app.model import CLASSES

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def jpeg_archive(tmp_path_factory) -> Path:
    """cifar10/{train,test}/<class>/NNNN.jpg: 4 training and 2 test 32x32 JPEGs per class."""
    path = tmp_path_factory.mktemp("bench-data") / "cifar10-tiny.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for split, count in (("train", 4), ("test", 2)):
            for label, name in enumerate(CLASSES):
                for i in range(count):
                    buffer = io.BytesIO()
                    colour = ((label * 25 + i * 7) % 256, (label * 70) % 256, (255 - label * 25) % 256)
                    Image.new("RGB", (32, 32), colour).save(buffer, "JPEG", quality=90)
                    info = tarfile.TarInfo(f"cifar10/{split}/{name}/{i:04d}.jpg")
                    info.size = len(buffer.getvalue())
                    tar.addfile(info, io.BytesIO(buffer.getvalue()))
    return path
