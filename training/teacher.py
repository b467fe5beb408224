"""Train the distillation teacher: a 2M-parameter CNN in the airbench spirit (not served).

    python -m training.teacher --data path/to/cifar10-jpeg.tar.gz            # writes runs/teacher/
    torchrun --nproc_per_node=2 -m training.teacher --data ...               # DDP on a CPU
    python -m training.teacher --resume --out runs/teacher                   # after Ctrl-C / SIGTERM
    python -m training --teacher runs/teacher/teacher.pt --data ...          # distil into FinalModel

Three conv groups (conv, 2x2 max-pool, BatchNorm, GELU, conv, BatchNorm, GELU) of 64, 256 and 256
channels after a 32-channel stem, global max-pool, a bias-free linear layer with its logits scaled
by 1/8; label smoothing 0.2, flip and 2-pixel translation, a linear warm-up and decay of the
learning rate over a dozen epochs. The data set sits in memory and augmentation runs on whole
batches, as in `python -m training`. It trains on the same training split as FinalModel (the
5,000 validation images of --val-size/--seed stay unseen), so the student's validation figure is
honest; `python -m training --teacher` refuses a teacher whose split differs.

The checkpoint `teacher.pt` is weights-only (tensors and primitives): the state_dict, the widths,
the normalisation, the split, metrics (validation; test only with --test) and the data fingerprint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from app.checkpoint import atomic_torch_save, file_sha256
from app.device import DEVICE_CHOICES
from app.model import CLASSES, INPUT_SHAPE, MEAN, STD
from app.preprocess import normalize
from training.augment import augment
from training.data import DataError, Split, limit_split, load_cifar10, split_validation
from training.train import (
    StopFlag,
    all_sum,
    code_version,
    device_description,
    epoch_order,
    init_distributed,
    process_device,
    read_state,
)

log = logging.getLogger("training.teacher")

TEACHER_FORMAT = "cifar10-cnn/teacher"
STATE_FORMAT = "cifar10-cnn/teacher-state"
LOGIT_SCALE = 1 / 8  # keeps the initial logits small, so label smoothing is not fought early on


def _group(c_in: int, c_out: int) -> nn.Sequential:
    """conv 3x3 -> 2x2 max-pool -> BN -> GELU -> conv 3x3 -> BN -> GELU: halves the map."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.MaxPool2d(2),
        nn.BatchNorm2d(c_out),
        nn.GELU(),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.GELU(),
    )


