"""Tiny CIFAR-10-shaped data the tests make themselves: image tensors, ImageFolder trees, archives.

One builder for every test folder, so that the training tests, the service tests and the
benchmark smoke runs read data of one kind.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import torch
from PIL import Image

from app.model import CLASSES


def smooth_images(n: int, seed: int = 0, low: int = 4) -> torch.Tensor:
    """uint8 (n, 3, 32, 32): random low x low images scaled up bilinearly, like blurry photos, so
    that a test model gives them different labels (noise gets one label from an untrained model)."""
    generator = torch.Generator().manual_seed(seed)
    small = torch.rand(n, 3, low, low, generator=generator)
    images = torch.nn.functional.interpolate(small, size=32, mode="bilinear", align_corners=False)
    return (images * 255).round().to(torch.uint8)


def make_image_folder(root: Path, per_class: dict[str, int], seed: int = 0, suffix: str = ".png") -> Path:
    """root/{split}/{class}/NNNN{suffix}, per_class[split] images per class: each class a noisy
    version of its own colour, so it is learnable. `suffix` picks the format (.png, .jpg)."""
    g = torch.Generator().manual_seed(seed)
    for split, count in per_class.items():
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            base = torch.tensor([(label * 25) % 256, (label * 70) % 256, (255 - label * 25) % 256])
            for i in range(count):
                noise = torch.randint(-40, 41, (32, 32, 3), generator=g)
                pixels = (base + noise).clamp(0, 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i:04d}{suffix}")
    return root


def make_archive(folder: Path, path: Path) -> Path:
    """`folder` as a .tar.gz with one top-level folder, cifar10/, like the shipped archive."""
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname="cifar10")
    return path
