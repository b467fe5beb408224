"""Train an airbench network (`app.model.AirbenchNet`): the served model `best` and the teacher
that FinalModel and LiteModel are distilled from.

    python -m training.teacher --data path/to/cifar10-jpeg.tar.gz            # airbench94, runs/teacher/
    python -m training.teacher --preset airbench96 --data ...                 # the larger shape
    python -m training.teacher --no-lookahead --data ...                      # one ingredient off
    python -m training.teacher --resume --out runs/teacher                    # after Ctrl-C / SIGTERM
    python -m training --teacher runs/teacher/teacher.pt --data ...           # distil into FinalModel

The default is airbench94's published method (Jordan 2024, arXiv 2404.00498), each ingredient a
flag that defaults on: a frozen 2x2 whitening conv set from the data's patch statistics
(--whiten), identity-initialised convs (--identity-init), BatchNorm biases at 64x the learning
rate (--bias-lr), Nesterov SGD on a triangle schedule, lookahead weight averaging (--lookahead),
alternating flips (--alt-flip), label smoothing 0.2 and, for the reported figure, multi-crop
test-time augmentation (--tta 2). `--preset airbench96` takes airbench96's shape: widths
128/384/512 with a residual pair per group (--depth 3), 37 epochs, translate 4 and cutout 12.
Learning rate and weight decay are given per mean-loss step (airbench's decoupled lr 11.5 and
wd 0.0153 per 1,024 images are --lr 1.5 and --weight-decay 1.33e-3 here).

On this project's data (CIFAR-10 as JPEG q75, 5,000 training images held out for validation) on
a 2-core AVX-512 CPU with native bf16, airbench94 trains in about 15 minutes and airbench96 in
about 3.5 hours; docs/results.md has the validation figures of each recipe.

It trains on the same training split as FinalModel (the 5,000 validation images of
--val-size/--seed stay unseen), so a student's validation figure is honest; `python -m training
--teacher` refuses a teacher whose split differs. `teacher.pt` is a checkpoint in the project's
format (`app.checkpoint`) holding an AirbenchNet with its `arch`, so the service can serve it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from app.checkpoint import (
    CheckpointError,
    build_model,
    file_sha256,
    load_checkpoint,
    save_checkpoint,
)
from app.device import DEVICE_CHOICES
from app.model import CLASSES, MEAN, STD, AirbenchNet
from app.preprocess import normalize
from training.augment import cutout, mixed_cross_entropy, mixup, translate
from training.calibrate import calibrate_file
from training.config import SWITCH, ConfigError, option
from training.data import DataError, Split
from training.runtime import (
    Epoch,
    EpochLoop,
    Runtime,
    StopFlag,
    all_sum,
    any_rank,
    augment_generator,
    code_version,
    device_description,
    epoch_order,
    load_splits,
    now,
    start_process,
)

log = logging.getLogger("training.teacher")

LEGACY_FORMAT = "cifar10-cnn/teacher"  # teacher.pt before AirbenchNet: a TeacherNet of its own
STATE_FORMAT = "cifar10-cnn/teacher-state/2"
WHITEN_IMAGES = 5000  # training images whose 2x2 patches set the whitening conv
WHITEN_EPS = 5e-4
LOOKAHEAD_EVERY = 5  # steps between lookahead updates


@dataclass
class TeacherConfig:
    data: str = option(
        "cifar10",
        "'cifar10' (torchvision download) or an ImageFolder directory / .tar.gz with train/ and test/",
    )
    cache_dir: str = option(
        "", "where decoded data is cached (default: $XDG_CACHE_HOME/cifar10-cnn, else ~/.cache/cifar10-cnn)"
    )
    out: str = option("runs/teacher", "folder for teacher.pt, last.pt and history.json")
    preset: str = option(
        "airbench94",
        "the recipe the other flags start from: airbench94 (widths 64/256/256, 9.9 epochs), "
        "airbench95 (128/384/384, 15 epochs) or airbench96 (128/384/512, depth 3, 37 epochs, "
        "translate 4, cutout 12)",
        choices=("airbench94", "airbench95", "airbench96"),
    )
    widths: str = option("64,256,256", "channels of the three conv groups")
    depth: int = option(2, "convs per group: 2 (airbench94) or 3 (a residual pair, airbench96)")
    whiten: bool = option(True, "stem: airbench's frozen 2x2 whitening conv (off: a trained 3x3 conv stem)")
    stem_width: int = option(32, "channels of the 3x3 conv stem when --no-whiten")
    whiten_bias_epochs: int = option(3, "epochs the whitening conv's bias trains before it is frozen")
    identity_init: bool = option(True, "initialise each 3x3 conv's first channels as the identity")
    logit_scale: float = option(1 / 9, "factor on the logits (small logits at the start)")
    bn_momentum: float = option(0.4, "BatchNorm running-statistics momentum (PyTorch's convention)")
    bn_scale: bool = option(False, "train BatchNorm scales (airbench freezes them at 1)")
    epochs: float = option(9.9, "epochs; a fraction runs part of the last one (the schedule spans all)")
    batch_size: int = option(1024, "global batch size; each of N DDP ranks takes batch_size / N")
    lr: float = option(1.5, "peak learning rate (per mean-loss step)")
    bias_lr: float = option(64.0, "factor on the learning rate of BatchNorm biases (1 turns it off)")
    warmup: float = option(0.23, "fraction of the steps spent rising to the peak learning rate")
    lr_start: float = option(0.2, "learning rate at step 0, as a fraction of the peak")
    lr_end: float = option(0.07, "learning rate at the last step, as a fraction of the peak")
    momentum: float = option(0.85, "Nesterov momentum")
    weight_decay: float = option(1.33e-3, "weight decay (the same absolute decay for BatchNorm biases)")
    label_smoothing: float = option(0.2, "label smoothing of the cross-entropy loss")
    lookahead: bool = option(True, "lookahead: every 5 steps, pull the weights to their running average")
    alt_flip: bool = option(True, "flip each image in every other epoch (off: a random flip per step)")
    translate: int = option(2, "maximum random shift in pixels (reflect padding)")
    cutout: int = option(0, "side of the random square set to the mean colour; 0 turns cutout off")
    mixup: float = option(0.0, "mixup's Beta(a, a) parameter; 0 turns mixup off")
    tta: int = option(
        2, "test-time augmentation of the reported val_acc_tta: 0 none, 1 flip, 2 flip + shifts"
    )
    val_size: int = option(
        5000, "training images held out (the student's validation split: same size and seed)"
    )
    seed: int = option(0, "seed of the split, data order, augmentation and initialisation")
    limit: int = option(0, "train on at most this many images (0: all)")
    device: str = option("auto", "auto picks cuda, then mps, then cpu", choices=DEVICE_CHOICES)
    amp: str = option(
        "auto", "bf16 autocast: auto uses it on CUDA and on CPUs with native bf16", choices=SWITCH
    )
    threads: int = option(0, "torch threads per process; 0 divides the cores among local processes")
    test: bool = option(False, "also measure the test split at the end (recorded, not used to choose)")
    dry_run: bool = option(
        False,
        "a tiny network on 512 images for one epoch, end to end (its accuracy means nothing); "
        "writes to a new temporary folder unless --out is given",
    )


PRESETS: dict[str, dict[str, Any]] = {
    "airbench94": {},  # the dataclass defaults
    "airbench95": {
        "widths": "128,384,384",
        "epochs": 15.0,
        "lr": 10.0 / 7.6667,  # airbench95's decoupled lr 10.0 (per 1,024 images, momentum 0.85)
        "weight_decay": 0.0153 / 10.0,
    },
    "airbench96": {
        "widths": "128,384,512",
        "depth": 3,
        "epochs": 37.0,
        "lr": 9.0 / 7.6667,  # airbench96's decoupled lr 9.0 (per 1,024 images, momentum 0.85)
        "weight_decay": 0.012 / 9.0,
        "warmup": 0.1,
        "lr_end": 0.0,
        "bn_momentum": 0.1,
        "translate": 4,
        "cutout": 12,
    },
}
DRY_RUN = {"epochs": 1.0, "limit": 512, "val_size": 64, "batch_size": 64, "widths": "8,16,16"}
RESUME_OVERRIDES = ("out", "data", "cache_dir", "device", "threads")


def parse_widths(text: str) -> tuple[int, int, int]:
    try:
        widths = [int(w) for w in text.split(",")]
    except ValueError:
        raise DataError(f"--widths {text!r} must be three integers, like 64,256,256") from None
    if len(widths) != 3 or min(widths) < 1:
        raise DataError(f"--widths {text!r} must be three positive integers, like 64,256,256")
    return widths[0], widths[1], widths[2]


def arch_of(cfg: TeacherConfig) -> dict[str, Any]:
    """AirbenchNet's keyword arguments for this recipe (recorded in the checkpoint as "arch")."""
    return {
        "widths": list(parse_widths(cfg.widths)),
        "depth": cfg.depth,
        "stem": 0 if cfg.whiten else cfg.stem_width,
        "logit_scale": cfg.logit_scale,
        "bn_eps": 1e-12,
        "bn_momentum": cfg.bn_momentum,
        "bn_scale": cfg.bn_scale,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.teacher",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for f in dataclasses.fields(TeacherConfig):
        flag = "--" + f.name.replace("_", "-")
        text = f.metadata["help"]
        if f.type == "bool":
            action = argparse.BooleanOptionalAction if f.default else "store_true"
            p.add_argument(
                flag, action=action, default=None, help=f"{text} (default: {'on' if f.default else 'off'})"
            )
            continue
        kind = {"int": int, "float": float, "str": str}[str(f.type)]
        default = f"{f.default:.4g}" if isinstance(f.default, float) else f.default
        p.add_argument(
            flag, type=kind, default=None, choices=f.metadata["choices"], help=f"{text} (default: {default})"
        )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from <out>/last.pt with its saved recipe (only --data, --cache-dir, "
        "--device, --threads can change)",
    )
    return p


def config_from(given: dict[str, Any]) -> TeacherConfig:
    """The preset's values under the flags given; --dry-run's tiny run under both."""
    preset = given.get("preset", "airbench94")
    values = {**PRESETS[preset], **given}
    if values.get("dry_run"):
        values = {**values, **{k: v for k, v in DRY_RUN.items() if k not in given}}
        values.setdefault("out", tempfile.mkdtemp(prefix="cifar10-teacher-dry-run-"))
    cfg = TeacherConfig(**values)
    parse_widths(cfg.widths)
    if cfg.depth not in (2, 3):
        raise DataError(f"--depth {cfg.depth} must be 2 or 3")
    if cfg.epochs <= 0 or cfg.tta not in (0, 1, 2):
        raise DataError("--epochs must be positive and --tta one of 0, 1, 2")
    return cfg


# ---------------------------------------------------------------- initialisation and optimiser


def whiten_init(conv: nn.Conv2d, images: torch.Tensor) -> None:
    """Set the 2x2 conv to the whitening of the images' patches (eigenvectors scaled by
    1/sqrt(eigenvalue)) and their negatives, as airbench does; images: normalised (N, 3, 32, 32)."""
    k = conv.kernel_size[0]
    patches = images.float().unfold(2, k, 1).unfold(3, k, 1).transpose(1, 3).reshape(-1, 3 * k * k)
    covariance = patches.T @ patches / len(patches)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
    filters = (eigenvectors.T.flip(0) / torch.sqrt(eigenvalues.flip(0) + WHITEN_EPS).view(-1, 1)).view(
        -1, 3, k, k
    )
    with torch.no_grad():
        conv.weight.copy_(torch.cat([filters, -filters]))
        if conv.bias is not None:
            conv.bias.zero_()


def identity_init(model: nn.Module) -> None:
    """Each 3x3 conv's first c_in output channels pass their input through (airbench's dirac init)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and m.groups == 1:
                nn.init.dirac_(m.weight[: m.in_channels])


def build_optimizer(model: AirbenchNet, cfg: TeacherConfig) -> torch.optim.SGD:
    """Nesterov SGD in three groups: BatchNorm biases (lr x bias_lr, the same absolute decay),
    the whitening bias (its lr drops to 0 after --whiten-bias-epochs), everything else."""
    whitening = model.whitening
    norm_biases = [m.bias for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    whiten_bias = [whitening.bias] if whitening is not None and whitening.bias is not None else []
    special = {id(p) for p in norm_biases + whiten_bias}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in special]
    groups = [
        {"params": norm_biases, "lr_factor": cfg.bias_lr, "weight_decay": cfg.weight_decay / cfg.bias_lr},
        {"params": whiten_bias, "lr_factor": 1.0, "weight_decay": cfg.weight_decay, "whiten": True},
        {"params": others, "lr_factor": 1.0, "weight_decay": cfg.weight_decay},
    ]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)


def lr_at(step: int, total: int, cfg: TeacherConfig) -> float:
    """The triangle: lr_start -> 1 over the warm-up, then linearly to lr_end, times the peak."""
    peak = max(1, int(total * cfg.warmup))
    if step < peak:
        frac = step / peak
        return cfg.lr * (cfg.lr_start * (1 - frac) + frac)
    frac = (step - peak) / max(1, total - peak)
    return cfg.lr * ((1 - frac) + cfg.lr_end * frac)


def set_lr(optimizer: torch.optim.Optimizer, lr: float, epoch: int, cfg: TeacherConfig) -> None:
    for group in optimizer.param_groups:
        frozen = group.get("whiten") and epoch >= cfg.whiten_bias_epochs
        group["lr"] = 0.0 if frozen else lr * group["lr_factor"]


class Lookahead:
    """airbench's lookahead: every few steps the weights move to their running average (pull
    strength 0.95^5 * progress^3), which is copied back into the network; at the end the network
    takes the average."""

    def __init__(self, model: nn.Module, state: dict[str, torch.Tensor] | None = None):
        self.model = model
        self.average = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if state is not None:
            for k, v in state.items():
                self.average[k].copy_(v)

    @torch.no_grad()
    def update(self, step: int, total: int) -> None:
        decay = 0.95**5 * (step / total) ** 3
        for k, v in self.model.state_dict().items():
            if v.is_floating_point():
                self.average[k].lerp_(v, 1 - decay)
                v.copy_(self.average[k])

    @torch.no_grad()
    def finish(self) -> None:
        for k, v in self.model.state_dict().items():
            if v.is_floating_point():
                v.copy_(self.average[k])


# ---------------------------------------------------------------- data, inference


def flip_bits(n: int, seed: int, epoch: int, alternate: bool, g: torch.Generator) -> torch.Tensor:
    """Which of the n training images this epoch sees mirrored: a seeded coin per image that
    inverts every other epoch (alternating flips), or a fresh coin each epoch."""
    if alternate:
        base = torch.rand(n, generator=torch.Generator().manual_seed(seed * 7 + 1)) < 0.5
        return base ^ bool(epoch % 2)
    return torch.rand(n, generator=g, device=g.device).cpu() < 0.5


def multi_crop_logits(model: nn.Module, x: torch.Tensor, level: int) -> torch.Tensor:
    """airbench's test-time augmentation: 0 the image; 1 the mean with its mirror; 2 half that and
    half the same for the image shifted one pixel up-left and one down-right."""

    def mirrored(v: torch.Tensor) -> torch.Tensor:
        return 0.5 * model(v).float() + 0.5 * model(v.flip(3)).float()

    if level == 0:
        return model(x).float()
    if level == 1:
        return mirrored(x)
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    shifted = [padded[:, :, :-2, :-2], padded[:, :, 2:, 2:]]
    return 0.5 * mirrored(x) + 0.25 * sum(mirrored(s) for s in shifted)


@torch.no_grad()
def teacher_logits(
    model: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 500, tta: int = 0
) -> torch.Tensor:
    """Logits (N, 10) on the CPU for uint8 images (N, 3, 32, 32)."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = normalize(images[start : start + batch_size].to(device))
        out.append(multi_crop_logits(model, x.contiguous(memory_format=torch.channels_last), tta).cpu())
    return torch.cat(out) if out else torch.empty(0, len(CLASSES))


