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
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn

from app.checkpoint import (
    CheckpointError,
    InitRecord,
    TeacherRecord,
    TrainingRecord,
    build_model,
    load_checkpoint,
    save_checkpoint,
)
from app.device import autocast_dtype
from app.model import ARCHITECTURES, MODEL_KEYS
from app.preprocess import normalize
from training.augment import augment, mixed_cross_entropy, mixup
from training.calibrate import calibrate_file
from training.config import (
    BN_IMAGES,
    ConfigError,
    TrainConfig,
    build_parser,
    config_from_args,
    resumed_config,
)
from training.data import DataError, Split, limit_index
from training.evaluate import predict, summarize, write_report
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
from training.teacher import load_teacher
from training.trust import plot_reliability

__all__ = ["ConfigError", "TrainConfig", "evaluate", "main", "run", "train_one_epoch", "training_loss"]

log = logging.getLogger("training")

RESUME_FORMAT = "cifar10-cnn/train-state"
TEACHER_CHECK = 1000  # validation images on which the teacher's bf16 labels must match its float32 ones
PICTURES = ("curves.png", "confusion_matrix.png", "misclassified.png", "reliability.png")


# ---------------------------------------------------------------- typed state


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


# ---------------------------------------------------------------- setup helpers


def weights_name(model_key: str) -> str:
    """final -> final_model.pt, lite -> lite_model.pt."""
    return f"{model_key}_model.pt"


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


def uses_channels_last(cfg: TrainConfig, device: torch.device) -> bool:
    """--channels-last: auto uses the NHWC memory format on CUDA and CPU."""
    return cfg.channels_last == "on" or (cfg.channels_last == "auto" and device.type in ("cpu", "cuda"))


# ---------------------------------------------------------------- one epoch


