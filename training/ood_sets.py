"""Pictures that are not CIFAR-10, made here with no download, to measure the unsure flag.

Each builder returns uint8 (N, 3, 32, 32), the service's input, and is seeded:

- `uniform_noise`: every pixel uniform in 0..255;
- `smooth_noise`: 4x4 random colours upsampled (blobs);
- `textures`: crops of scikit-image's bundled brick, grass and gravel textures;
- `photos`: crops of its bundled photographs that hold no CIFAR-10 class (a person, a camera, a
  coffee cup, coins, the moon, a galaxy field, cells, tissue, a retina);
- `digits`: scikit-learn's bundled 8x8 handwritten digits, upsampled;
- `text`: rendered lines of words in random colours;
- `scrambled`: CIFAR-10 test images with their pixels shuffled (colours kept, shapes gone).

None of them fits the detector: it is fitted on CIFAR-10 training images and thresholded on the
validation split alone, so every set here judges it.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from app.model import IMAGE_SIZE


def _chw(pixels: np.ndarray) -> torch.Tensor:
    """(H, W, 3) or (H, W) uint8 -> (3, H, W)."""
    if pixels.ndim == 2:
        pixels = np.stack([pixels] * 3, -1)
    return torch.from_numpy(np.array(pixels[..., :3], dtype=np.uint8)).permute(2, 0, 1)  # a writable copy


def _resized(pixels: np.ndarray) -> torch.Tensor:
    image = Image.fromarray(pixels.astype(np.uint8)).resize(
        (IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR
    )
    return _chw(np.asarray(image))


def uniform_noise(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8, generator=g)


def smooth_noise(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    return (F.interpolate(low, size=IMAGE_SIZE, mode="bicubic").clamp(0, 1) * 255).round().to(torch.uint8)


def _crops(pictures: list[np.ndarray], n: int, seed: int) -> torch.Tensor:
    """n square crops (32 pixels up to half the picture's side) of the pictures in turn, at 32x32."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        picture = pictures[i % len(pictures)]
        h, w = picture.shape[:2]
        side = int(rng.integers(IMAGE_SIZE, min(h, w) // 2 + 1))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        out.append(_resized(picture[y : y + side, x : x + side]))
    return torch.stack(out)


def textures(n: int, seed: int = 2) -> torch.Tensor:
    import skimage.data as sd

    return _crops([sd.brick(), sd.grass(), sd.gravel()], n, seed)


def photos(n: int, seed: int = 3) -> torch.Tensor:
    import skimage.data as sd

    pictures = [sd.astronaut(), sd.camera(), sd.coffee(), sd.coins(), sd.moon(), sd.hubble_deep_field(),
                sd.cell(), sd.immunohistochemistry(), sd.retina()]  # fmt: skip
    return _crops(pictures, n, seed)


def digits(n: int, seed: int = 4) -> torch.Tensor:
    from sklearn.datasets import load_digits

    images = load_digits().images  # (1797, 8, 8), 0..16
    order = np.random.default_rng(seed).permutation(len(images))[:n]
    return torch.stack([_resized(images[i] / 16 * 255) for i in order])


WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "invoice",
    "total",
    "page",
    "chart",
    "2026",
    "sales",
    "report",
    "hello",
    "world",
    "error",
    "404",
    "OK",
    "cancel",
    "submit",
    "menu",
    "login",
    "password",
    "settings",
]


def text(n: int, seed: int = 5) -> torch.Tensor:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        background = tuple(rng.randint(0, 255) for _ in range(3))
        ink = (
            tuple(255 - c for c in background)
            if rng.random() < 0.5
            else tuple(rng.randint(0, 255) for _ in range(3))
        )
        image = Image.new("RGB", (64, 64), background)
        draw = ImageDraw.Draw(image)
        font = ImageFont.load_default(size=rng.randint(10, 22))
        y = rng.randint(-5, 10)
        while y < 64:
            line = " ".join(rng.choice(WORDS) for _ in range(4))
            draw.text((rng.randint(-10, 4), y), line, fill=ink, font=font)
            y += rng.randint(12, 24)
        out.append(_resized(np.asarray(image)))
    return torch.stack(out)


def scrambled(images: torch.Tensor, n: int, seed: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    flat = images[:n].reshape(len(images[:n]), 3, -1)
    order = torch.stack([torch.randperm(flat.shape[2], generator=g) for _ in range(len(flat))])
    return torch.gather(flat, 2, order.unsqueeze(1).expand(-1, 3, -1)).reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE)


def ood_sets(test_images: torch.Tensor, n: int = 2000) -> dict[str, torch.Tensor]:
    """Every set, by name, n images each (digits: all 1,797 when n is larger)."""
    builders: dict[str, Callable[[], torch.Tensor]] = {
        "uniform noise": lambda: uniform_noise(n),
        "smooth noise": lambda: smooth_noise(n),
        "textures": lambda: textures(n),
        "photos (no CIFAR-10 class)": lambda: photos(n),
        "digits": lambda: digits(n),
        "text": lambda: text(n),
        "scrambled CIFAR-10 test": lambda: scrambled(test_images, n),
    }
    return {name: build() for name, build in builders.items()}
