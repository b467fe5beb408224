"""The training recipe (`TrainConfig`) and its command line: one flag per field, its help beside it.

    cfg, resume, given = config_from_args(build_parser().parse_args(argv))

Mistakes on the command line are `ConfigError`s (or argparse's own errors); a data source that
cannot be read is a `training.data.DataError`. Both end `python -m training` with exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from dataclasses import dataclass, field
from typing import Any

from app.device import DEVICE_CHOICES
from app.model import MODEL_KEYS

SWITCH = ("auto", "on", "off")
BN_IMAGES = 5000  # training images that recompute the weight average's BatchNorm statistics


class ConfigError(Exception):
    """Flags that do not fit together (or do not fit the run being resumed); one sentence."""


def option(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A config field with its flag's help text (and its choices) beside it."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    data: str = option(
        "cifar10",
        "'cifar10' (torchvision download) or an ImageFolder directory / .tar.gz with train/ and test/",
    )
    model: str = option(
        "final",
        "final: FinalModel (149,584 parameters), written as final_model.pt; "
        "lite: LiteModel (47,648), written as lite_model.pt",
        choices=tuple(MODEL_KEYS),
    )
    cache_dir: str = option(
        "", "where decoded data is cached (default: $XDG_CACHE_HOME/cifar10-cnn, else ~/.cache/cifar10-cnn)"
    )
    out: str = option(
        "weights", "folder for final_model.pt (lite_model.pt), last.pt, history.json and the pictures"
    )
    epochs: int = option(96, "number of epochs (the OneCycle schedule spans all of them)")
    batch_size: int = option(256, "global batch size; each of N DDP ranks takes batch_size / N")
    lr: float = option(0.2, "peak learning rate of the OneCycle schedule")
    pct_start: float = option(0.25, "fraction of the steps spent warming up to the peak")
    momentum: float = option(0.9, "Nesterov momentum")
    weight_decay: float = option(1e-3, "L2 weight decay")
    label_smoothing: float = option(0.1, "label smoothing of the cross-entropy loss")
    # the original table's rate is 0.05: this small model under-fits, so the default is none
    dropout: float = option(0.0, "dropout rate after each conv unit (the original table's Dropout rows)")
    translate: int = option(4, "maximum random shift in pixels (reflect padding)")
    cutout: int = option(8, "side of the random square set to the mean colour; 0 turns cutout off")
    val_size: int = option(5000, "training images held out for model selection")
    seed: int = option(0, "seed of the split, data order, augmentation and initialisation")
    limit: int = option(0, "train on at most this many images, and test on a fifth as many (0: all)")
    device: str = option("auto", "auto picks cuda, then mps, then cpu", choices=DEVICE_CHOICES)
    amp: str = option(
        "auto", "bf16 autocast: auto uses it on CUDA and on CPUs with native bf16", choices=SWITCH
    )
    channels_last: str = option("auto", "NHWC memory format: auto uses it on CUDA and CPU", choices=SWITCH)
    threads: int = option(0, "torch threads per process; 0 divides the cores among local processes")
    dry_run: bool = option(
        False,
        "the whole pipeline in seconds, on 512 training images for one epoch (its accuracy means "
        "nothing); writes to a new temporary folder unless --out is given",
    )
    init: str = option(
        "",
        "start from the weights of this final_model.pt (a further OneCycle on a finished run); "
        "it must come from the same data, validation split and seed",
    )
    teacher: str = option(
        "",
        "distil from this teacher.pt (python -m training.teacher): teacher and student see the same "
        "augmented batch; it must have been trained on this data, validation split and seed",
    )
    kd_weight: float = option(
        0.9,
        "weight of the distillation term (KL divergence at --kd-temperature, times T^2); "
        "the cross-entropy on the labels gets 1 - kd_weight",
    )
    kd_temperature: float = option(4.0, "softmax temperature of the distillation term")
    ema: float = option(
        0.0,
        "decay per step of an exponential moving average of the weights (e.g. 0.999); the average, "
        f"with BatchNorm statistics recomputed on {BN_IMAGES:,} training images, and the raw weights "
        "are validated every epoch and the better is kept; 0 turns it off",
    )
    mixup: float = option(
        0.0,
        "mixup alpha: each batch is blended with a shuffled copy, weight ~ Beta(alpha, alpha); "
        "0 turns it off",
    )


# What --resume may change: where the data and the run live and how the hardware is used. The
# recipe (epochs, schedule, augmentation, split...) is the saved run's own.
RESUME_OVERRIDES = ("out", "data", "cache_dir", "device", "amp", "channels_last", "threads", "teacher")

# --dry-run's settings, each overridden by a flag given beside it
DRY_RUN = {"epochs": 1, "limit": 512, "val_size": 64, "batch_size": 64}
DRY_RUN_SAYS = (
    "dry run: 512 training images for one epoch, then validation, the test split and calibration, "
    "end to end, into %s; its accuracy figures mean nothing by design"
)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """Every TrainConfig field as a flag whose default is None (not given), and --resume."""
    p = argparse.ArgumentParser(
        prog="python -m training",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for f in dataclasses.fields(TrainConfig):
        if isinstance(f.default, bool):
            p.add_argument(flag(f.name), action="store_true", help=f.metadata["help"])
            continue
        p.add_argument(
            flag(f.name),
            type=type(f.default),
            default=None,
            choices=f.metadata["choices"],
            help=f"{f.metadata['help']} (default: {f.default})",
        )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from <out>/last.pt with its saved recipe; only where it runs can change "
        "(--data, --cache-dir, --device, --amp, --channels-last, --threads, and --teacher's path, "
        "to the same file)",
    )
    return p


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, bool, dict[str, Any]]:
    """(config, resume, the settings given on the command line); ConfigError for a recipe flag
    given with --resume."""
    # `is not None`, not truthiness: --dropout 0 or --cutout 0 must count as given
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    given = {name: v for name, v in values.items() if v is not None and v is not False}
    if args.resume:
        fixed = [name for name in given if name not in RESUME_OVERRIDES]
        if fixed:
            raise ConfigError(
                f"--resume continues the saved run with its own recipe, so {', '.join(map(flag, fixed))} "
                f"cannot change; only {', '.join(map(flag, RESUME_OVERRIDES))} can"
            )
    if given.get("dry_run"):
        given = {**DRY_RUN, "out": tempfile.mkdtemp(prefix="cifar10-dry-run-"), **given}
    return TrainConfig(**given), args.resume, given


def resumed_config(saved: dict[str, Any], out: str, overrides: dict[str, Any]) -> TrainConfig:
    """The saved run's recipe, with only RESUME_OVERRIDES taken from this command line."""
    runtime = {k: v for k, v in overrides.items() if k in RESUME_OVERRIDES}
    return TrainConfig(**{**saved, "out": out, **runtime})
