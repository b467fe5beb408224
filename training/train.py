"""Train FinalModel (or LiteModel, --model lite) on CIFAR-10 and write `final_model.pt`
(`lite_model.pt`), `last.pt`, history and pictures.

    python -m training --data cifar10                                  # torchvision download
    python -m training --data path/to/cifar10-jpeg.tar.gz --epochs 24  # ImageFolder archive
    python -m training --resume                                        # continue the run in --out
    torchrun --nproc_per_node=2 -m training --data ...                 # DDP (gloo on CPU, nccl on GPU)

The data set lives in memory as uint8 tensors; each batch is normalised and augmented on the
device as one tensor (flip, translate, cutout). SGD with Nesterov momentum, a OneCycle learning
rate, label smoothing, weight decay; bf16 autocast and channels_last where the device gains.
The global batch size is fixed: under DDP each of the N ranks takes batch_size / N images.

Files in --out: `final_model.pt` or `lite_model.pt` (the best epoch on the validation split,
rewritten at the end with test metrics), `last.pt` (everything --resume needs, written every
epoch and on Ctrl-C or SIGTERM, mid-epoch included), `history.json`, `curves.png`,
`confusion_matrix.png`, `misclassified.png`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import platform
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypedDict, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn

from app.checkpoint import (
    CheckpointError,
    InitRecord,
    TeacherRecord,
    TrainingRecord,
    atomic_torch_save,
    build_model,
    load_checkpoint,
    save_checkpoint,
)
from app.device import autocast_dtype, resolve_device
from app.model import ARCHITECTURES, MODEL_KEYS
from app.preprocess import normalize
from app.settings import available_cpus
from training.augment import augment
from training.calibrate import calibrate_file
from training.config import (
    BN_IMAGES,
    DRY_RUN_SAYS,
    ConfigError,
    TrainConfig,
    build_parser,
    config_from_args,
    resumed_config,
)
from training.data import Cifar10, DataError, Split, limit_index, limit_split, load_cifar10, split_validation
from training.evaluate import predict, summarize, write_report
from training.trust import plot_reliability

__all__ = ["ConfigError", "TrainConfig", "evaluate", "main", "run", "train_one_epoch", "training_loss"]

log = logging.getLogger("training")

RESUME_FORMAT = "cifar10-cnn/train-state"
TEACHER_CHECK = 1000  # validation images on which the teacher's bf16 labels must match its float32 ones
PICTURES = ("curves.png", "confusion_matrix.png", "misclassified.png", "reliability.png")


# ---------------------------------------------------------------- typed state


@dataclass(frozen=True)
class Runtime:
    """Where and how this process computes."""

    device: torch.device
    rank: int = 0
    world: int = 1  # DDP processes
    amp_dtype: torch.dtype | None = None  # bf16 autocast, or None for float32
    channels_last: bool = False

    @property
    def amp(self) -> bool:
        return self.amp_dtype is not None

    def autocast(self) -> AbstractContextManager[Any]:
        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()


@dataclass
class Best:
    """The epoch with the highest validation accuracy so far, with its weights on the CPU."""

    val_acc: float = -1.0
    epoch: int = -1
    train_acc: float = 0.0
    state_dict: dict[str, torch.Tensor] | None = None  # None until the first epoch ends
    weights: str = "raw"  # "average" when --ema's weight average validated better than the raw weights


@dataclass
class Progress:
    """Where the run stands: what last.pt saves beside the weights and --resume restores."""

    epoch: int = 0  # epochs finished: the next one to run
    batch: int = 0  # batches of that epoch already run (a run stopped mid-epoch)
    sums: tuple[float, float, float] = (0.0, 0.0, 0.0)  # their loss sum, correct count, images
    elapsed: float = 0.0  # seconds of training so far (evaluation and writes excluded)
    history: list[dict[str, float]] = field(default_factory=list)  # a row per finished epoch
    best: Best = field(default_factory=Best)


class TrainState(TypedDict):
    """last.pt: everything --resume needs, as tensors and primitives (loads weights_only)."""

    format: str  # RESUME_FORMAT
    config: dict[str, Any]  # the TrainConfig: the recipe a resumed run keeps
    epoch: int  # Progress.epoch
    batch: int  # Progress.batch
    sums: list[float]  # Progress.sums
    elapsed: float
    model: dict[str, torch.Tensor]  # the unwrapped model's state_dict
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    history: list[dict[str, float]]
    best: dict[str, Any]  # Best's fields
    data_fingerprint: str
    init: InitRecord | None
    teacher: TeacherRecord | dict[str, Any]  # {} without --teacher
    ema: dict[str, Any]  # the averaged model's state_dict; {} without --ema
    saved_at: str  # ISO 8601, UTC


def train_state(
    cfg: TrainConfig,
    progress: Progress,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    ema: AveragedModel | None,
    fingerprint: str,
    init: InitRecord | None,
    teacher: TeacherRecord | None,
) -> TrainState:
    return {
        "format": RESUME_FORMAT,
        "config": dataclasses.asdict(cfg),
        "epoch": progress.epoch,
        "batch": progress.batch,
        "sums": list(progress.sums),
        "elapsed": progress.elapsed,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "history": progress.history,
        "best": {
            "val_acc": progress.best.val_acc,
            "epoch": progress.best.epoch,
            "train_acc": progress.best.train_acc,
            "state_dict": progress.best.state_dict,
            "weights": progress.best.weights,
        },
        "data_fingerprint": fingerprint,
        "init": init,
        "teacher": teacher or {},
        "ema": ema.state_dict() if ema is not None else {},
        "saved_at": now(),
    }


def progress_from(state: TrainState) -> Progress:
    best, sums = state["best"], state["sums"]
    return Progress(
        epoch=state["epoch"],
        batch=state["batch"],
        sums=(sums[0], sums[1], sums[2]),
        elapsed=state["elapsed"],
        history=state["history"],
        # states saved before the raw weights could be chosen kept the average whenever there was one
        best=Best(
            best["val_acc"],
            best["epoch"],
            best["train_acc"],
            best["state_dict"],
            best.get("weights", "average" if state["ema"] else "raw"),
        ),
    )


def read_state(last_path: Path, fmt: str) -> dict:
    """The resumable state saved at `last_path`, refused unless written in format `fmt`."""
    if not last_path.is_file():
        raise DataError(f"--resume: {last_path} does not exist; start a run without --resume")
    state = torch.load(last_path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != fmt:
        raise DataError(f"--resume: {last_path} is not a {fmt} state written by this module")
    return state


# ---------------------------------------------------------------- setup helpers


def weights_name(model_key: str) -> str:
    """final -> final_model.pt, lite -> lite_model.pt."""
    return f"{model_key}_model.pt"


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def init_weights(model: nn.Module, cfg: TrainConfig, fingerprint: str) -> InitRecord:
    """Load --init's weights into `model`; refuse a checkpoint whose validation split differs.

    The parent run's training images must not be this run's validation images, so the data,
    the validation size and the seed (which draws the split) have to be the parent's.
    """
    try:
        ckpt = load_checkpoint(cfg.init)
        weights = build_model(ckpt).state_dict()
    except CheckpointError as exc:
        raise DataError(f"--init: {exc}") from None
    parent = ckpt.meta.get("config", {})
    if type(model).__name__ != ckpt.meta.get("model", "FinalModel"):
        raise ConfigError(
            f"--init: {cfg.init} holds a {ckpt.meta.get('model', 'FinalModel')}, "
            f"this run trains a {type(model).__name__}"
        )
    if ckpt.meta.get("data_fingerprint") != fingerprint:
        raise ConfigError(f"--init: {cfg.init} was not trained on this data (its fingerprint differs)")
    for key in ("seed", "val_size", "limit"):
        if parent.get(key) != getattr(cfg, key):
            raise ConfigError(
                f"--init: {cfg.init} used --{key.replace('_', '-')} {parent.get(key)}, "
                f"this run {getattr(cfg, key)}; the validation split must be the same"
            )
    model.load_state_dict(weights)
    metrics = ckpt.meta.get("metrics", {})
    return {
        "path": Path(cfg.init).name,
        "sha256": ckpt.sha256,
        "epochs": int(ckpt.meta.get("total_epochs", ckpt.meta.get("epoch", 0))),
        "metrics": {k: v for k, v in metrics.items() if k in ("val_acc", "test_acc")},
    }


def load_teacher_for(cfg: TrainConfig, fingerprint: str) -> tuple[nn.Module, TeacherRecord]:
    """The --teacher network and what the checkpoint records of it; refuses a teacher that saw
    this run's validation images (other data, validation size, seed or limit)."""
    from training.teacher import load_teacher  # training.teacher imports this module

    teacher, meta = load_teacher(cfg.teacher)
    if meta.get("data_fingerprint") != fingerprint:
        raise ConfigError(f"--teacher: {cfg.teacher} was not trained on this data (its fingerprint differs)")
    for key in ("seed", "val_size"):  # these two draw the validation split
        if meta.get(key) != getattr(cfg, key):
            raise ConfigError(
                f"--teacher: {cfg.teacher} used --{key.replace('_', '-')} {meta.get(key)}, "
                f"this run {getattr(cfg, key)}; it must not have trained on this run's validation images"
            )
    record: TeacherRecord = {
        "path": Path(cfg.teacher).name,
        "sha256": meta["sha256"],
        "widths": list(meta["widths"]),
        "val_acc": meta["metrics"]["val_acc"],
    }
    return teacher, record


