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

import argparse
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
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from app.checkpoint import CheckpointError, atomic_torch_save, build_model, load_checkpoint, save_checkpoint
from app.device import DEVICE_CHOICES, autocast_dtype, resolve_device
from app.model import ARCHITECTURES, MODEL_KEYS
from app.preprocess import normalize
from training.augment import augment
from training.data import DataError, Split, limit_split, load_cifar10, split_validation
from training.evaluate import predict, summarize, write_report

log = logging.getLogger("training")

RESUME_FORMAT = "cifar10-cnn/train-state"


@dataclass
class TrainConfig:
    data: str = "cifar10"
    model: str = "final"  # final (FinalModel, 149,584 parameters) or lite (LiteModel, 47,648)
    cache_dir: str = ".cache/data"
    out: str = "weights"
    epochs: int = 96
    batch_size: int = 256  # global: split across DDP ranks
    lr: float = 0.2  # OneCycle peak
    pct_start: float = 0.25
    momentum: float = 0.9
    weight_decay: float = 1e-3
    label_smoothing: float = 0.1
    dropout: float = 0.0  # the original table's rate is 0.05: this small model under-fits
    translate: int = 4  # pixels, each direction
    cutout: int = 8  # square side in pixels; 0 turns it off
    val_size: int = 5000
    seed: int = 0
    limit: int = 0  # train on at most this many images (0: all)
    device: str = "auto"
    amp: str = "auto"  # auto | on | off
    channels_last: str = "auto"
    threads: int = 0  # per process; 0: cores / local processes
    dry_run: bool = False
    init: str = ""  # start from this checkpoint's weights (a second cycle); "" starts from scratch
    teacher: str = ""  # distil from this training.teacher checkpoint; "" trains on the labels alone
    kd_weight: float = 0.9  # share of the distillation term in the loss (the rest: cross-entropy)
    kd_temperature: float = 4.0
    ema: float = 0.0  # decay of a per-step weight average (0: off); the average is what is evaluated
    mixup: float = 0.0  # alpha of mixup's Beta(alpha, alpha); 0: off