def accuracy(model: nn.Module, split: Split, device: torch.device, tta: int = 0) -> float:
    if not len(split):
        return 0.0
    return (
        (teacher_logits(model, split.images, device, tta=tta).argmax(1) == split.labels).float().mean().item()
    )


# ---------------------------------------------------------------- loading a teacher


def _legacy_teacher(obj: dict) -> tuple[AirbenchNet, dict]:
    """A teacher.pt written before AirbenchNet (a conv stem, Sequential groups, logits / 8)."""
    stem, *widths = obj["widths"]
    model = AirbenchNet(widths, stem=stem, logit_scale=1 / 8, bn_eps=1e-5, bn_momentum=0.1, bn_scale=True)
    names = {"0": "conv1", "2": "norm1", "4": "conv2", "5": "norm2"}
    state = {}
    for key, value in obj["state_dict"].items():
        parts = key.split(".")
        if parts[0] == "groups":
            parts[2] = names[parts[2]]
        state[".".join(parts)] = value
    model.load_state_dict(state)
    return model, {k: v for k, v in obj.items() if k != "state_dict"}


def load_teacher(path: str | os.PathLike) -> tuple[AirbenchNet, dict]:
    """(the teacher in eval mode on the CPU, its metadata with "sha256"); DataError if unusable."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"teacher {path} does not exist; train one with python -m training.teacher")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DataError(
            f"teacher {path} is damaged or not a weights-only checkpoint ({type(exc).__name__})"
        ) from None
    if isinstance(obj, dict) and obj.get("format") == LEGACY_FORMAT:
        if tuple(obj["classes"]) != CLASSES or tuple(obj["mean"]) != MEAN or tuple(obj["std"]) != STD:
            raise DataError(f"teacher {path} was trained with other classes or another normalisation")
        model, meta = _legacy_teacher(obj)
    else:
        try:
            ckpt = load_checkpoint(path)
            if ckpt.meta.get("model") != "AirbenchNet":
                raise CheckpointError(f"it holds a {ckpt.meta.get('model', 'bare state_dict')}")
            model, meta = cast(AirbenchNet, build_model(ckpt)), ckpt.meta
        except CheckpointError as exc:
            raise DataError(
                f"teacher {path} is not a checkpoint written by python -m training.teacher ({exc})"
            ) from None
    meta = {**meta, "sha256": file_sha256(path)}
    return model.eval(), meta


# ---------------------------------------------------------------- the run
# The shape of training.train's run: setup(), then the loop of training.runtime.EpochLoop around
# train_one_epoch() and evaluate(), then finish() writes teacher.pt.


@dataclass
class TeacherRun(EpochLoop):
    """A run of AirbenchNet: what trains, and where it stands (what last.pt saves)."""

    cfg: TeacherConfig
    rt: Runtime
    train: Split
    val: Split
    test: Split
    fingerprint: str
    model: AirbenchNet
    net: nn.Module  # the model, or its DDP wrapper
    optimizer: torch.optim.SGD
    lookahead: Lookahead | None
    batches: int
    total_steps: int
    last_path: Path
    history: list[dict] = field(default_factory=list)
    epoch: int = 0
    batch: int = 0
    elapsed: float = 0.0

    def epochs_left(self) -> bool:
        return self.epoch * self.batches < self.total_steps

    def train_one_epoch(self, stop: StopFlag) -> Epoch:
        """Run epoch self.epoch from batch self.batch; returns this rank's loss sum, correct count
        and images (and advances self.batch; it stops early, with self.batch < self.batches, when any
        rank was signalled)."""
        cfg, device, rank = self.cfg, self.rt.device, self.rt.rank
        per_rank = cfg.batch_size // self.rt.world
        order = epoch_order(len(self.train), cfg.seed, self.epoch).to(self.train.images.device)
        g = augment_generator(cfg.seed, self.epoch, rank, device)
        flips = flip_bits(len(self.train), cfg.seed, self.epoch, cfg.alt_flip, g).to(self.train.images.device)
        self.net.train()
        started, loss_sum, correct, seen = time.perf_counter(), 0.0, 0, 0
        while self.batch < self.batches:
            step = self.epoch * self.batches + self.batch
            if step >= self.total_steps or any_rank(stop(), device):
                break
            set_lr(self.optimizer, lr_at(step, self.total_steps, cfg), self.epoch, cfg)
            idx = order[self.batch * cfg.batch_size :][rank * per_rank : (rank + 1) * per_rank]
            x = normalize(self.train.images[idx].to(device))
            x = torch.where(flips[idx].to(device).view(-1, 1, 1, 1), x.flip(3), x)
            x = cutout(translate(x, cfg.translate, g), cfg.cutout, g).contiguous(
                memory_format=torch.channels_last
            )
            y = self.train.labels[idx].to(device)
            x, mix = mixup(x, y, cfg.mixup, f"{cfg.seed}/{self.epoch}/{self.batch}/{rank}", g)
            with self.rt.autocast():
                logits = self.net(x).float()
            loss = mixed_cross_entropy(logits, y, cfg.label_smoothing, mix)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.batch += 1
            if self.lookahead is not None and (step + 1) % LOOKAHEAD_EVERY == 0:
                self.lookahead.update(step + 1, self.total_steps)
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
        seconds = time.perf_counter() - started
        self.elapsed += seconds
        finished = self.batch >= self.batches or self.epoch * self.batches + self.batch >= self.total_steps
        return Epoch(self.epoch, self.batch, self.batches, not finished, seconds, loss_sum, correct, seen)

    def evaluate(self, done: Epoch) -> None:
        loss_sum, correct, seen = all_sum([done.loss_sum, done.correct, done.seen], self.rt.device)
        self.history.append(
            {
                "epoch": self.epoch + 1,
                "train_loss": loss_sum / max(seen, 1),
                "train_acc": correct / max(seen, 1),
                "val_acc": accuracy(self.model, self.val, self.rt.device) if self.rt.rank == 0 else 0.0,
                "images_per_s": seen / max(done.seconds, 1e-9),
                "seconds": done.seconds,
            }
        )
        self.epoch, self.batch = self.epoch + 1, 0

    def state(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "config": dataclasses.asdict(self.cfg),
            "epoch": self.epoch,
            "batch": self.batch,
            "elapsed": self.elapsed,
            "history": self.history,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lookahead": self.lookahead.average if self.lookahead else None,
            "data_fingerprint": self.fingerprint,
        }

    def report(self) -> None:
        row = self.history[-1]
        log.info(
            "epoch %d/%s  loss %.4f  train %.2f%%  val %.2f%%  %.0f img/s  %.0fs",
            row["epoch"], f"{self.cfg.epochs:g}", row["train_loss"], 100 * row["train_acc"],
            100 * row["val_acc"], row["images_per_s"], row["seconds"],
        )  # fmt: skip
        (Path(self.cfg.out) / "history.json").write_text(json.dumps(self.history, indent=2))

    def finish(self) -> dict[str, Any]:
        """Rank 0: take the lookahead average, measure it, write teacher.pt calibrated on the
        validation split; the history (and on rank 0 the metrics)."""
        if self.rt.rank != 0:
            return {"history": self.history}
        cfg, model, device = self.cfg, self.model, self.rt.device
        if self.lookahead is not None:
            self.lookahead.finish()
        metrics = {
            "val_acc": accuracy(model, self.val, device),
            "val_acc_tta": accuracy(model, self.val, device, tta=cfg.tta),
            "train_acc": self.history[-1]["train_acc"] if self.history else 0.0,
        }
        if cfg.test:
            metrics["test_acc"] = accuracy(model, self.test, device)
            metrics["test_acc_tta"] = accuracy(model, self.test, device, tta=cfg.tta)
        path = Path(cfg.out) / "teacher.pt"
        amp = f", {self.rt.amp_dtype}" if self.rt.amp_dtype else ", float32"
        save_checkpoint(
            path, model, arch=arch_of(cfg), widths=arch_of(cfg)["widths"], val_size=cfg.val_size,
            seed=cfg.seed, limit=cfg.limit, config=dataclasses.asdict(cfg), metrics=metrics,
            epoch=len(self.history), complete=True, data_fingerprint=self.fingerprint,
            data_source=Path(cfg.data).name, code_version=code_version(),
            device=device_description(device, self.rt.world) + amp, duration_s=round(self.elapsed, 1),
            created_at=now(),
        )  # fmt: skip
        calibrate_file(path, self.train, self.val, device, cfg.seed)
        log.info(
            "teacher: val %.2f%% (TTA level %d: %.2f%%)%s; wrote %s",
            100 * metrics["val_acc"], cfg.tta, 100 * metrics["val_acc_tta"],
            f", test {100 * metrics['test_acc']:.2f}%" if "test_acc" in metrics else "",
            path,
        )  # fmt: skip
        return {"history": self.history, "metrics": metrics}


def setup(cfg: TeacherConfig, resume: bool, overrides: dict[str, Any]) -> TeacherRun:
    """The run (restored from <out>/last.pt with `resume`): device, splits, network, optimiser."""
    out = cfg.out

    def resumed(saved: dict[str, Any]) -> TeacherConfig:
        runtime = {k: v for k, v in overrides.items() if k in RESUME_OVERRIDES}
        return TeacherConfig(**{**saved, "out": out, **runtime})

    cfg, rt, state = start_process(cfg, resume, STATE_FORMAT, resumed, lambda *_: True)  # always NHWC
    train, val, test, fingerprint = load_splits(cfg, rt.device, state)

    torch.manual_seed(cfg.seed)
    model = AirbenchNet(**arch_of(cfg))
    if cfg.identity_init:
        identity_init(model)
    if model.whitening is not None:
        whiten_init(model.whitening, normalize(train.images[:WHITEN_IMAGES]))
    model = model.to(rt.device).to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg)
    batches = len(train) // cfg.batch_size
    s = TeacherRun(
        cfg, rt, train, val, test, fingerprint, model, model, optimizer, None, batches,
        math.ceil(batches * cfg.epochs), Path(cfg.out) / "last.pt",
    )  # fmt: skip
    lookahead_state = None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        s.history, s.epoch, s.batch = state["history"], state["epoch"], state["batch"]
        s.elapsed = state["elapsed"]
        lookahead_state = state["lookahead"]
    if cfg.lookahead:
        s.lookahead = Lookahead(model, lookahead_state)
    s.net = DistributedDataParallel(model) if rt.world > 1 else model
    return s


def run(cfg: TeacherConfig, resume: bool = False, overrides: dict | None = None) -> dict:
    s = setup(cfg, resume, overrides or {})
    cfg = s.cfg
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    if s.rt.rank == 0:
        log.info(
            "AirbenchNet %s: %d parameters; %d train, %d validation images; %s, %s; %d process(es) x %d "
            "thread(s)%s",
            arch_of(cfg), sum(p.numel() for p in s.model.parameters()), len(s.train), len(s.val),
            s.rt.device, s.rt.amp_dtype or "float32", s.rt.world, torch.get_num_threads(),
            f", resuming at epoch {s.epoch + 1} batch {s.batch}" if resume else "",
        )  # fmt: skip
    return s.run()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TeacherConfig)}
    given = {k: v for k, v in given.items() if v is not None}
    try:
        if args.resume:
            fixed = [k for k in given if k not in RESUME_OVERRIDES]
            if fixed:
                raise DataError(
                    f"--resume continues the saved recipe, so --{fixed[0].replace('_', '-')} cannot change"
                )
            cfg = TeacherConfig(**given)
        else:
            cfg = config_from(given)
        run(cfg, args.resume, given)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
