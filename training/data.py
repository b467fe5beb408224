"""CIFAR-10 as in-memory uint8 tensors, from torchvision's download or an ImageFolder directory/archive.

Every image goes through `app.preprocess.load_image`, the same rule the service applies to an
upload, so evaluation here and predictions there see identical pixels. Decoded splits are cached
as one tensor file per source under the cache folder, so the second run starts in a second.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch

from app.checkpoint import atomic_torch_save, file_sha256
from app.model import CLASSES
from app.preprocess import load_image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
CACHE_VERSION = 1


class DataError(Exception):
    """The data source cannot be used; the message says why in one sentence."""


@dataclass
class Split:
    images: torch.Tensor  # uint8 (N, 3, 32, 32)
    labels: torch.Tensor  # int64 (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> Split:
        return Split(self.images[index], self.labels[index])


@dataclass
class Cifar10:
    train: Split
    test: Split
    source: str
    fingerprint: str  # sha256 of the decoded pixels and labels of both splits


def fingerprint(*splits: Split) -> str:
    digest = hashlib.sha256()
    for s in splits:
        digest.update(s.images.contiguous().numpy().tobytes())
        digest.update(s.labels.contiguous().numpy().tobytes())
    return digest.hexdigest()


def _read_image_folder(root: Path) -> Split:
    """root/<class>/<image> for the ten CIFAR-10 classes -> a Split, labels in CLASSES order."""
    found = sorted(p.name for p in root.iterdir() if p.is_dir())
    if sorted(found) != sorted(CLASSES):
        raise DataError(f"{root} must hold one folder per CIFAR-10 class {list(CLASSES)}, found {found}")
    images, labels = [], []
    for label, name in enumerate(CLASSES):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        for path in files:
            images.append(load_image(path))
            labels.append(label)
    if not images:
        raise DataError(f"{root} holds no images")
    return Split(torch.stack(images), torch.tensor(labels, dtype=torch.int64))


def _find_split_root(root: Path) -> Path:
    """The folder that holds train/ and test/ (the archive may wrap them in one top folder)."""
    for candidate in [root, *sorted(p for p in root.iterdir() if p.is_dir())]:
        if (candidate / "train").is_dir() and (candidate / "test").is_dir():
            return candidate
    raise DataError(f"{root} has no train/ and test/ folders in the ImageFolder layout")


def _unpack(archive: Path, cache_dir: Path, digest: str) -> Path:
    target = cache_dir / f"unpacked-{digest[:16]}"
    done = target / ".complete"
    if not done.exists():
        log.info("unpacking %s into %s", archive, target)
        tmp = target.with_suffix(".partial")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        tmp.rename(target)
        done.touch()
    return target


def _load_folder_source(path: Path, cache_dir: Path) -> tuple[Split, Split]:
    if path.is_file():
        if not tarfile.is_tarfile(path):
            raise DataError(f"{path} is not a tar archive")
        root = _unpack(path, cache_dir, file_sha256(path))
    elif path.is_dir():
        root = path
    else:
        raise DataError(f"data source {path} does not exist")
    root = _find_split_root(root)
    log.info("decoding images under %s", root)
    return _read_image_folder(root / "train"), _read_image_folder(root / "test")


def _load_torchvision(cache_dir: Path) -> tuple[Split, Split]:
    from torchvision.datasets import CIFAR10  # downloads on first use

    splits = []
    for train in (True, False):
        ds = CIFAR10(root=str(cache_dir / "torchvision"), train=train, download=True)
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        splits.append(Split(images, torch.tensor(ds.targets, dtype=torch.int64)))
    if tuple(ds.classes) != CLASSES:
        raise DataError(f"torchvision's CIFAR10 classes {ds.classes} differ from {list(CLASSES)}")
    return splits[0], splits[1]


def _folder_key(root: Path) -> str:
    """Changes whenever a file under `root` is added, removed, resized or rewritten."""
    digest = hashlib.sha256(str(root.resolve()).encode())
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            digest.update(f"{p.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def load_cifar10(source: str, cache_dir: str | Path = ".cache/data") -> Cifar10:
    """`source` is "cifar10" (torchvision download), an ImageFolder directory, or a .tar.gz of one."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    if source == "cifar10":
        key = "torchvision-cifar10"
    else:
        path = Path(source)
        if not path.exists():
            raise DataError(f"data source {source} does not exist")
        key = file_sha256(path)[:16] if path.is_file() else _folder_key(path)
    cached = cache_dir / f"tensors-{key}-v{CACHE_VERSION}.pt"
    if cached.exists():
        blob = torch.load(cached, weights_only=True)
        log.info("loaded decoded data from %s", cached)
        train = Split(blob["train_images"], blob["train_labels"])
        test = Split(blob["test_images"], blob["test_labels"])
        return Cifar10(train, test, source, blob["fingerprint"])
    if source == "cifar10":
        train, test = _load_torchvision(cache_dir)
    else:
        train, test = _load_folder_source(Path(source), cache_dir)
    fp = fingerprint(train, test)
    atomic_torch_save(
        {
            "train_images": train.images,
            "train_labels": train.labels,
            "test_images": test.images,
            "test_labels": test.labels,
            "fingerprint": fp,
        },
        cached,
    )
    return Cifar10(train, test, source, fp)


def split_validation(train: Split, val_size: int, seed: int) -> tuple[Split, Split]:
    """Hold out `val_size` training images (a seeded random choice) for model selection."""
    if not 0 <= val_size < len(train):
        raise DataError(f"validation size {val_size} must be below the {len(train)} training images")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    return train.subset(order[val_size:]), train.subset(order[:val_size])


def limit_split(split: Split, n: int, seed: int) -> Split:
    """A seeded random subset of at most `n` images (for --limit and --dry-run)."""
    if n >= len(split):
        return split
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))
    return split.subset(order[:n])