FLAG_HELP = {
    "data": "'cifar10' (torchvision download) or an ImageFolder directory / .tar.gz with train/ and test/",
    "model": "final: FinalModel (149,584 parameters), written as final_model.pt; "
             "lite: LiteModel (47,648), written as lite_model.pt",
    "cache_dir": "git-ignored folder where archives are unpacked and decoded tensors kept",
    "out": "folder for final_model.pt (lite_model.pt), last.pt, history.json and the pictures",
    "epochs": "number of epochs (the OneCycle schedule spans all of them)",
    "batch_size": "global batch size; each of N DDP ranks takes batch_size / N",
    "lr": "peak learning rate of the OneCycle schedule",
    "pct_start": "fraction of the steps spent warming up to the peak",
    "momentum": "Nesterov momentum",
    "weight_decay": "L2 weight decay",
    "label_smoothing": "label smoothing of the cross-entropy loss",
    "dropout": "dropout rate after each conv unit (the original table's Dropout rows)",
    "translate": "maximum random shift in pixels (reflect padding)",
    "cutout": "side of the random square set to the mean colour; 0 turns cutout off",
    "val_size": "training images held out for model selection",
    "seed": "seed of the split, data order, augmentation and initialisation",
    "limit": "train on at most this many images, and test on a fifth as many (0: all)",
    "device": "auto picks cuda, then mps, then cpu",
    "amp": "bf16 autocast: auto uses it on CUDA and on CPUs with native bf16",
    "channels_last": "NHWC memory format: auto uses it on CUDA and CPU",
    "threads": "torch threads per process; 0 divides the cores among local processes",
    "dry_run": "tiny data, one epoch, out=runs/dry-run unless --out is given: the pipeline in seconds",
    "init": "start from the weights of this final_model.pt (a further OneCycle on a finished run); "
            "it must come from the same data, validation split and seed",
    "teacher": "distil from this teacher.pt (python -m training.teacher): teacher and student see the same "
               "augmented batch; it must have been trained on this data, validation split and seed",
    "kd_weight": "weight of the distillation term (KL divergence at --kd-temperature, times T^2); "
                 "the cross-entropy on the labels gets 1 - kd_weight",
    "kd_temperature": "softmax temperature of the distillation term",
    "ema": "decay per step of an exponential moving average of the weights (e.g. 0.999); the average is "
           "evaluated on validation every epoch and is what is saved; 0 turns it off",
    "mixup": "mixup alpha: each batch is blended with a shuffled copy, weight ~ Beta(alpha, alpha); "
             "0 turns it off",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            p.add_argument(flag, action="store_true", help=FLAG_HELP[f.name])
            continue
        kwargs = {"type": {"int": int, "float": float, "str": str}[f.type], "default": None,
                  "help": f"{FLAG_HELP[f.name]} (default: {f.default})"}
        if f.name == "device":
            kwargs["choices"] = DEVICE_CHOICES
        if f.name in ("amp", "channels_last"):
            kwargs["choices"] = ("auto", "on", "off")
        if f.name == "model":
            kwargs["choices"] = tuple(MODEL_KEYS)
        p.add_argument(flag, **kwargs)
    p.add_argument("--resume", action="store_true",
                   help="continue from <out>/last.pt with its saved recipe; only where it runs can change "
                        "(--data, --cache-dir, --device, --amp, --channels-last, --threads, and --teacher's "
                        "path, to the same file)")
    return p


# What --resume may change: where the data and the run live and how the hardware is used. The
# recipe (epochs, schedule, augmentation, split...) is the saved run's own.
RESUME_OVERRIDES = ("out", "data", "cache_dir", "device", "amp", "channels_last", "threads", "teacher")


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, bool, dict]:
    """(config, resume, the settings given on the command line)."""
    # `is`, not `in (None, False)`: 0 == False, and --dropout 0 or --cutout 0 must count
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    given = {name: v for name, v in values.items() if v is not None and v is not False}
    if args.resume:
        fixed = [name for name in given if name not in RESUME_OVERRIDES]
        if fixed:
            def flags(names) -> str:
                return ", ".join("--" + name.replace("_", "-") for name in names)

            raise DataError(f"--resume continues the saved run with its own recipe, so {flags(fixed)} "
                            f"cannot change; only {flags(RESUME_OVERRIDES)} can")
    if given.get("dry_run"):
        given = {"epochs": 1, "limit": 512, "val_size": 64, "batch_size": 64,
                 "out": "runs/dry-run", **given}
    return TrainConfig(**given), args.resume, given


def weights_name(model_key: str) -> str:
    """final -> final_model.pt, lite -> lite_model.pt."""
    return f"{model_key}_model.pt"


def init_weights(model: torch.nn.Module, cfg: TrainConfig, fingerprint: str) -> dict:
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
        raise DataError(f"--init: {cfg.init} holds a {ckpt.meta.get('model', 'FinalModel')}, "
                        f"this run trains a {type(model).__name__}")
    if ckpt.meta.get("data_fingerprint") != fingerprint:
        raise DataError(f"--init: {cfg.init} was not trained on this data (its fingerprint differs)")
    for key in ("seed", "val_size", "limit"):
        if parent.get(key) != getattr(cfg, key):
            raise DataError(f"--init: {cfg.init} used --{key.replace('_', '-')} {parent.get(key)}, "
                            f"this run {getattr(cfg, key)}; the validation split must be the same")
    model.load_state_dict(weights)
    return {"path": Path(cfg.init).name, "sha256": ckpt.sha256,
            "epochs": int(ckpt.meta.get("total_epochs", ckpt.meta.get("epoch", 0))),
            "metrics": {k: v for k, v in ckpt.meta.get("metrics", {}).items()
                        if k in ("val_acc", "test_acc")}}


def load_teacher_for(cfg: TrainConfig, fingerprint: str) -> tuple[torch.nn.Module, dict]:
    """The --teacher network and what the checkpoint records of it; refuses a teacher that saw
    this run's validation images (other data, validation size, seed or limit)."""
    from training.teacher import load_teacher  # training.teacher imports this module

    teacher, meta = load_teacher(cfg.teacher)
    if meta.get("data_fingerprint") != fingerprint:
        raise DataError(f"--teacher: {cfg.teacher} was not trained on this data (its fingerprint differs)")
    for key in ("seed", "val_size"):  # these two draw the validation split
        if meta.get(key) != getattr(cfg, key):
            raise DataError(f"--teacher: {cfg.teacher} used --{key.replace('_', '-')} {meta.get(key)}, "
                            f"this run {getattr(cfg, key)}; it must not have trained on this run's "
                            "validation images")
    return teacher, {"path": Path(cfg.teacher).name, "sha256": meta["sha256"],
                     "widths": list(meta["widths"]), "val_acc": meta["metrics"]["val_acc"]}


