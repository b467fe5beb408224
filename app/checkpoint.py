"""The checkpoint format that training writes and serving trusts.

One file, loadable with ``torch.load(path, weights_only=True)``: a dict of tensors and primitives.

    {
        "format": "cifar10-cnn/checkpoint",   # marks our own files
        "format_version": 1,
        "model": "FinalModel",                # or "LiteModel", "AirbenchNet" (app.model.ARCHITECTURES)
        "arch": {...},                        # AirbenchNet only: its keyword arguments
        "state_dict": {...},                  # the unwrapped model's tensors
        "classes": [...], "mean": [...], "std": [...], "input_shape": [3, 32, 32],
        "torch_version": str,
        # what python -m training adds (training/train.py):
        "metrics": {"train_acc", "val_acc"; at the end also "test_acc", "test_acc_tta",
                    "test_loss", "per_class_accuracy", "best_epoch", "test_images"},
        "config": {...},                      # every TrainConfig field
        "epoch": int,                         # epochs run when it was written
        "total_epochs": int,                  # with the --init parent's epochs
        "complete": bool,                     # epoch == config["epochs"]
        "duration_s": float,                  # training time so far
        "data_fingerprint": str, "data_source": str,  # sha256 of the decoded data; its file name
        "code_version": str, "device": str, "created_at": ISO-8601 str,
        "init": {"path", "sha256", "epochs", "metrics"},           # only with --init
        "teacher": {"path", "sha256", "widths", "val_acc"},        # only with --teacher
    }

A bare state_dict (a user's own ``torch.save(model.state_dict(), f)``) loads too; its metadata is
then empty. Anything else is refused with one `CheckpointError` sentence.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import torch

from app.model import ARCHITECTURES, CLASSES, INPUT_SHAPE, MEAN, MODEL_NAME, STD, StagedNet

FORMAT = "cifar10-cnn/checkpoint"
FORMAT_VERSION = 1


class CheckpointError(Exception):
    """A weights file that cannot be used; the message is one sentence fit for a log line."""


class InitRecord(TypedDict):
    """Where a run started with --init took its weights from."""

    path: str  # the parent checkpoint's file name
    sha256: str
    epochs: int  # the parent's epochs, its own parents' included
    metrics: dict[str, float]  # the parent's val_acc and test_acc


class TeacherRecord(TypedDict):
    """The teacher a run distilled from (python -m training.teacher)."""

    path: str  # its file name
    sha256: str
    widths: list[int]
    val_acc: float


class TrainingRecord(TypedDict, total=False):
    """What `python -m training` records beside the weights (`save_checkpoint`'s `meta`)."""

    config: dict[str, Any]  # training.config.TrainConfig as a dict
    metrics: dict[str, Any]  # train_acc, val_acc; at the end test_acc, test_acc_tta, test_loss,
    # per_class_accuracy {class: accuracy}, best_epoch, test_images
    epoch: int  # epochs trained when written (the best epoch's weights, chosen on validation)
    total_epochs: int  # epoch plus the --init parent's epochs
    complete: bool  # every epoch of the recipe ran
    weights: str  # "raw", or "average": --ema's weight average validated better and was kept
    duration_s: float  # training time, evaluation and writes excluded
    data_fingerprint: str  # sha256 of the decoded training and test pixels and labels
    data_source: str  # the data's file or folder name
    code_version: str  # git commit (-dirty), $CIFAR10_CODE_VERSION or the package version
    code_version_note: str  # written by hand on a shipped checkpoint
    device: str  # e.g. "cpu (x86_64, 2 process(es) x 1 thread(s))"
    created_at: str  # ISO 8601, UTC
    init: InitRecord  # only for a run started with --init
    teacher: TeacherRecord  # only for a distilled run


class CheckpointMeta(TrainingRecord, total=False):
    """Every key of a checkpoint but "state_dict": what `save_checkpoint` writes itself, and a
    `TrainingRecord`. A bare state_dict has none of them."""

    format: str  # FORMAT
    format_version: int  # FORMAT_VERSION
    model: str  # a key of app.model.ARCHITECTURES: "FinalModel", "LiteModel", "AirbenchNet"
    arch: dict[str, Any]  # AirbenchNet's keyword arguments (widths, depth, stem...), for that model only
    classes: list[str]  # app.model.CLASSES
    mean: list[float]  # the normalisation trained with: app.model.MEAN, STD (checked on load)
    std: list[float]
    input_shape: list[int]  # app.model.INPUT_SHAPE, (3, 32, 32) (checked on load)
    torch_version: str


@dataclass
class Checkpoint:
    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)  # CheckpointMeta: all but the state_dict
    sha256: str = ""
    path: str = ""

    @property
    def is_bare(self) -> bool:
        return not self.meta


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename over `path`.

    A writer killed at any moment leaves either the old file or the new one, never half a file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; readers such as a container's user need read access
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, **meta: Any) -> None:
    """Write `model`'s weights with our metadata; `meta` holds primitives only, under the keys of
    `TrainingRecord` (metrics, config...)."""
    state_dict = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": type(model).__name__ if type(model).__name__ in ARCHITECTURES else MODEL_NAME,
        "classes": list(CLASSES),
        "mean": list(MEAN),
        "std": list(STD),
        "input_shape": list(INPUT_SHAPE),
        "torch_version": str(torch.__version__),  # TorchVersion would need pickle
        **meta,
        "state_dict": state_dict,
    }
    atomic_torch_save(payload, path)