class TeacherPass:
    """The teacher's forward pass in a distilled step, on the fastest path that keeps its answers:
    inference mode, channels_last, and bf16 autocast where the device runs bf16 natively and the
    teacher's labels in bf16 match its float32 labels on at least `AGREE` of `check`'s images
    (validation images), else float32. Returns float32 logits usable in the loss."""

    AGREE = 0.995

    def __init__(self, teacher: nn.Module, rt: Runtime, check: torch.Tensor) -> None:
        self.teacher = teacher.eval().requires_grad_(False).to(memory_format=torch.channels_last)
        self.device = rt.device
        self.dtype: torch.dtype | None = None
        self.agreement, self.checked = 1.0, len(check)
        if autocast_dtype(rt.device) is not None and len(check):
            fp32 = self._run(check, None).argmax(1)
            self.agreement = float((self._run(check, torch.bfloat16).argmax(1) == fp32).float().mean())
            self.dtype = torch.bfloat16 if self.agreement >= self.AGREE else None

    def _run(self, images: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        """Logits of uint8 images, 250 at a time, in `dtype` (None: float32)."""
        batches = (normalize(images[s : s + 250].to(self.device)) for s in range(0, len(images), 250))
        return torch.cat([self._logits(x, dtype) for x in batches])

    def _logits(self, x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        cast = torch.autocast(self.device.type, dtype=dtype) if dtype is not None else nullcontext()
        with torch.inference_mode(), cast:
            logits = self.teacher(x.contiguous(memory_format=torch.channels_last)).float()
        return logits.clone()  # a normal tensor: the loss saves it for the backward pass

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._logits(x, self.dtype)

    def describe(self) -> str:
        precision = "bf16" if self.dtype is not None else "float32"
        agree = f"bf16 labels agree with float32 on {100 * self.agreement:.1f}% of {self.checked:,} images"
        return f"{precision}, channels_last, inference mode ({agree})"


def make_runtime(cfg: TrainConfig, device: torch.device, rank: int, world: int) -> Runtime:
    """bf16 autocast where the device gains (or as --amp says); channels_last on CUDA and CPU."""
    amp_dtype = autocast_dtype(device) if cfg.amp != "off" else None
    if cfg.amp == "on" and amp_dtype is None:
        amp_dtype = torch.bfloat16
    channels_last = cfg.channels_last == "on" or (
        cfg.channels_last == "auto" and device.type in ("cpu", "cuda")
    )
    return Runtime(device, rank, world, amp_dtype, channels_last)


def make_splits(data: Cifar10, cfg: TrainConfig, device: torch.device) -> tuple[Split, Split, Split]:
    """(train, validation, test): --val-size images held out by --seed, --limit applied; on a
    GPU the training images move there once."""
    train, val = split_validation(data.train, cfg.val_size, cfg.seed)
    test = data.test
    if cfg.limit:
        train = limit_split(train, cfg.limit, cfg.seed)
        test = limit_split(test, max(cfg.limit // 5, 1), cfg.seed)
    if device.type == "cuda":  # the whole training split fits on any GPU: no copy per step
        train = Split(train.images.to(device), train.labels.to(device))
        torch.backends.cudnn.benchmark = True
    return train, val, test


def code_version() -> str:
    """$CIFAR10_CODE_VERSION when set (for a copy of the tree whose .git is missing or stale, such
    as one sent to a lent GPU machine), else the git commit (-dirty with uncommitted changes),
    else the installed package version."""
    if os.environ.get("CIFAR10_CODE_VERSION"):
        return os.environ["CIFAR10_CODE_VERSION"]
    try:
        root = Path(__file__).resolve().parent.parent
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("cifar10-cnn")
        except PackageNotFoundError:
            return "unknown"


def device_description(device: torch.device, world: int) -> str:
    """For the checkpoint: e.g. "cuda (NVIDIA H100 80GB HBM3)" or "cpu (x86_64, 2 processes x 1 thread)"."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)}, {world} process(es))"
    return f"{device.type} ({platform.machine()}, {world} process(es) x {torch.get_num_threads()} thread(s))"


# ---------------------------------------------------------------- distributed helpers


def init_distributed(device_name: str) -> tuple[int, int, int]:
    """(rank, world_size, local_world_size); a no-op outside torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 1
    backend = "nccl" if device_name in ("auto", "cuda") and torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    return dist.get_rank(), world, int(os.environ.get("LOCAL_WORLD_SIZE", world))


def process_device(name: str, threads: int, world: int, local_world: int) -> torch.device:
    """This process's device (its own GPU under torchrun); on a CPU, `threads` torch threads, or
    the cores this process may run on (its CPU affinity) divided among the local processes when 0."""
    device = resolve_device(name)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if device.type == "cpu":
        torch.set_num_threads(threads or max(1, available_cpus() // local_world))
    return device


def all_sum(values: list[float], device: torch.device) -> list[float]:
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when any rank's flag is set, so all ranks stop at the same step.

    A signal reaches the ranks at slightly different moments; a rank that stopped alone would
    leave the others blocked in the next step's gradient all-reduce until the launcher kills them.
    """
    return all_sum([float(flag)], device)[0] > 0


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop finishes its step, saves last.pt, then exits."""

    def __init__(self) -> None:
        self.set = False

    def __call__(self) -> bool:
        return self.set

    def install(self) -> None:
        def handler(signum, _frame):
            if self.set:  # a second Ctrl-C: give up at once
                raise KeyboardInterrupt
            self.set = True
            log.warning("signal %s: stopping after this step and saving last.pt", signum)

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)


# ---------------------------------------------------------------- one epoch


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The epoch's data order: the same on every rank, and the same after a resume."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def training_loss(
    logits: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    teacher_logits: torch.Tensor | None = None,
    mix: tuple[float, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Label-smoothed cross-entropy (for mixup, blended over the pair of labels), and with a teacher
    (1 - w) * that + w * T^2 * KL(teacher || student) at temperature T (Hinton et al. 2015)."""
    ce = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
    if mix is not None:
        lam, y_pair = mix
        ce = lam * ce + (1 - lam) * F.cross_entropy(logits, y_pair, label_smoothing=cfg.label_smoothing)
    if teacher_logits is None:
        return ce
    t = cfg.kd_temperature
    kd = F.kl_div(
        F.log_softmax(logits / t, dim=1),
        F.log_softmax(teacher_logits / t, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return (1 - cfg.kd_weight) * ce + cfg.kd_weight * kd * t * t


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    train: Split,
    cfg: TrainConfig,
    epoch: int,
    rt: Runtime,
    *,
    teacher: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ema: AveragedModel | None = None,
    start_batch: int = 0,
    sums: tuple[float, float, float] = (0.0, 0.0, 0.0),
    stop: Callable[[], bool] = lambda: False,
    progress: bool = True,
) -> dict[str, float]:
    """One pass over `train` (this rank's share of each batch), from `start_batch` (a resumed
    mid-epoch run), continuing `sums`. Returns this rank's sums: loss_sum, correct, seen; and
    batches_done, batches, seconds, images (all ranks).

    `stop()` is polled between steps; when it turns true the partial sums are returned with
    "batches_done" < "batches" so the caller can save a mid-epoch checkpoint.
    """
    from tqdm import tqdm

    device = rt.device
    per_rank = cfg.batch_size // rt.world
    order = epoch_order(len(train), cfg.seed, epoch).to(train.images.device)
    batches = len(train) // cfg.batch_size  # drop the ragged tail: every step sees a full batch
    g = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + epoch * 1009 + rt.rank)
    torch.manual_seed(cfg.seed * 7919 + epoch * 31 + rt.rank + start_batch)  # dropout
    # The sums stay on the device: reading them each step would make every step wait for the GPU.
    loss_sum = torch.tensor(sums[0], dtype=torch.float32, device=device)  # MPS has no float64
    correct = torch.tensor(int(sums[1]), dtype=torch.int64, device=device)
    seen = sums[2]
    model.train()
    started, images = time.perf_counter(), 0
    show = rt.rank == 0 and progress and sys.stderr.isatty()
    bar = tqdm(
        range(start_batch, batches),
        desc=f"epoch {epoch + 1}/{cfg.epochs}",
        unit="batch",
        disable=not show,
        leave=False,
        dynamic_ncols=True,
    )
    done = start_batch
    for b in bar:
        if any_rank(stop(), device):
            break
        idx = order[b * cfg.batch_size :][rt.rank * per_rank : (rt.rank + 1) * per_rank]
        x = normalize(train.images[idx].to(device, non_blocking=True))  # (B, 3, 32, 32) float
        y = train.labels[idx].to(device, non_blocking=True)
        x = augment(x, cfg.translate, cfg.cutout, g)
        mix = None
        if cfg.mixup > 0:
            lam = random.Random(f"{cfg.seed}/{epoch}/{b}/{rt.rank}").betavariate(cfg.mixup, cfg.mixup)
            pair = torch.randperm(len(y), generator=g, device=g.device).to(x.device)
            x, mix = lam * x + (1 - lam) * x[pair], (lam, y[pair])
        if rt.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # the teacher sees exactly the student's augmented (and mixed) batch: "consistent" KD
        target = teacher(x) if teacher is not None else None
        with rt.autocast():
            logits = model(x)
            loss = training_loss(logits.float(), y, cfg, target, mix)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(model.module if isinstance(model, DistributedDataParallel) else model)
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        images += len(y) * rt.world
        done = b + 1
        if show and b % 10 == 0:
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}")
    bar.close()
    return {
        "loss_sum": loss_sum.item(),
        "correct": correct.item(),
        "seen": seen,
        "batches_done": done,
        "batches": batches,
        "seconds": time.perf_counter() - started,
        "images": images,
    }


def averaged_model(
    ema: AveragedModel, train: Split, rt: Runtime, seed: int, n: int = BN_IMAGES, batch_size: int = 500
) -> nn.Module:
    """A copy of the weight average with BatchNorm statistics of its own, recomputed on `n` seeded,
    unaugmented training images (the same on every rank); the running average is left as it is.

    The averaged statistics belong to no single set of weights: while the learning rate is high
    they validate near chance, even where the averaged weights are as good as the raw ones."""
    model = copy.deepcopy(ema.module)
    idx = limit_index(len(train), n, seed)
    layout = torch.channels_last if rt.channels_last else torch.contiguous_format
    batches = (
        normalize(train.images[idx[s : s + batch_size]].to(rt.device)).contiguous(memory_format=layout)
        for s in range(0, len(idx), batch_size)
    )
    update_bn(batches, model)
    return model.eval()


def evaluate(model: nn.Module, split: Split, rt: Runtime, batch_size: int = 1000) -> dict[str, float]:
    """Accuracy and mean loss on `split`, sharded across ranks and summed."""
    shard = split.subset(torch.arange(rt.rank, len(split), rt.world))
    logits = predict(model, shard.images, rt.device, batch_size, amp=rt.amp)
    loss = F.cross_entropy(logits, shard.labels, reduction="sum").item() if len(shard) else 0.0
    correct = (logits.argmax(1) == shard.labels).sum().item()
    loss, correct, n = all_sum([loss, correct, len(shard)], rt.device)
    return {"loss": loss / max(n, 1), "acc": correct / max(n, 1)}


# ---------------------------------------------------------------- files


def write_weights(
    path: Path,
    cfg: TrainConfig,
    best: Best,
    metrics: dict[str, Any],
    epoch: int,
    progress: Progress,
    meta: TrainingRecord,
) -> None:
    """final_model.pt (lite_model.pt): the best epoch's weights, as serving loads them."""
    model = ARCHITECTURES[MODEL_KEYS[cfg.model]](dropout=cfg.dropout)
    assert best.state_dict is not None, "no epoch has finished"
    model.load_state_dict(best.state_dict)
    record: TrainingRecord = {
        **meta,
        "metrics": metrics,
        "epoch": epoch,
        "duration_s": round(progress.elapsed, 1),
        "complete": epoch == cfg.epochs,
        "weights": best.weights,
        "created_at": now(),
    }
    save_checkpoint(path, model, **record)


def finish(
    cfg: TrainConfig,
    model: nn.Module,
    progress: Progress,
    splits: tuple[Split, Split, Split],
    rt: Runtime,
    meta: TrainingRecord,
) -> dict[str, Any]:
    """Test the best epoch's weights once (float32, and with flip TTA); write the final
    checkpoint, calibrated on the validation split (temperature, unsure detector), the curves,
    the confusion matrix, the misclassified images and the reliability diagram."""
    from training.plots import plot_curves

    train, val, test = splits
    out, best = Path(cfg.out), progress.best
    assert best.state_dict is not None, "no epoch has finished"
    model.load_state_dict(best.state_dict)
    logits = predict(model, test.images, rt.device)  # float32: the figure we report
    t = summarize(logits, test.labels)
    t_tta = summarize(predict(model, test.images, rt.device, tta=True), test.labels)
    metrics = {
        "train_acc": best.train_acc,
        "val_acc": best.val_acc,
        "test_acc": t["accuracy"],
        "test_acc_tta": t_tta["accuracy"],
        "test_loss": t["loss"],
        "per_class_accuracy": t["per_class_accuracy"],
        "best_epoch": best.epoch,
        "test_images": t["count"],
    }
    weights_file = weights_name(cfg.model)
    write_weights(out / weights_file, cfg, best, metrics, len(progress.history), progress, meta)
    temperature = calibrate_file(out / weights_file, train, val, rt.device, cfg.seed)["calibration"][
        "temperature"
    ]
    plot_curves(progress.history, out / "curves.png")
    write_report(test, logits, out)
    plot_reliability(test.labels, torch.softmax(logits, 1), torch.softmax(logits / temperature, 1),
                     out / "reliability.png")  # fmt: skip
    log.info(
        "best epoch %d: train %.2f%%  val %.2f%%  test %.2f%%  test+flipTTA %.2f%%  (%d test images)",
        best.epoch,
        100 * best.train_acc,
        100 * best.val_acc,
        100 * t["accuracy"],
        100 * t_tta["accuracy"],
        t["count"],
    )
    written = (weights_file, "last.pt", "history.json", *PICTURES)
    log.info("wrote %s", ", ".join(str(out / n) for n in written))
    return {"history": progress.history, "metrics": metrics}


# ---------------------------------------------------------------- the run
# Top to bottom: set up (config, device, data, model, optimizer), loop over the epochs calling
# train_one_epoch() and evaluate(), which return dicts of metrics, then test the best epoch's
# weights once and write the files. The recipe and its flags are in training/config.py.


def run(cfg: TrainConfig, resume: bool = False, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train; with `resume`, continue <out>/last.pt under its saved configuration, changed only
    by `overrides` (RESUME_OVERRIDES: a run started on a GPU can finish on a CPU, say)."""
    # -- setup: configuration, device, data
    rank, world, local_world = init_distributed(cfg.device)
    out = Path(cfg.out)
    last_path = out / "last.pt"
    state: TrainState | None = None
    if resume:
        if not last_path.is_file():
            raise ConfigError(f"--resume: {last_path} does not exist; start a run without --resume")
        state = cast(TrainState, read_state(last_path, RESUME_FORMAT))
        cfg = resumed_config(state["config"], cfg.out, overrides or {})

    device = process_device(cfg.device, cfg.threads, world, local_world)
    if cfg.batch_size % world:
        raise ConfigError(f"batch size {cfg.batch_size} must divide evenly across {world} processes")
    rt = make_runtime(cfg, device, rank, world)
    if cfg.dry_run and rank == 0:
        log.info(DRY_RUN_SAYS, out)

    data = load_cifar10(cfg.data, cfg.cache_dir)
    if state is not None and data.fingerprint != state["data_fingerprint"]:
        raise DataError("--resume: the data differs from the data the run started on")
    train, val, test = make_splits(data, cfg, device)
    if len(train) < cfg.batch_size:
        raise ConfigError(f"{len(train)} training images are fewer than one batch of {cfg.batch_size}")
    if rank == 0:
        log.info(
            "data %s: %d train, %d validation, %d test images; fingerprint %s",
            cfg.data,
            len(train),
            len(val),
            len(test),
            data.fingerprint[:16],
        )
        log.info(
            "device %s, %d process(es), %d thread(s) each, autocast %s, channels_last %s",
            device,
            world,
            torch.get_num_threads(),
            rt.amp_dtype,
            rt.channels_last,
        )

    # -- setup: model, optimizer, schedule; the teacher, the weight average, the starting weights
    torch.manual_seed(cfg.seed)
    model = ARCHITECTURES[MODEL_KEYS[cfg.model]](dropout=cfg.dropout).to(device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=cfg.lr,
        epochs=cfg.epochs,
        steps_per_epoch=len(train) // cfg.batch_size,
        pct_start=cfg.pct_start,
    )
    teacher, teacher_info, teacher_pass = None, None, None
    if cfg.teacher:
        teacher, teacher_info = load_teacher_for(cfg, data.fingerprint)
        if state is not None and state.get("teacher", {}).get("sha256") != teacher_info["sha256"]:
            raise ConfigError(
                f"--resume: {cfg.teacher} is not the teacher the run started with (its sha256 differs)"
            )
        teacher_pass = TeacherPass(teacher.to(device), rt, val.images[:TEACHER_CHECK])
        if rank == 0:
            log.info(
                "distilling from %s (sha256 %s, validation %.2f%%), weight %.2f, temperature %.1f; "
                "teacher pass: %s",
                cfg.teacher,
                teacher_info["sha256"][:12],
                100 * teacher_info["val_acc"],
                cfg.kd_weight,
                cfg.kd_temperature,
                teacher_pass.describe(),
            )
    ema = (
        AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)
        if cfg.ema
        else None
    )
    init_info: InitRecord | None = None
    progress = Progress()
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        progress, init_info = progress_from(state), state.get("init")
        if rank == 0:
            log.info("resuming at epoch %d, batch %d", progress.epoch + 1, progress.batch)
    elif cfg.init:
        init_info = init_weights(model, cfg, data.fingerprint)
        if rank == 0:
            log.info(
                "starting from %s (sha256 %s, %d epochs before this run)",
                cfg.init,
                init_info["sha256"][:12],
                init_info["epochs"],
            )
    net = DistributedDataParallel(model) if world > 1 else model

    # what final_model.pt records besides its weights, metrics and epoch
    meta: TrainingRecord = {
        "config": dataclasses.asdict(cfg),
        "data_fingerprint": data.fingerprint,
        "data_source": Path(cfg.data).name,
        "code_version": code_version(),
        "device": device_description(device, world),
        "total_epochs": cfg.epochs + (init_info["epochs"] if init_info else 0),
    }
    if init_info:
        meta["init"] = init_info
    if teacher_info:
        meta["teacher"] = teacher_info

    # -- the loop: train an epoch, validate, keep the best, save
    stop = StopFlag()
    stop.install()
    mark = time.perf_counter()
    for epoch in range(progress.epoch, cfg.epochs):
        r = train_one_epoch(
            net,
            optimizer,
            scheduler,
            train,
            cfg,
            epoch,
            rt,
            teacher=teacher_pass,
            ema=ema,
            start_batch=progress.batch,
            sums=progress.sums,
            stop=stop,
        )
        progress.elapsed += r["seconds"]
        interrupted = r["batches_done"] < r["batches"]
        if interrupted:  # mid-epoch: keep this epoch's sums, and validate nothing
            progress.batch, progress.sums = int(r["batches_done"]), (r["loss_sum"], r["correct"], r["seen"])
        else:
            loss_sum, correct, seen = all_sum([r["loss_sum"], r["correct"], r["seen"]], device)
            # with --ema the average and the raw weights are both validated; the better one is kept
            average = averaged_model(ema, train, rt, cfg.seed) if ema is not None else None
            v = evaluate(average if average is not None else model, val, rt)
            row = {
                "epoch": epoch + 1,
                "train_loss": loss_sum / seen,
                "train_acc": correct / seen,
                "val_loss": v["loss"],
                "val_acc": v["acc"],
                "lr": float(scheduler.get_last_lr()[0]),
                "images_per_s": r["images"] / r["seconds"],
                "seconds": r["seconds"],
                # since the last epoch's row: training, validation and the checkpoint writes
                "wall_s": time.perf_counter() - mark,
            }
            raw = model.module if isinstance(model, DistributedDataParallel) else model
            if average is None:
                candidates = [(v["acc"], raw, "raw")]
            else:
                row["val_acc_raw"] = evaluate(model, val, rt)["acc"]
                candidates = [(v["acc"], average, "average"), (row["val_acc_raw"], raw, "raw")]
            mark = time.perf_counter()
            progress.history.append(row)
            progress.epoch, progress.batch, progress.sums = epoch + 1, 0, (0.0, 0.0, 0.0)
            acc, chosen, kind = max(candidates, key=lambda c: c[0])  # a tie keeps the average
            if acc > progress.best.val_acc:
                weights = {k: t.detach().cpu().clone() for k, t in chosen.state_dict().items()}
                progress.best = Best(acc, epoch + 1, row["train_acc"], weights, kind)
        if rank == 0:
            saved = train_state(
                cfg, progress, model, optimizer, scheduler, ema, data.fingerprint, init_info, teacher_info
            )
            atomic_torch_save(saved, last_path)
        if interrupted:
            if rank == 0:
                log.warning(
                    "saved %s at epoch %d, batch %d/%d; continue with --resume",
                    last_path,
                    epoch + 1,
                    r["batches_done"],
                    r["batches"],
                )
            raise KeyboardInterrupt
        if rank == 0:
            log.info(
                "epoch %d/%d  loss %.4f  train %.2f%%  val %.2f%%%s  lr %.4f  %.0f img/s  %.0fs",
                epoch + 1,
                cfg.epochs,
                row["train_loss"],
                100 * row["train_acc"],
                100 * row["val_acc"],
                f" (average; raw {100 * row['val_acc_raw']:.2f}%)" if ema is not None else "",
                row["lr"],
                row["images_per_s"],
                row["seconds"],
            )
            (out / "history.json").write_text(json.dumps(progress.history, indent=2))
            best = progress.best
            if best.epoch == epoch + 1:
                metrics = {"train_acc": best.train_acc, "val_acc": best.val_acc}
                write_weights(out / weights_name(cfg.model), cfg, best, metrics, epoch + 1, progress, meta)

    # -- report: the best epoch on the test split, the pictures
    result: dict[str, Any] = {"history": progress.history}
    if rank == 0 and progress.history:
        result = finish(cfg, model, progress, (train, val, test), rt, meta)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return result


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    parser = build_parser(__doc__)
    args = parser.parse_args(argv)
    try:
        cfg, resume, given = config_from_args(args)
    except ConfigError as exc:
        parser.error(str(exc))  # the usage line, then the sentence; exit code 2
    try:
        run(cfg, resume, given)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
