import pytest
import torch

from app.model import CLASSES
from training.data import DataError, load_cifar10, split_validation
from training.data import test_split_files as files_of_the_test_split

from ..tiny import make_image_folder


def test_archive_and_folder_give_the_same_tensors(tiny_data, tiny_archive, tmp_path):
    a = load_cifar10(str(tiny_data), tmp_path / "c1")
    b = load_cifar10(str(tiny_archive), tmp_path / "c2")
    assert a.train.images.shape == (120, 3, 32, 32) and a.train.images.dtype == torch.uint8
    assert a.test.labels.tolist() == [c for c in range(len(CLASSES)) for _ in range(3)]
    assert torch.equal(a.train.images, b.train.images) and a.fingerprint == b.fingerprint
    again = load_cifar10(str(tiny_archive), tmp_path / "c2")  # from the decoded cache
    assert torch.equal(again.test.images, b.test.images) and again.fingerprint == b.fingerprint


def test_an_archive_is_cached_as_decoded_tensors_only_in_the_users_cache(
    tiny_archive, tmp_path, monkeypatch, caplog
):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    caplog.set_level("INFO", logger="training.data")
    load_cifar10(str(tiny_archive))  # no cache folder given: the user's
    [cached] = list((tmp_path / "xdg" / "cifar10-cnn").iterdir())  # the tensors alone, no images
    assert cached.name.startswith("tensors-") and cached.suffix == ".pt"
    assert f"cached the decoded data in {cached} (" in caplog.text
    assert list(work.iterdir()) == []  # nothing in the current folder


def test_the_test_files_are_unpacked_alone_and_in_the_decoded_order(tiny_archive, tmp_path):
    files = files_of_the_test_split(str(tiny_archive), tmp_path / "c")
    data = load_cifar10(str(tiny_archive), tmp_path / "c")
    assert [label for _, label in files] == data.test.labels.tolist()
    unpacked = [p for p in (tmp_path / "c").rglob("*") if p.is_file() and p.suffix == ".png"]
    assert len(unpacked) == len(data.test) and all("/test/" in str(p) for p in unpacked)


def test_changed_folder_is_decoded_again(tmp_path):
    root = make_image_folder(tmp_path / "d", {"train": 2, "test": 1})
    first = load_cifar10(str(root), tmp_path / "cache")
    make_image_folder(root, {"train": 3, "test": 1}, seed=1)
    second = load_cifar10(str(root), tmp_path / "cache")
    assert len(first.train) == 20 and len(second.train) == 30


def test_wrong_class_folders_are_refused(tmp_path):
    root = make_image_folder(tmp_path / "d", {"train": 1, "test": 1})
    (root / "train" / "cat").rename(root / "train" / "kitten")
    with pytest.raises(DataError, match="one folder per CIFAR-10 class"):
        load_cifar10(str(root), tmp_path / "cache")


def test_validation_split_is_disjoint_and_seeded(tiny_data, tmp_path):
    data = load_cifar10(str(tiny_data), tmp_path / "cache")
    train, val = split_validation(data.train, 20, seed=0)
    assert len(train) == 100 and len(val) == 20
    _, val_again = split_validation(data.train, 20, seed=0)
    assert torch.equal(val.images, val_again.images)
    as_rows = {tuple(img.flatten().tolist()) for img in train.images}
    assert not any(tuple(img.flatten().tolist()) in as_rows for img in val.images)
    with pytest.raises(DataError):
        split_validation(data.train, 120, seed=0)