# ---------------------------------------------------------------- distributed helpers


def read_state(last_path: Path, fmt: str) -> dict:
    """The resumable state saved at `last_path`, refused unless written in format `fmt`."""
    if not last_path.is_file():
        raise DataError(f"--resume: {last_path} does not exist; start a run without --resume")
    state = torch.load(last_path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != fmt:
        raise DataError(f"--resume: {last_path} is not a {fmt} state written by this module")
    return state


def process_device(name: str, threads: int, world: int, local_world: int) -> torch.device:
    """This process's device (its own GPU under torchrun); on a CPU, `threads` torch threads, or
    the cores this process may run on divided among the local processes when 0."""
    device = resolve_device(name)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if device.type == "cpu":
        torch.set_num_threads(threads or max(1, len(os.sched_getaffinity(0)) // local_world))
    return device


def init_distributed(device_name: str) -> tuple[int, int, int]:
    """(rank, world_size, local_world_size); a no-op outside torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 1
    backend = "nccl" if device_name in ("auto", "cuda") and torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    return dist.get_rank(), world, int(os.environ.get("LOCAL_WORLD_SIZE", world))


def all_sum(values: list[float], device: torch.device) -> list[float]:
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# ---------------------------------------------------------------- one epoch


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The epoch's data order: the same on every rank, and the same after a resume."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def train_one_epoch(model, optimizer, scheduler, train, cfg: TrainConfig, epoch: int, ctx: dict,
                    start_batch: int = 0, sums: tuple[float, float, float] = (0.0, 0.0, 0.0),
                    stop=lambda: False, progress: bool = True) -> dict:
    """One pass over `train`, from `start_batch` (a resumed mid-epoch run). Returns metric sums.

    `stop()` is polled between steps; when it turns true the partial sums are returned with
    "batches_done" < "batches" so the caller can save a mid-epoch checkpoint.
    """
    from tqdm import tqdm

    device, rank, world = ctx["device"], ctx["rank"], ctx["world"]
    per_rank = cfg.batch_size // world
    order = epoch_order(len(train), cfg.seed, epoch).to(train.images.device)
    batches = len(train) // cfg.batch_size  # drop the ragged tail: every step sees a full batch
    g = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + epoch * 1009 + rank)
    torch.manual_seed(cfg.seed * 7919 + epoch * 31 + rank + start_batch)  # dropout
    # The sums stay on the device: reading them each step would make every step wait for the GPU.
    loss_sum = torch.tensor(sums[0], dtype=torch.float32, device=device)  # MPS has no float64
    correct = torch.tensor(int(sums[1]), dtype=torch.int64, device=device)
    seen = sums[2]
    model.train()
    started, images = time.perf_counter(), 0
    show = rank == 0 and progress and sys.stderr.isatty()
    bar = tqdm(range(start_batch, batches), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
               disable=not show, leave=False, dynamic_ncols=True)
    done = start_batch
    for b in bar:
        if stop():
            break
        idx = order[b * cfg.batch_size :][rank * per_rank : (rank + 1) * per_rank]
        x = normalize(train.images[idx].to(device, non_blocking=True))
        y = train.labels[idx].to(device, non_blocking=True)
        x = augment(x, cfg.translate, cfg.cutout, g)
        mix = None
        if cfg.mixup > 0:
            lam = random.Random(f"{cfg.seed}/{epoch}/{b}/{rank}").betavariate(cfg.mixup, cfg.mixup)
            pair = torch.randperm(len(y), generator=g, device=g.device).to(x.device)
            x, mix = lam * x + (1 - lam) * x[pair], (lam, y[pair])
        if ctx["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        with ctx["autocast"]():
            # the teacher sees exactly the student's augmented (and mixed) batch: "consistent" KD
            target = None
            if ctx["teacher"] is not None:
                with torch.no_grad():
                    target = ctx["teacher"](x).float()
            logits = model(x)
            loss = training_loss(logits.float(), y, cfg, target, mix)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if ctx["ema"] is not None:
            ctx["ema"].update_parameters(model.module if world > 1 else model)
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        images += len(y) * world
        done = b + 1
        if show and b % 10 == 0:
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}")
    bar.close()
    return {"loss_sum": loss_sum.item(), "correct": correct.item(), "seen": seen, "batches_done": done,
            "batches": batches, "seconds": time.perf_counter() - started, "images": images}


def training_loss(logits: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
                  teacher_logits: torch.Tensor | None = None,
                  mix: tuple[float, torch.Tensor] | None = None) -> torch.Tensor:
    """Label-smoothed cross-entropy (for mixup, blended over the pair of labels), and with a teacher
    (1 - w) * that + w * T^2 * KL(teacher || student) at temperature T (Hinton et al. 2015)."""
    ce = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
    if mix is not None:
        lam, y_pair = mix
        ce = lam * ce + (1 - lam) * F.cross_entropy(logits, y_pair, label_smoothing=cfg.label_smoothing)
    if teacher_logits is None:
        return ce
    t = cfg.kd_temperature
    kd = F.kl_div(F.log_softmax(logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                  reduction="batchmean", log_target=True) * t * t
    return (1 - cfg.kd_weight) * ce + cfg.kd_weight * kd


def evaluate_split(model, split, ctx: dict, batch_size: int = 1000) -> dict:
    """Accuracy and loss on `split`, sharded across ranks and summed."""
    rank, world = ctx["rank"], ctx["world"]
    shard = split.subset(torch.arange(rank, len(split), world))
    logits = predict(model, shard.images, ctx["device"], batch_size, amp=ctx["amp"])
    loss = F.cross_entropy(logits, shard.labels, reduction="sum").item() if len(shard) else 0.0
    correct = (logits.argmax(1) == shard.labels).sum().item()
    loss, correct, n = all_sum([loss, correct, len(shard)], ctx["device"])
    return {"loss": loss / max(n, 1), "acc": correct / max(n, 1)}


# ---------------------------------------------------------------- orchestration


def code_version() -> str:
    """$CIFAR10_CODE_VERSION when set (for a copy of the tree whose .git is missing or stale, such
    as one sent to a lent GPU machine), else the git commit (-dirty with uncommitted changes),
    else the installed package version."""
    if os.environ.get("CIFAR10_CODE_VERSION"):
        return os.environ["CIFAR10_CODE_VERSION"]
    try:
        root = Path(__file__).resolve().parent.parent
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
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


def run(cfg: TrainConfig, resume: bool = False, overrides: dict | None = None) -> dict:
    """Train; with `resume`, continue <out>/last.pt under its saved configuration, changed only
    by `overrides` (RESUME_OVERRIDES: a run started on a GPU can finish on a CPU, say)."""
    rank, world, local_world = init_distributed(cfg.device)
    out = Path(cfg.out)
    last_path = out / "last.pt"
    state = None
    if resume:
        state = read_state(last_path, RESUME_FORMAT)
        runtime = {k: v for k, v in (overrides or {}).items() if k in RESUME_OVERRIDES}
        cfg = TrainConfig(**{**state["config"], "out": cfg.out, **runtime})

    device = process_device(cfg.device, cfg.threads, world, local_world)
    if cfg.batch_size % world:
        raise DataError(f"batch size {cfg.batch_size} must divide evenly across {world} processes")
    amp_dtype = autocast_dtype(device) if cfg.amp != "off" else None
    if cfg.amp == "on" and amp_dtype is None:
        amp_dtype = torch.bfloat16
    channels_last = cfg.channels_last == "on" or (
        cfg.channels_last == "auto" and device.type in ("cpu", "cuda"))
    ctx = {
        "device": device, "rank": rank, "world": world, "amp": amp_dtype is not None,
        "channels_last": channels_last, "teacher": None, "ema": None,
        "autocast": (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else nullcontext,
    }

    data = load_cifar10(cfg.data, cfg.cache_dir)
    train, val = split_validation(data.train, cfg.val_size, cfg.seed)
    test = data.test
    if cfg.limit:
        train = limit_split(train, cfg.limit, cfg.seed)
        test = limit_split(test, max(cfg.limit // 5, 1), cfg.seed)
    if device.type == "cuda":  # the whole training split fits on any GPU: no copy per step
        train = Split(train.images.to(device), train.labels.to(device))
        torch.backends.cudnn.benchmark = True
    if len(train) < cfg.batch_size:
        raise DataError(f"{len(train)} training images are fewer than one batch of {cfg.batch_size}")
    if rank == 0:
        log.info("data %s: %d train, %d validation, %d test images; fingerprint %s",
                 cfg.data, len(train), len(val), len(test), data.fingerprint[:16])
        log.info("device %s, %d process(es), %d thread(s) each, autocast %s, channels_last %s",
                 device, world, torch.get_num_threads(), amp_dtype, channels_last)

    torch.manual_seed(cfg.seed)
    architecture = ARCHITECTURES[MODEL_KEYS[cfg.model]]
    weights_file = weights_name(cfg.model)
    model = architecture(dropout=cfg.dropout).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                nesterov=True, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(train) // cfg.batch_size
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch,
        pct_start=cfg.pct_start)

    teacher_info = None
    if cfg.teacher:
        teacher, teacher_info = load_teacher_for(cfg, data.fingerprint)
        if state is not None and state.get("teacher", {}).get("sha256") != teacher_info["sha256"]:
            raise DataError(f"--resume: {cfg.teacher} is not the teacher the run started with "
                            "(its sha256 differs)")
        ctx["teacher"] = teacher.to(device, memory_format=torch.channels_last).requires_grad_(False)
        if rank == 0:
            log.info("distilling from %s (sha256 %s, validation %.2f%%), weight %.2f, temperature %.1f",
                     cfg.teacher, teacher_info["sha256"][:12], 100 * teacher_info["val_acc"], cfg.kd_weight,
                     cfg.kd_temperature)
    if cfg.ema:
        ctx["ema"] = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)
    init_info = None
    if cfg.init and state is None:
        init_info = init_weights(model, cfg, data.fingerprint)
        if rank == 0:
            log.info("starting from %s (sha256 %s, %d epochs before this run)",
                     cfg.init, init_info["sha256"][:12], init_info["epochs"])
    history: list[dict] = []
    best = {"val_acc": -1.0, "epoch": -1, "state_dict": None, "train_acc": 0.0}
    start_epoch, start_batch, sums, elapsed = 0, 0, (0.0, 0.0, 0.0), 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history, best = state["history"], state["best"]
        start_epoch, start_batch = state["epoch"], state["batch"]
        sums, elapsed = tuple(state["sums"]), state["elapsed"]
        init_info = state.get("init")
        if ctx["ema"] is not None:
            ctx["ema"].load_state_dict(state["ema"])
        if data.fingerprint != state["data_fingerprint"]:
            raise DataError("--resume: the data differs from the data the run started on")
        if rank == 0:
            log.info("resuming at epoch %d, batch %d", start_epoch + 1, start_batch)
    net = DistributedDataParallel(model) if world > 1 else model

    stop = StopFlag()
    stop.install()
    meta = {"config": dataclasses.asdict(cfg), "data_fingerprint": data.fingerprint,
            "data_source": Path(cfg.data).name, "code_version": code_version(),
            "device": device_description(device, world),
            "total_epochs": cfg.epochs + (init_info["epochs"] if init_info else 0)}
    if init_info:
        meta["init"] = init_info
    if teacher_info:
        meta["teacher"] = teacher_info

    def save_state(epoch: int, batch: int, sums_now) -> None:
        if rank != 0:
            return
        atomic_torch_save({
            "format": RESUME_FORMAT, "config": dataclasses.asdict(cfg), "epoch": epoch,
            "batch": batch, "sums": list(sums_now), "elapsed": elapsed,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "history": history, "best": best,
            "data_fingerprint": data.fingerprint, "init": init_info, "teacher": teacher_info or {},
            "ema": ctx["ema"].state_dict() if ctx["ema"] is not None else {},
            "saved_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }, last_path)

    def save_final(metrics: dict, epoch: int) -> None:
        if rank != 0:
            return
        final = architecture(dropout=cfg.dropout)
        final.load_state_dict(best["state_dict"])
        save_checkpoint(out / weights_file, final, metrics=metrics, epoch=epoch,
                        duration_s=round(elapsed, 1), complete=epoch == cfg.epochs,
                        created_at=datetime.now(UTC).isoformat(timespec="seconds"), **meta)

    epoch = start_epoch
    mark = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        r = train_one_epoch(net, optimizer, scheduler, train, cfg, epoch, ctx, start_batch, sums, stop)
        elapsed += r["seconds"]
        if r["batches_done"] < r["batches"]:  # interrupted mid-epoch
            save_state(epoch, r["batches_done"], (r["loss_sum"], r["correct"], r["seen"]))
            if rank == 0:
                log.warning("saved %s at epoch %d, batch %d/%d; continue with --resume",
                            last_path, epoch + 1, r["batches_done"], r["batches"])
            raise KeyboardInterrupt
        start_batch, sums = 0, (0.0, 0.0, 0.0)
        loss_sum, correct, seen = all_sum([r["loss_sum"], r["correct"], r["seen"]], device)
        # with --ema the average is the model: it is validated, chosen and saved
        evaluated = ctx["ema"].module if ctx["ema"] is not None else model
        v = evaluate_split(evaluated, val, ctx)
        row = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": correct / seen,
               "val_loss": v["loss"], "val_acc": v["acc"], "lr": scheduler.get_last_lr()[0],
               "images_per_s": r["images"] / r["seconds"], "seconds": r["seconds"],
               # since the last epoch's row: training, validation and the checkpoint writes
               "wall_s": time.perf_counter() - mark}
        if ctx["ema"] is not None:
            row["val_acc_raw"] = evaluate_split(model, val, ctx)["acc"]
        mark = time.perf_counter()
        history.append(row)
        if v["acc"] > best["val_acc"]:
            best = {"val_acc": v["acc"], "epoch": epoch + 1, "train_acc": row["train_acc"],
                    "state_dict": {k: t.detach().cpu().clone() for k, t in evaluated.state_dict().items()}}
        save_state(epoch + 1, 0, (0.0, 0.0, 0.0))
        if rank == 0:
            log.info("epoch %d/%d  loss %.4f  train %.2f%%  val %.2f%%  lr %.4f  %.0f img/s  %.0fs",
                     epoch + 1, cfg.epochs, row["train_loss"], 100 * row["train_acc"],
                     100 * row["val_acc"], row["lr"], row["images_per_s"], row["seconds"])
            (out / "history.json").write_text(json.dumps(history, indent=2))
            if best["epoch"] == epoch + 1:
                save_final({"train_acc": best["train_acc"], "val_acc": best["val_acc"]}, epoch + 1)

    result: dict = {"history": history}
    if rank == 0 and history:
        result = finish(cfg, model, best, history, test, ctx, out, save_final, weights_file)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return result


def finish(cfg, model, best, history, test, ctx, out: Path, save_final, weights_file: str) -> dict:
    """Test the best epoch's weights once, write the final checkpoint and the pictures."""
    from training.plots import plot_curves

    model.load_state_dict(best["state_dict"])
    device = ctx["device"]
    logits = predict(model, test.images, device)  # float32: the figure we report
    tta = predict(model, test.images, device, tta=True)
    t, t_tta = summarize(logits, test.labels), summarize(tta, test.labels)
    metrics = {"train_acc": best["train_acc"], "val_acc": best["val_acc"], "test_acc": t["accuracy"],
               "test_acc_tta": t_tta["accuracy"], "test_loss": t["loss"],
               "per_class_accuracy": t["per_class_accuracy"], "best_epoch": best["epoch"],
               "test_images": t["count"]}
    save_final(metrics, len(history))
    plot_curves(history, out / "curves.png")
    write_report(test, logits, out)
    log.info("best epoch %d: train %.2f%%  val %.2f%%  test %.2f%%  test+flipTTA %.2f%%  (%d test images)",
             best["epoch"], 100 * best["train_acc"], 100 * best["val_acc"], 100 * t["accuracy"],
             100 * t_tta["accuracy"], t["count"])
    log.info("wrote %s", ", ".join(str(out / n) for n in (
        weights_file, "last.pt", "history.json", "curves.png", "confusion_matrix.png",
        "misclassified.png")))
    return {"history": history, "metrics": metrics}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        cfg, resume, given = config_from_args(args)
        run(cfg, resume, given)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


