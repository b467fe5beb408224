"""What every trainer here shares (`python -m training`, the FinalModel / LiteModel trainer, and
`python -m training.teacher`, the airbench trainer): where a process computes, the stop that all
ranks agree on, seeds and epoch order, the splits, what a checkpoint records of the code and the
device, reading a resumable state, and the epoch loop itself (`EpochLoop`).

A trainer is an `EpochLoop`: it says how to train one epoch, evaluate it, save its state and
finish; the loop around them, the stop on SIGINT/SIGTERM included, is written once, here.
"""

from __future__ import annotations

import logging
import os
import platform
import signal
import subprocess
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
import torch.distributed as dist

from app.checkpoint import atomic_torch_save
from app.device import autocast_dtype, resolve_device
from app.settings import available_cpus
from training.config import DRY_RUN_SAYS, ConfigError
from training.data import DataError, Split, limit_split, load_cifar10, split_validation

log = logging.getLogger("training")


# ---------------------------------------------------------------- where this process computes


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


def amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """--amp: "auto" bf16 where the device runs it natively, "on" bf16, "off" float32 (None)."""
    if setting == "off":
        return None
    return autocast_dtype(device) or (torch.bfloat16 if setting == "on" else None)


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


class RunConfig(Protocol):
    """What start_process() and load_splits() read of a trainer's configuration (TrainConfig,
    TeacherConfig)."""

    data: str
    cache_dir: str
    val_size: int
    seed: int
    limit: int
    out: str
    device: str
    threads: int
    batch_size: int
    amp: str
    dry_run: bool


C = TypeVar("C", bound=RunConfig)


def start_process(
    cfg: C,
    resume: bool,
    fmt: str,
    resumed: Callable[[dict[str, Any]], C],
    channels_last: Callable[[C, torch.device], bool],
) -> tuple[C, Runtime, dict[str, Any] | None]:
    """This process's place in the run: it joins the process group (under torchrun) and takes its
    device and threads. With `resume`, the state saved in <out>/last.pt (format `fmt`) and the
    configuration `resumed` makes of the one saved there; else None and `cfg`."""
    rank, world, local_world = init_distributed(cfg.device)
    state = None
    if resume:
        state = read_state(Path(cfg.out) / "last.pt", fmt)
        cfg = resumed(state["config"])
    device = process_device(cfg.device, cfg.threads, world, local_world)
    if cfg.batch_size % world:
        raise ConfigError(f"batch size {cfg.batch_size} must divide evenly across {world} processes")
    if cfg.dry_run and rank == 0:
        log.info(DRY_RUN_SAYS, cfg.out)
    return cfg, Runtime(device, rank, world, amp_dtype(cfg.amp, device), channels_last(cfg, device)), state


def end_distributed() -> None:
    """Wait for every rank, then leave the process group (a no-op outside torchrun)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ---------------------------------------------------------------- the stop all ranks agree on


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


# ---------------------------------------------------------------- seeds, data order, splits


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The epoch's data order: the same on every rank, and the same after a resume."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def augment_generator(seed: int, epoch: int, rank: int, device: torch.device) -> torch.Generator:
    """The generator of an epoch's augmentation on one rank: its own per rank, the same after a resume."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + epoch * 1009 + rank)


