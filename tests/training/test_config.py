"""The training recipe and its command line, in this process: what a run would be given."""

import dataclasses

import pytest
import torch

import training.runtime
from app.model import FinalModel
from training.config import (
    DRY_RUN,
    RESUME_OVERRIDES,
    ConfigError,
    TrainConfig,
    build_parser,
    config_from_args,
    resumed_config,
)
from training.train import Best, Progress, progress_from, train_state

from .conftest import BEST_KEYS, TRAIN_STATE_KEYS


def parse(*argv: str) -> tuple[TrainConfig, bool, dict]:
    return config_from_args(build_parser().parse_args(list(argv)))


def test_every_field_is_a_flag_with_its_help_and_default():
    help_text = " ".join(build_parser().format_help().split())  # unwrapped
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata["help"], f.name
        flag = "--" + f.name.replace("_", "-")
        assert flag in help_text
        if not isinstance(f.default, bool):
            assert f"{f.metadata['help']} (default: {f.default})" in help_text, flag


def test_zero_valued_flags_are_not_replaced_by_defaults():
    """Until the zero-flag fix, --dropout 0 or --cutout 0 silently fell back to the defaults."""
    zeros = ("dropout", "cutout", "translate", "label_smoothing", "weight_decay", "lr")
    cfg, resume, given = parse(*(arg for name in zeros for arg in ("--" + name.replace("_", "-"), "0")))
    assert {k: getattr(cfg, k) for k in zeros} == dict.fromkeys(zeros, 0)
    assert set(given) == set(zeros) and not resume
    assert cfg.epochs == TrainConfig().epochs  # what was not given keeps its default


def test_flags_take_their_field_types_and_choices():
    cfg, _, _ = parse("--epochs", "3", "--kd-weight", "0.5", "--model", "lite", "--dry-run")
    assert (cfg.epochs, cfg.kd_weight, cfg.model, cfg.dry_run) == (3, 0.5, "lite", True)
    with pytest.raises(SystemExit):
        parse("--model", "huge")
    with pytest.raises(SystemExit):
        parse("--epochs", "1.5")


def test_dry_run_is_tiny_unless_told_otherwise():
    cfg, _, _ = parse("--dry-run")
    assert {k: getattr(cfg, k) for k in DRY_RUN} == DRY_RUN
    cfg, _, _ = parse("--dry-run", "--out", "elsewhere", "--epochs", "2")
    assert (cfg.out, cfg.epochs, cfg.limit) == ("elsewhere", 2, DRY_RUN["limit"])


def test_resume_takes_only_where_it_runs_from_the_command_line():
    with pytest.raises(ConfigError, match="--epochs, --lr cannot change"):
        parse("--resume", "--epochs", "30", "--lr", "0.1")
    _, resume, given = parse("--resume", "--threads", "1", "--device", "cpu")
    assert resume
    saved = dataclasses.asdict(TrainConfig(epochs=7, lr=0.3, threads=4, device="auto", out="old"))
    cfg = resumed_config(saved, "new", given)
    assert (cfg.epochs, cfg.lr, cfg.threads, cfg.device, cfg.out) == (7, 0.3, 1, "cpu", "new")
    # a recipe key can never slip through as an override
    assert resumed_config(saved, "new", {"epochs": 99}).epochs == 7
    assert "epochs" not in RESUME_OVERRIDES


def test_threads_come_from_the_cpu_affinity(monkeypatch):
    """0 threads: the cores this process may run on (as the service counts them), shared among
    the local DDP processes."""
    threads = torch.get_num_threads()
    monkeypatch.setattr(training.runtime, "available_cpus", lambda: 6)
    try:
        training.runtime.process_device("cpu", 0, world=2, local_world=2)
        assert torch.get_num_threads() == 3
        training.runtime.process_device("cpu", 0, world=1, local_world=1)
        assert torch.get_num_threads() == 6
        training.runtime.process_device("cpu", 2, world=1, local_world=1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_last_pt_keeps_its_layout_and_reads_back():
    """train_state() writes the keys older runs wrote; progress_from() reads them back as they were."""
    model = FinalModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=10)
    best = Best(0.5, 2, 0.4, {k: v.clone() for k, v in model.state_dict().items()})
    progress = Progress(epoch=2, batch=3, sums=(1.5, 7, 60), elapsed=12.5, history=[{"epoch": 1}], best=best)
    cfg = TrainConfig(epochs=5)
    state = train_state(cfg, progress, model, optimizer, scheduler, None, "f" * 64, None, None)
    assert set(state) == TRAIN_STATE_KEYS and set(state["best"]) == BEST_KEYS
    assert (state["teacher"], state["ema"], state["init"]) == ({}, {}, None)
    assert state["config"]["epochs"] == 5 and state["sums"] == [1.5, 7, 60]
    back = progress_from(state)
    assert (back.epoch, back.batch, back.sums, back.elapsed) == (2, 3, (1.5, 7, 60), 12.5)
    assert back.history == [{"epoch": 1}]
    assert (back.best.val_acc, back.best.epoch, back.best.train_acc) == (0.5, 2, 0.4)
    assert back.best.weights == "raw"
    # a state saved before the raw weights could be chosen: with --ema, its best was the average
    del state["best"]["weights"]
    assert progress_from(state).best.weights == "raw"
    state["ema"] = {"n_averaged": torch.tensor(1)}
    assert progress_from(state).best.weights == "average"
    # before the first epoch ends (a Ctrl-C in epoch 1), there are no best weights yet
    empty = progress_from(train_state(cfg, Progress(), model, optimizer, scheduler, None, "", None, None))
    assert empty.best == Best() and empty.best.state_dict is None