class TeacherNet(nn.Module):
    """(N, 3, 32, 32) normalised images -> (N, 10) logits; about 2M parameters at the default widths."""

    def __init__(
        self, widths: tuple[int, int, int, int] = (32, 64, 256, 256), num_classes: int = len(CLASSES)
    ):
        super().__init__()
        stem, *groups = widths
        self.stem = nn.Sequential(
            nn.Conv2d(3, stem, 3, padding=1, bias=False), nn.BatchNorm2d(stem), nn.GELU()
        )
        chans = [stem, *groups]
        self.groups = nn.Sequential(*(_group(a, b) for a, b in zip(chans, chans[1:], strict=False)))
        self.fc = nn.Linear(groups[-1], num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.groups(self.stem(x))  # (N, C, 4, 4)
        x = torch.amax(x, dim=(2, 3))  # global max-pool -> (N, C)
        return self.fc(x) * LOGIT_SCALE


@dataclass
class TeacherConfig:
    data: str = "cifar10"
    cache_dir: str = ".cache/data"
    out: str = "runs/teacher"
    widths: str = "32,64,256,256"  # stem, then the three groups
    epochs: int = 12
    batch_size: int = 512  # global: split across DDP ranks
    lr: float = 0.4  # peak of the linear warm-up / linear decay schedule
    warmup: float = 0.2  # fraction of the steps spent warming up
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.2
    translate: int = 2
    cutout: int = 0
    val_size: int = 5000  # must match the student's --val-size and --seed
    seed: int = 0
    limit: int = 0
    device: str = "auto"
    threads: int = 0
    test: bool = False  # also report test accuracy (a teacher is chosen on validation)
    dry_run: bool = False


HELP = {
    "data": "'cifar10' (torchvision download) or an ImageFolder directory / .tar.gz with train/ and test/",
    "cache_dir": "git-ignored folder where archives are unpacked and decoded tensors kept",
    "out": "folder for teacher.pt, last.pt and history.json",
    "widths": "channels of the stem and of the three conv groups",
    "epochs": "number of epochs (the schedule spans all of them)",
    "batch_size": "global batch size; each of N DDP ranks takes batch_size / N",
    "lr": "peak learning rate",
    "warmup": "fraction of the steps spent warming up linearly to the peak (then linear decay to 0)",
    "momentum": "Nesterov momentum",
    "weight_decay": "L2 weight decay",
    "label_smoothing": "label smoothing of the cross-entropy loss",
    "translate": "maximum random shift in pixels (reflect padding)",
    "cutout": "side of the random square set to the mean colour; 0 turns cutout off",
    "val_size": "training images held out (the student's validation split: same size and seed)",
    "seed": "seed of the split, data order, augmentation and initialisation",
    "limit": "train on at most this many images (0: all)",
    "device": "auto picks cuda, then mps, then cpu",
    "threads": "torch threads per process; 0 divides the cores among local processes",
    "test": "also measure the test split at the end (recorded, not used to choose)",
    "dry_run": "tiny data, one epoch, out=runs/teacher-dry-run unless --out is given",
}

RESUME_OVERRIDES = ("out", "data", "cache_dir", "device", "threads")


def parse_widths(text: str) -> tuple[int, int, int, int]:
    try:
        widths = [int(w) for w in text.split(",")]
    except ValueError:
        raise DataError(f"--widths {text!r} must be four integers, like 32,64,256,256") from None
    if len(widths) != 4 or min(widths) < 1:
        raise DataError(f"--widths {text!r} must be four positive integers, like 32,64,256,256")
    return widths[0], widths[1], widths[2], widths[3]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.teacher",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for f in dataclasses.fields(TeacherConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            p.add_argument(flag, action="store_true", help=HELP[f.name])
            continue
        kind = {"int": int, "float": float, "str": str}[str(f.type)]
        choices = DEVICE_CHOICES if f.name == "device" else None
        p.add_argument(
            flag, type=kind, default=None, choices=choices, help=f"{HELP[f.name]} (default: {f.default})"
        )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from <out>/last.pt with its saved recipe (only --data, --cache-dir, "
        "--device, --threads can change)",
    )
    return p


def lr_at(step: int, total: int, cfg: TeacherConfig) -> float:
    """Linear warm-up to cfg.lr over cfg.warmup of the steps, then linear decay to zero."""
    peak_step = max(1, round(cfg.warmup * total))
    if step < peak_step:
        return cfg.lr * (step + 1) / peak_step
    return cfg.lr * max(0.0, (total - step) / max(1, total - peak_step))


@torch.no_grad()
def teacher_logits(
    model: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 500, tta: bool = False
) -> torch.Tensor:
    """Logits (N, 10) on the CPU for uint8 images (N, 3, 32, 32)."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = normalize(images[start : start + batch_size].to(device)).contiguous(
            memory_format=torch.channels_last
        )
        logits = model(x).float()
        if tta:
            logits = (logits + model(x.flip(3)).float()) / 2
        out.append(logits.cpu())
    return torch.cat(out) if out else torch.empty(0, len(CLASSES))


def accuracy(model: nn.Module, split: Split, device: torch.device, tta: bool = False) -> float:
    if not len(split):
        return 0.0
    return (
        (teacher_logits(model, split.images, device, tta=tta).argmax(1) == split.labels).float().mean().item()
    )


def save_teacher(path: Path, model: nn.Module, cfg: TeacherConfig, **meta) -> None:
    atomic_torch_save(
        {
            "format": TEACHER_FORMAT,
            "model": "TeacherNet",
            "widths": list(parse_widths(cfg.widths)),
            "classes": list(CLASSES),
            "mean": list(MEAN),
            "std": list(STD),
            "input_shape": list(INPUT_SHAPE),
            "val_size": cfg.val_size,
            "seed": cfg.seed,
            "limit": cfg.limit,
            "config": dataclasses.asdict(cfg),
            "torch_version": str(torch.__version__),
            **meta,
            "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        },
        path,
    )


def load_teacher(path: str | os.PathLike) -> tuple[TeacherNet, dict]:
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
    if not isinstance(obj, dict) or obj.get("format") != TEACHER_FORMAT:
        raise DataError(f"teacher {path} is not a checkpoint written by python -m training.teacher")
    if tuple(obj["classes"]) != CLASSES or tuple(obj["mean"]) != MEAN or tuple(obj["std"]) != STD:
        raise DataError(f"teacher {path} was trained with other classes or another normalisation")
    model = TeacherNet(tuple(obj["widths"]))
    model.load_state_dict(obj["state_dict"])
    meta = {k: v for k, v in obj.items() if k != "state_dict"}
    meta["sha256"] = file_sha256(path)
    return model.eval(), meta


def run(cfg: TeacherConfig, resume: bool = False, overrides: dict | None = None) -> dict:
    rank, world, local_world = init_distributed(cfg.device)
    out = Path(cfg.out)
    last_path = out / "last.pt"
    state = None
    if resume:
        state = read_state(last_path, STATE_FORMAT)
        runtime = {k: v for k, v in (overrides or {}).items() if k in RESUME_OVERRIDES}
        cfg = TeacherConfig(**{**state["config"], "out": cfg.out, **runtime})
    widths = parse_widths(cfg.widths)
    device = process_device(cfg.device, cfg.threads, world, local_world)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if cfg.batch_size % world:
        raise DataError(f"batch size {cfg.batch_size} must divide evenly across {world} processes")
    # bf16 where the hardware has it; CPUs without native bf16 run it far slower than fp32
    amp = device.type == "cuda" and torch.cuda.is_bf16_supported()

    data = load_cifar10(cfg.data, cfg.cache_dir)
    train, val = split_validation(data.train, cfg.val_size, cfg.seed)
    if cfg.limit:
        train = limit_split(train, cfg.limit, cfg.seed)
    if device.type == "cuda":
        train = Split(train.images.to(device), train.labels.to(device))
    if len(train) < cfg.batch_size:
        raise DataError(f"{len(train)} training images are fewer than one batch of {cfg.batch_size}")

    torch.manual_seed(cfg.seed)
    model = TeacherNet(widths).to(device).to(memory_format=torch.channels_last)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=True,
    )
    batches = len(train) // cfg.batch_size
    total_steps = batches * cfg.epochs
    history: list[dict] = []
    start_epoch, start_batch, elapsed = 0, 0, 0.0
    if state is not None:
        if state["data_fingerprint"] != data.fingerprint:
            raise DataError("--resume: the data differs from the data the run started on")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history, start_epoch, start_batch, elapsed = (
            state["history"],
            state["epoch"],
            state["batch"],
            state["elapsed"],
        )
    net = DistributedDataParallel(model) if world > 1 else model
    if rank == 0:
        log.info(
            "teacher %s: %d parameters; %d train, %d validation images; device %s, %d process(es) x %d "
            "thread(s)%s",
            widths,
            sum(p.numel() for p in model.parameters()),
            len(train),
            len(val),
            device,
            world,
            torch.get_num_threads(),
            f", resuming at epoch {start_epoch + 1} batch {start_batch}" if state else "",
        )

    def save_state(epoch: int, batch: int) -> None:
        if rank == 0:
            atomic_torch_save(
                {
                    "format": STATE_FORMAT,
                    "config": dataclasses.asdict(cfg),
                    "epoch": epoch,
                    "batch": batch,
                    "elapsed": elapsed,
                    "history": history,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "data_fingerprint": data.fingerprint,
                },
                last_path,
            )

    stop = StopFlag()
    stop.install()
    per_rank = cfg.batch_size // world
    for epoch in range(start_epoch, cfg.epochs):
        order = epoch_order(len(train), cfg.seed, epoch).to(train.images.device)
        g = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + epoch * 1009 + rank)
        net.train()
        started, loss_sum, correct, seen = time.perf_counter(), 0.0, 0, 0
        for b in range(start_batch, batches):
            if stop():
                elapsed += time.perf_counter() - started
                save_state(epoch, b)
                if rank == 0:
                    log.warning(
                        "saved %s at epoch %d, batch %d/%d; continue with --resume",
                        last_path,
                        epoch + 1,
                        b,
                        batches,
                    )
                raise KeyboardInterrupt
            for group in optimizer.param_groups:
                group["lr"] = lr_at(epoch * batches + b, total_steps, cfg)
            idx = order[b * cfg.batch_size :][rank * per_rank : (rank + 1) * per_rank]
            x = augment(normalize(train.images[idx].to(device)), cfg.translate, cfg.cutout, g)
            x = x.contiguous(memory_format=torch.channels_last)
            y = train.labels[idx].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = net(x).float()
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
        start_batch = 0
        seconds = time.perf_counter() - started
        elapsed += seconds
        loss_sum, correct_sum, seen_sum = all_sum([loss_sum, correct, seen], device)
        row = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(seen_sum, 1),
            "train_acc": correct_sum / max(seen_sum, 1),
            "val_acc": accuracy(model, val, device) if rank == 0 else 0.0,
            "images_per_s": seen_sum / seconds,
            "seconds": seconds,
        }
        history.append(row)
        save_state(epoch + 1, 0)
        if rank == 0:
            log.info(
                "epoch %d/%d  loss %.4f  train %.2f%%  val %.2f%%  %.0f img/s  %.0fs",
                epoch + 1,
                cfg.epochs,
                row["train_loss"],
                100 * row["train_acc"],
                100 * row["val_acc"],
                row["images_per_s"],
                seconds,
            )
            (out / "history.json").write_text(json.dumps(history, indent=2))

    result: dict = {"history": history}
    if rank == 0:
        metrics = {
            "val_acc": accuracy(model, val, device),
            "val_acc_tta": accuracy(model, val, device, tta=True),
            "train_acc": history[-1]["train_acc"] if history else 0.0,
        }
        if cfg.test:
            test = limit_split(data.test, max(cfg.limit // 5, 1), cfg.seed) if cfg.limit else data.test
            metrics["test_acc"] = accuracy(model, test, device)
        save_teacher(
            out / "teacher.pt",
            model,
            cfg,
            metrics=metrics,
            data_fingerprint=data.fingerprint,
            data_source=Path(cfg.data).name,
            code_version=code_version(),
            epochs=cfg.epochs,
            device=device_description(device, world),
            duration_s=round(elapsed, 1),
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        log.info(
            "teacher: val %.2f%% (flip TTA %.2f%%)%s; wrote %s",
            100 * metrics["val_acc"],
            100 * metrics["val_acc_tta"],
            f", test {100 * metrics['test_acc']:.2f}%" if "test_acc" in metrics else "",
            out / "teacher.pt",
        )
        result["metrics"] = metrics
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return result


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TeacherConfig)}
    given = {k: v for k, v in given.items() if v is not None and v is not False}
    try:
        if args.resume:
            fixed = [k for k in given if k not in RESUME_OVERRIDES]
            if fixed:
                raise DataError(
                    f"--resume continues the saved recipe, so --{fixed[0].replace('_', '-')} cannot change"
                )
        if given.get("dry_run"):
            given = {
                "epochs": 1,
                "limit": 512,
                "val_size": 64,
                "batch_size": 64,
                "widths": "8,16,32,32",
                "out": "runs/teacher-dry-run",
                **given,
            }
        cfg = TeacherConfig(**given)
        parse_widths(cfg.widths)
        run(cfg, args.resume, given)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