def load_splits(
    cfg: RunConfig, device: torch.device, state: Mapping[str, Any] | None
) -> tuple[Split, Split, Split, str]:
    """(train, validation, test, the data's fingerprint): --val-size images held out by --seed,
    --limit applied (a fifth as many test images); on a GPU the training images move there once.
    A resumed run (`state`) must find the data it started on."""
    data = load_cifar10(cfg.data, cfg.cache_dir)
    if state is not None and data.fingerprint != state["data_fingerprint"]:
        raise DataError("--resume: the data differs from the data the run started on")
    train, val = split_validation(data.train, cfg.val_size, cfg.seed)
    test = data.test
    if cfg.limit:
        train = limit_split(train, cfg.limit, cfg.seed)
        test = limit_split(test, max(cfg.limit // 5, 1), cfg.seed)
    if device.type == "cuda":  # the whole training split fits on any GPU: no copy per step
        train = Split(train.images.to(device), train.labels.to(device))
        torch.backends.cudnn.benchmark = True
    if len(train) < cfg.batch_size:
        raise ConfigError(f"{len(train)} training images are fewer than one batch of {cfg.batch_size}")
    return train, val, test, data.fingerprint


# ---------------------------------------------------------------- what a checkpoint records


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _git(*args: str) -> subprocess.CompletedProcess[str]:
    root = Path(__file__).resolve().parent.parent
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=5)


def code_version() -> str:
    """$CIFAR10_CODE_VERSION when set (for a copy of the tree whose .git is missing or stale, such
    as one sent to a lent GPU machine), else the git commit (-dirty with uncommitted changes),
    else the installed package version."""
    if os.environ.get("CIFAR10_CODE_VERSION"):
        return os.environ["CIFAR10_CODE_VERSION"]
    try:
        head = _git("rev-parse", "--short", "HEAD")
        head.check_returncode()
        dirty = _git("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
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


def read_state(last_path: Path, fmt: str) -> dict:
    """The resumable state saved at `last_path`, refused unless written in format `fmt`."""
    if not last_path.is_file():
        raise DataError(f"--resume: {last_path} does not exist; start a run without --resume")
    state = torch.load(last_path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != fmt:
        raise DataError(f"--resume: {last_path} is not a {fmt} state written by this module")
    return state


# ---------------------------------------------------------------- the epoch loop


@dataclass
class Epoch:
    """What train_one_epoch hands the loop: where the epoch ended and this rank's sums."""

    epoch: int  # its index (0 for the first)
    batch: int  # batches of it run so far
    batches: int  # batches in a whole epoch
    stopped: bool  # a signal ended it early: save and stop
    seconds: float  # of training in this call
    loss_sum: float
    correct: float
    seen: float  # images
    images: float = 0.0  # images of all ranks in this call


class EpochLoop(ABC):
    """The loop both trainers run: train an epoch; when a signal stopped it, save last.pt and stop
    (KeyboardInterrupt); else evaluate it, save last.pt and report it; after the last epoch,
    finish and leave the process group.

    train_one_epoch polls the StopFlag through any_rank() between steps, so every rank leaves the
    epoch at the same step and none is left blocked in a gradient all-reduce."""

    rt: Runtime
    last_path: Path  # <out>/last.pt

    @abstractmethod
    def epochs_left(self) -> bool: ...

    @abstractmethod
    def train_one_epoch(self, stop: StopFlag) -> Epoch: ...

    @abstractmethod
    def evaluate(self, done: Epoch) -> None:
        """Validate the epoch just finished, record it and move on to the next."""

    @abstractmethod
    def state(self) -> Mapping[str, Any]:
        """last.pt: everything --resume needs."""

    @abstractmethod
    def report(self) -> None:
        """Rank 0, once last.pt holds the epoch: log it and write what is written every epoch."""

    @abstractmethod
    def finish(self) -> dict[str, Any]:
        """After the last epoch, on every rank: rank 0 writes the final files; the run's result."""

    def save(self) -> None:
        if self.rt.rank == 0:
            atomic_torch_save(self.state(), self.last_path)

    def run(self) -> dict[str, Any]:
        stop = StopFlag()
        stop.install()
        while self.epochs_left():
            done = self.train_one_epoch(stop)
            if done.stopped:  # mid-epoch: keep its sums, validate nothing
                self.save()
                if self.rt.rank == 0:
                    log.warning("saved %s at epoch %d, batch %d/%d; continue with --resume",
                                self.last_path, done.epoch + 1, done.batch, done.batches)  # fmt: skip
                raise KeyboardInterrupt
            self.evaluate(done)
            self.save()
            if self.rt.rank == 0:
                self.report()
        result = self.finish()
        end_distributed()
        return result