def _same_numbers(recorded: Any, expected: tuple[float, ...]) -> bool:
    """`recorded` (a list from the file; None when missing) holds `expected`'s numbers."""
    return (
        isinstance(recorded, (list, tuple))
        and len(recorded) == len(expected)
        and all(
            isinstance(a, (int, float)) and abs(a - b) <= 1e-6
            for a, b in zip(recorded, expected, strict=True)
        )
    )


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read and sanity-check a weights file (ours or a bare state_dict) onto the CPU.

    `meta` holds the keys of `CheckpointMeta`. Ours must record this code's classes,
    normalisation and input shape: weights trained on other pixels would be served wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for damaged or unsafe files
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        unsafe = [ln for ln in lines if "unsupported global" in ln.lower()]  # the case varies by version
        reason = (unsafe or lines or [type(exc).__name__])[0]
        raise CheckpointError(
            f"weights file {path} is damaged or not a weights-only PyTorch checkpoint ({reason[:160]})"
        ) from None
    sha = file_sha256(path)
    if _is_state_dict(obj):
        return Checkpoint(state_dict=obj, meta={}, sha256=sha, path=str(path))
    if not isinstance(obj, dict) or obj.get("format") != FORMAT or "state_dict" not in obj:
        raise CheckpointError(
            f"weights file {path} is neither a cifar10-cnn checkpoint nor a bare state_dict"
        )
    if obj.get("model") not in ARCHITECTURES:
        raise CheckpointError(
            f"weights file {path} holds a {obj.get('model')!r}, not one of {', '.join(ARCHITECTURES)}"
        )
    if tuple(obj.get("classes", ())) != CLASSES:
        raise CheckpointError(f"weights file {path} was trained on other classes: {obj.get('classes')}")
    if not (_same_numbers(obj.get("mean"), MEAN) and _same_numbers(obj.get("std"), STD)):
        raise CheckpointError(
            f"weights file {path} was trained with another normalisation (mean {obj.get('mean')}, "
            f"std {obj.get('std')}) than this code applies (mean {list(MEAN)}, std {list(STD)})"
        )
    if not _same_numbers(obj.get("input_shape"), INPUT_SHAPE):
        raise CheckpointError(
            f"weights file {path} was trained on inputs of shape {obj.get('input_shape')}, "
            f"not the {list(INPUT_SHAPE)} this code feeds"
        )
    if not _is_state_dict(obj["state_dict"]):
        raise CheckpointError(f"weights file {path} has no usable state_dict")
    meta = {k: v for k, v in obj.items() if k != "state_dict"}
    return Checkpoint(state_dict=obj["state_dict"], meta=meta, sha256=sha, path=str(path))


def build_model(ckpt: Checkpoint, expect: str | None = None) -> StagedNet:
    """The checkpoint's network (FinalModel for a bare state_dict), eval mode, CPU, with its
    weights; refuses any mismatch, and any other network than `expect` when it is given."""
    name = ckpt.meta.get("model", expect or MODEL_NAME)  # a bare state_dict is whatever is expected
    if expect is not None and name != expect:
        raise CheckpointError(f"weights file {ckpt.path} holds a {name}, not {expect}")
    architecture = ARCHITECTURES[name]
    if "arch" in ckpt.meta:  # an AirbenchNet records its shape
        try:
            model = architecture(**ckpt.meta["arch"])
        except (TypeError, ValueError) as exc:
            raise CheckpointError(
                f"weights file {ckpt.path} records an unusable {name} shape ({exc})"
            ) from None
    else:
        dropout = ckpt.meta.get("config", {}).get("dropout", None)
        model = architecture() if dropout is None else architecture(dropout=float(dropout))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(ckpt.state_dict))
    unexpected = sorted(set(ckpt.state_dict) - set(expected))
    wrong_shape = [
        k for k in set(expected) & set(ckpt.state_dict) if expected[k].shape != ckpt.state_dict[k].shape
    ]
    if missing or unexpected or wrong_shape:
        details = []
        if missing:
            details.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong_shape:
            details.append(f"{len(wrong_shape)} with the wrong shape (e.g. {sorted(wrong_shape)[0]})")
        raise CheckpointError(f"weights file {ckpt.path} does not fit {name}: tensors {', '.join(details)}")
    model.load_state_dict(ckpt.state_dict)
    bad = [k for k, v in ckpt.state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"weights file {ckpt.path} holds NaN or infinite values (in {bad[0]})")
    return model.eval()
