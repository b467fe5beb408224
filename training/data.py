"""CIFAR-10 as in-memory uint8 tensors, from torchvision's download or an ImageFolder directory/archive.

Every image goes through `app.preprocess.load_image`, the same rule the service applies to an
upload, so evaluation here and predictions there see identical pixels. Decoded splits are cached
as one tensor file per source (about 180 MB for CIFAR-10) in the user's cache folder
(`$XDG_CACHE_HOME/cifar10-cnn`, else `~/.cache/cifar10-cnn`, or `--cache-dir`), never in the
repository, so the second run starts in a second. An archive is decoded straight from the tar;
only `--check-service`, which posts the test files as they are, unpacks the test split there.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch

from app.checkpoint import atomic_torch_save, file_sha256
from app.model import CLASSES
from app.preprocess import load_image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
CACHE_VERSION = 1
SPLITS = ("train", "test")


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


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/cifar10-cnn, else ~/.cache/cifar10-cnn."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cifar10-cnn"


def cache_folder(cache_dir: str | Path | None) -> Path:
    """`cache_dir` when given, else the default; made if missing."""
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    return folder


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


def _archive_files(
    archive: Path, splits: tuple[str, ...] = SPLITS
) -> dict[str, list[tuple[str, int, bytes]]]:
    """{split: [(path, label, bytes)]} of the images under .../{train,test}/<class>/ in a tar, read
    in one pass (a .tar.gz cannot seek back cheaply) and sorted as an unpacked folder lists them."""
    if not tarfile.is_tarfile(archive):
        raise DataError(f"{archive} is not a tar archive")
    found: dict[str, list[tuple[str, int, bytes]]] = {split: [] for split in splits}
    with tarfile.open(archive) as tar:
        for member in tar:
            path = PurePosixPath(member.name)
            parts = path.parts
            if (
                member.isfile()
                and len(parts) >= 3
                and parts[-3] in splits
                and parts[-2] in CLASSES
                and path.suffix.lower() in IMAGE_SUFFIXES
            ):
                file = tar.extractfile(member)
                assert file is not None  # a regular file
                found[parts[-3]].append((member.name, CLASSES.index(parts[-2]), file.read()))
    missing = [split for split in splits if not found[split]]
    if missing:
        raise DataError(f"{archive} has no {'/, '.join(missing)}/ images in the ImageFolder layout")
    return {split: sorted(files, key=lambda f: (f[1], f[0])) for split, files in found.items()}


def _read_archive(archive: Path) -> tuple[Split, Split]:
    """Both splits decoded straight from the tar, in the order an unpacked folder gives."""
    splits = []
    for files in _archive_files(archive).values():
        images = torch.stack([load_image(io.BytesIO(data)) for _, _, data in files])
        splits.append(Split(images, torch.tensor([label for _, label, _ in files], dtype=torch.int64)))
    return splits[0], splits[1]


def _unpack_test_split(archive: Path, cache_dir: Path) -> Path:
    """The archive's test split unpacked once under the cache folder; the folder holding test/."""
    target = cache_dir / f"test-files-{file_sha256(archive)[:16]}"
    done = target / ".complete"
    if not done.exists():
        log.info("unpacking the test split of %s into %s", archive, target)
        tmp = target.with_suffix(".partial")
        if tmp.exists():
            shutil.rmtree(tmp)
        for path, label, data in _archive_files(archive, ("test",))["test"]:
            out = tmp / "test" / CLASSES[label] / PurePosixPath(path).name
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(data)
        tmp.rename(target)
        done.touch()
    return target


def test_split_files(source: str, cache_dir: str | Path | None = None) -> list[tuple[Path, int]]:
    """The test split's image files with their labels, in the order of `load_cifar10(source).test`.

    Only for an ImageFolder directory or archive: torchvision's download holds no files.
    """
    if source == "cifar10":
        raise DataError("the torchvision download has no image files; use an ImageFolder folder or archive")
    path = Path(source)
    if path.is_file():
        return _list_image_folder(_unpack_test_split(path, cache_folder(cache_dir)) / "test")
    if not path.is_dir():
        raise DataError(f"data source {path} does not exist")
    return _list_image_folder(_find_split_root(path) / "test")


def _load_folder(path: Path) -> tuple[Split, Split]:
    root = _find_split_root(path)
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


def load_cifar10(source: str, cache_dir: str | Path | None = None) -> Cifar10:
    """`source` is "cifar10" (torchvision download), an ImageFolder directory, or a .tar.gz of one;
    the decoded tensors are cached in `cache_dir` (default: `default_cache_dir()`)."""
    folder = cache_folder(cache_dir)
    if source == "cifar10":
        key = "torchvision-cifar10"
    else:
        path = Path(source)
        if not path.exists():
            raise DataError(f"data source {source} does not exist")
        key = file_sha256(path)[:16] if path.is_file() else _folder_key(path)
    cached = folder / f"tensors-{key}-v{CACHE_VERSION}.pt"
    if cached.exists():
        blob = torch.load(cached, weights_only=True)
        log.info("loaded decoded data from %s", cached)
        train = Split(blob["train_images"], blob["train_labels"])
        test = Split(blob["test_images"], blob["test_labels"])
        return Cifar10(train, test, blob["fingerprint"])
    if source == "cifar10":
        train, test = _load_torchvision(folder)
    elif Path(source).is_file():
        log.info("decoding the images of %s", source)
        train, test = _read_archive(Path(source))
    else:
        train, test = _load_folder(Path(source))
    fp = fingerprint(train, test)
    blob = {
        "train_images": train.images,
        "train_labels": train.labels,
        "test_images": test.images,
        "test_labels": test.labels,
        "fingerprint": fp,
    }
    atomic_torch_save(blob, cached)
    log.info("cached the decoded data in %s (%.0f MB)", cached, cached.stat().st_size / 1e6)
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
