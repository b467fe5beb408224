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
    fingerprint: str  # sha256 of the decoded pixels and labels of both splits


def fingerprint(*splits: Split) -> str:
    digest = hashlib.sha256()
    for s in splits:
        digest.update(s.images.contiguous().numpy().tobytes())
        digest.update(s.labels.contiguous().numpy().tobytes())
    return digest.hexdigest()


def _list_image_folder(root: Path) -> list[tuple[Path, int]]:
    """root/<class>/<image> for the ten CIFAR-10 classes -> (file, label), in the Split's order."""
    found = sorted(p.name for p in root.iterdir() if p.is_dir())
    if sorted(found) != sorted(CLASSES):
        raise DataError(f"{root} must hold one folder per CIFAR-10 class {list(CLASSES)}, found {found}")
    files = [
        (path, label)
        for label, name in enumerate(CLASSES)
        for path in sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    ]
    if not files:
        raise DataError(f"{root} holds no images")
    return files


def _read_image_folder(root: Path) -> Split:
    """root/<class>/<image> for the ten CIFAR-10 classes -> a Split, labels in CLASSES order."""
    files = _list_image_folder(root)
    images = torch.stack([load_image(path) for path, _ in files])
    return Split(images, torch.tensor([label for _, label in files], dtype=torch.int64))


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


def _folder_root(path: Path, cache_dir: Path) -> Path:
    """The folder holding train/ and test/ of an ImageFolder directory or archive (unpacked once)."""
    if path.is_file():
        if not tarfile.is_tarfile(path):
            raise DataError(f"{path} is not a tar archive")
        root = _unpack(path, cache_dir, file_sha256(path))
    elif path.is_dir():
        root = path
    else:
        raise DataError(f"data source {path} does not exist")
    return _find_split_root(root)


def test_split_files(source: str, cache_dir: str | Path = ".cache/data") -> list[tuple[Path, int]]:
    """The test split's image files with their labels, in the order of `load_cifar10(source).test`.

    Only for an ImageFolder directory or archive: torchvision's download holds no files.
    """
    if source == "cifar10":
        raise DataError("the torchvision download has no image files; use an ImageFolder folder or archive")
    return _list_image_folder(_folder_root(Path(source), Path(cache_dir)) / "test")


def _load_folder_source(path: Path, cache_dir: Path) -> tuple[Split, Split]:
    root = _folder_root(path, cache_dir)
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
        return Cifar10(train, test, blob["fingerprint"])
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
    return Cifar10(train, test, fp)


def split_validation(train: Split, val_size: int, seed: int) -> tuple[Split, Split]:
    """Hold out `val_size` training images (a seeded random choice) for model selection."""
    if not 0 <= val_size < len(train):
        raise DataError(f"validation size {val_size} must be below the {len(train)} training images")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    return train.subset(order[val_size:]), train.subset(order[:val_size])


def limit_index(total: int, n: int, seed: int) -> torch.Tensor:
    """Which of `total` images a seeded random subset of at most `n` keeps (all, in order, if n >= total)."""
    if n >= total:
        return torch.arange(total)
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n]


def limit_split(split: Split, n: int, seed: int) -> Split:
    """A seeded random subset of at most `n` images (for --limit and --dry-run)."""
    return split if n >= len(split) else split.subset(limit_index(len(split), n, seed))