def training_loss(
    logits: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    teacher_logits: torch.Tensor | None = None,
    mix: tuple[float, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Label-smoothed cross-entropy (for mixup, blended over the pair of labels), and with a teacher
    (1 - w) * that + w * T^2 * KL(teacher || student) at temperature T (Hinton et al. 2015)."""
    ce = mixed_cross_entropy(logits, y, cfg.label_smoothing, mix)
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


def progress_bar(batches: range, desc: str, show: bool) -> Any:
    """A tqdm bar over an epoch's batches, shown only when `show` (rank 0 in a terminal)."""
    from tqdm import tqdm

    return tqdm(batches, desc=desc, unit="batch", disable=not show, leave=False, dynamic_ncols=True)


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
    device = rt.device
    per_rank = cfg.batch_size // rt.world
    order = epoch_order(len(train), cfg.seed, epoch).to(train.images.device)
    batches = len(train) // cfg.batch_size  # drop the ragged tail: every step sees a full batch
    g = augment_generator(cfg.seed, epoch, rt.rank, device)
    torch.manual_seed(cfg.seed * 7919 + epoch * 31 + rt.rank + start_batch)  # dropout
    # The sums stay on the device: reading them each step would make every step wait for the GPU.
    loss_sum = torch.tensor(sums[0], dtype=torch.float32, device=device)  # MPS has no float64
    correct = torch.tensor(int(sums[1]), dtype=torch.int64, device=device)
    seen = sums[2]
    model.train()
    started, images = time.perf_counter(), 0
    show = rt.rank == 0 and progress and sys.stderr.isatty()
    bar = progress_bar(range(start_batch, batches), f"epoch {epoch + 1}/{cfg.epochs}", show)
    done = start_batch
    for b in bar:
        if any_rank(stop(), device):
            break
        idx = order[b * cfg.batch_size :][rt.rank * per_rank : (rt.rank + 1) * per_rank]
        x = normalize(train.images[idx].to(device, non_blocking=True))  # (B, 3, 32, 32) float
        y = train.labels[idx].to(device, non_blocking=True)
        x = augment(x, cfg.translate, cfg.cutout, g)
        x, mix = mixup(x, y, cfg.mixup, f"{cfg.seed}/{epoch}/{b}/{rt.rank}", g)
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


# ---------------------------------------------------------------- the run
# Top to bottom: setup() (config, device, data, model, optimizer, teacher, weight average, the
# starting weights), then the loop of training.runtime.EpochLoop around train_one_epoch() and
# evaluate(), which return dicts of metrics, then finish() tests the best epoch's weights once and
# writes the files. The recipe and its flags are in training/config.py.


@dataclass
class StudentRun(EpochLoop):
    """A run of FinalModel (LiteModel): its methods hand the module's train_one_epoch() and
    evaluate() what they need and keep the progress that last.pt saves."""

    cfg: TrainConfig
    rt: Runtime
    train: Split
    val: Split
    test: Split
    model: nn.Module  # never wrapped: what is validated and saved
    net: nn.Module  # the model, or its DDP wrapper: what trains
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: AveragedModel | None
    teacher: TeacherPass | None
    meta: TrainingRecord  # what final_model.pt records besides its weights, metrics and epoch
    progress: Progress
    last_path: Path
    mark: float = field(default_factory=time.perf_counter)  # the last epoch row's wall clock

    def epochs_left(self) -> bool:
        return self.progress.epoch < self.cfg.epochs

    def train_one_epoch(self, stop: StopFlag) -> Epoch:
        p = self.progress
        r = train_one_epoch(
            self.net, self.optimizer, self.scheduler, self.train, self.cfg, p.epoch, self.rt,
            teacher=self.teacher, ema=self.ema, start_batch=p.batch, sums=p.sums, stop=stop,
        )  # fmt: skip
        p.elapsed += r["seconds"]
        done = Epoch(
            p.epoch, int(r["batches_done"]), int(r["batches"]), r["batches_done"] < r["batches"],
            r["seconds"], r["loss_sum"], r["correct"], r["seen"], r["images"],
        )  # fmt: skip
        if done.stopped:  # keep this epoch's sums for --resume
            p.batch, p.sums = done.batch, (done.loss_sum, done.correct, done.seen)
        return done

    def evaluate(self, done: Epoch) -> None:
        """Validate (with --ema the average and the raw weights both: the better one is kept), add
        the epoch's row to the history and keep the weights if they are the best so far."""
        rt, model, progress = self.rt, self.model, self.progress
        loss_sum, correct, seen = all_sum([done.loss_sum, done.correct, done.seen], rt.device)
        average = averaged_model(self.ema, self.train, rt, self.cfg.seed) if self.ema is not None else None
        v = evaluate(average if average is not None else model, self.val, rt)
        row = {
            "epoch": done.epoch + 1,
            "train_loss": loss_sum / seen,
            "train_acc": correct / seen,
            "val_loss": v["loss"],
            "val_acc": v["acc"],
            "lr": float(self.scheduler.get_last_lr()[0]),
            "images_per_s": done.images / done.seconds,
            "seconds": done.seconds,
            # since the last epoch's row: training, validation and the checkpoint writes
            "wall_s": time.perf_counter() - self.mark,
        }
        candidates = [(v["acc"], model, "raw")]
        if average is not None:
            row["val_acc_raw"] = evaluate(model, self.val, rt)["acc"]
            candidates = [(v["acc"], average, "average"), (row["val_acc_raw"], model, "raw")]
        self.mark = time.perf_counter()
        progress.history.append(row)
        progress.epoch, progress.batch, progress.sums = done.epoch + 1, 0, (0.0, 0.0, 0.0)
        acc, chosen, kind = max(candidates, key=lambda c: c[0])  # a tie keeps the average
        if acc > progress.best.val_acc:
            weights = {k: t.detach().cpu().clone() for k, t in chosen.state_dict().items()}
            progress.best = Best(acc, done.epoch + 1, row["train_acc"], weights, kind)

    def state(self) -> TrainState:
        return train_state(
            self.cfg, self.progress, self.model, self.optimizer, self.scheduler, self.ema,
            self.meta["data_fingerprint"], self.meta.get("init"), self.meta.get("teacher"),
        )  # fmt: skip

    def report(self) -> None:
        cfg, progress, out = self.cfg, self.progress, Path(self.cfg.out)
        row = progress.history[-1]
        log.info(
            "epoch %d/%d  loss %.4f  train %.2f%%  val %.2f%%%s  lr %.4f  %.0f img/s  %.0fs",
            row["epoch"], cfg.epochs, row["train_loss"], 100 * row["train_acc"], 100 * row["val_acc"],
            f" (average; raw {100 * row['val_acc_raw']:.2f}%)" if self.ema is not None else "",
            row["lr"], row["images_per_s"], row["seconds"],
        )  # fmt: skip
        (out / "history.json").write_text(json.dumps(progress.history, indent=2))
        best = progress.best
        if best.epoch == row["epoch"]:
            metrics = {"train_acc": best.train_acc, "val_acc": best.val_acc}
            weights_file = out / weights_name(cfg.model)
            write_weights(weights_file, cfg, best, metrics, best.epoch, progress, self.meta)

    def finish(self) -> dict[str, Any]:
        """Rank 0: test the best epoch's weights once (float32, and with flip TTA); write the final
        checkpoint, calibrated on the validation split (temperature, unsure detector), the curves,
        the confusion matrix, the misclassified images and the reliability diagram. The history
        (and on rank 0 the metrics)."""
        from training.plots import plot_curves

        cfg, model, progress, device = self.cfg, self.model, self.progress, self.rt.device
        if self.rt.rank != 0 or not progress.history:
            return {"history": progress.history}
        out, best, test = Path(cfg.out), progress.best, self.test
        assert best.state_dict is not None, "no epoch has finished"
        model.load_state_dict(best.state_dict)
        logits = predict(model, test.images, device)  # float32: the figure we report
        t = summarize(logits, test.labels)
        t_tta = summarize(predict(model, test.images, device, tta=True), test.labels)
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
        weights_file = out / weights_name(cfg.model)
        write_weights(weights_file, cfg, best, metrics, len(progress.history), progress, self.meta)
        calibration = calibrate_file(weights_file, self.train, self.val, device, cfg.seed)["calibration"]
        plot_curves(progress.history, out / "curves.png")
        write_report(test, logits, out)
        calibrated = torch.softmax(logits / calibration["temperature"], 1)
        plot_reliability(test.labels, torch.softmax(logits, 1), calibrated, out / "reliability.png")
        log.info(
            "best epoch %d: train %.2f%%  val %.2f%%  test %.2f%%  test+flipTTA %.2f%%  (%d test images)",
            best.epoch, 100 * best.train_acc, 100 * best.val_acc, 100 * t["accuracy"],
            100 * t_tta["accuracy"], t["count"],
        )  # fmt: skip
        written = (weights_file.name, "last.pt", "history.json", *PICTURES)
        log.info("wrote %s", ", ".join(str(out / n) for n in written))
        return {"history": progress.history, "metrics": metrics}


def distillation(
    cfg: TrainConfig, rt: Runtime, fingerprint: str, state: TrainState | None, val: Split
) -> tuple[TeacherPass | None, TeacherRecord | None]:
    """With --teacher: its forward pass and what the checkpoint records of it (on --resume, the
    teacher the run started with)."""
    if not cfg.teacher:
        return None, None
    teacher, info = load_teacher_for(cfg, fingerprint)
    if state is not None and state.get("teacher", {}).get("sha256") != info["sha256"]:
        raise ConfigError(
            f"--resume: {cfg.teacher} is not the teacher the run started with (its sha256 differs)"
        )
    teacher_pass = TeacherPass(teacher.to(rt.device), rt, val.images[:TEACHER_CHECK])
    if rt.rank == 0:
        log.info(
            "distilling from %s (sha256 %s, validation %.2f%%), weight %.2f, temperature %.1f; "
            "teacher pass: %s",
            cfg.teacher, info["sha256"][:12], 100 * info["val_acc"], cfg.kd_weight, cfg.kd_temperature,
            teacher_pass.describe(),
        )  # fmt: skip
    return teacher_pass, info


def setup(cfg: TrainConfig, resume: bool, overrides: dict[str, Any]) -> StudentRun:
    """The run: device, data, model, optimizer, schedule; the teacher, the weight average, the
    starting weights (last.pt's with `resume`, --init's, or fresh)."""
    out = cfg.out
    cfg, rt, saved = start_process(
        cfg, resume, RESUME_FORMAT, lambda saved: resumed_config(saved, out, overrides), uses_channels_last
    )
    state = cast(TrainState | None, saved)
    train, val, test, fingerprint = load_splits(cfg, rt.device, state)
    if rt.rank == 0:
        log.info("data %s: %d train, %d validation, %d test images; fingerprint %s",
                 cfg.data, len(train), len(val), len(test), fingerprint[:16])  # fmt: skip
        log.info("device %s, %d process(es), %d thread(s) each, autocast %s, channels_last %s",
                 rt.device, rt.world, torch.get_num_threads(), rt.amp_dtype, rt.channels_last)  # fmt: skip
    torch.manual_seed(cfg.seed)
    model = ARCHITECTURES[MODEL_KEYS[cfg.model]](dropout=cfg.dropout).to(rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, epochs=cfg.epochs, steps_per_epoch=len(train) // cfg.batch_size,
        pct_start=cfg.pct_start,
    )  # fmt: skip
    teacher_pass, teacher_info = distillation(cfg, rt, fingerprint, state, val)
    ema = None
    if cfg.ema:
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)
    init_info: InitRecord | None = None
    progress = Progress()
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        progress, init_info = progress_from(state), state.get("init")
        if rt.rank == 0:
            log.info("resuming at epoch %d, batch %d", progress.epoch + 1, progress.batch)
    elif cfg.init:
        init_info = init_weights(model, cfg, fingerprint)
        if rt.rank == 0:
            log.info("starting from %s (sha256 %s, %d epochs before this run)",
                     cfg.init, init_info["sha256"][:12], init_info["epochs"])  # fmt: skip
    meta: TrainingRecord = {
        "config": dataclasses.asdict(cfg),
        "data_fingerprint": fingerprint,
        "data_source": Path(cfg.data).name,
        "code_version": code_version(),
        "device": device_description(rt.device, rt.world),
        "total_epochs": cfg.epochs + (init_info["epochs"] if init_info else 0),
    }
    if init_info:
        meta["init"] = init_info
    if teacher_info:
        meta["teacher"] = teacher_info
    net = DistributedDataParallel(model) if rt.world > 1 else model
    return StudentRun(
        cfg, rt, train, val, test, model, net, optimizer, scheduler, ema, teacher_pass, meta, progress,
        Path(cfg.out) / "last.pt",
    )  # fmt: skip


def run(cfg: TrainConfig, resume: bool = False, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train; with `resume`, continue <out>/last.pt under its saved configuration, changed only
    by `overrides` (RESUME_OVERRIDES: a run started on a GPU can finish on a CPU, say)."""
    return setup(cfg, resume, overrides or {}).run()


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
