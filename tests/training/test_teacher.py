"""The airbench recipe of `python -m training.teacher`: its ingredients, one by one, and the old
teacher format still loading."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from app.model import CLASSES, MEAN, STD, AirbenchNet
from app.preprocess import normalize
from training.teacher import (
    LEGACY_FORMAT,
    Lookahead,
    TeacherConfig,
    config_from,
    flip_bits,
    identity_init,
    load_teacher,
    lr_at,
    multi_crop_logits,
    whiten_init,
)

from ..tiny import smooth_images
from .conftest import REPO, SUBPROCESS_TIMEOUT, signal_one_torchrun_worker


def test_the_whitening_conv_decorrelates_the_patches_it_was_fitted_on():
    images = normalize(smooth_images(64, low=8))
    model = AirbenchNet((8, 8, 8))
    whiten_init(model.whitening, images)
    out = model.whitening(images)[:, :12]  # the 12 filters; the other 12 are their negatives
    flat = out.permute(0, 2, 3, 1).reshape(-1, 12).double()
    covariance = flat.T @ flat / len(flat)
    # unit variance along each direction, none between them (eps keeps the weakest slightly under 1)
    assert torch.allclose(covariance, torch.diag(torch.diagonal(covariance)), atol=0.02)
    assert (torch.diagonal(covariance)[:6] - 1).abs().max() < 0.02
    assert torch.equal(model.whitening(images)[:, 12:], -model.whitening(images)[:, :12])


def test_identity_init_passes_the_input_through_each_conv():
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    identity_init(conv)
    x = torch.randn(2, 4, 5, 5)
    assert torch.equal(conv(x)[:, :4], x)


def test_the_learning_rate_is_a_triangle_from_start_to_peak_to_end():
    cfg = TeacherConfig(lr=2.0, warmup=0.25, lr_start=0.2, lr_end=0.1)
    total = 100
    assert lr_at(0, total, cfg) == 0.4
    assert lr_at(25, total, cfg) == 2.0
    assert abs(lr_at(100, total, cfg) - 0.2) < 1e-12
    rates = [lr_at(s, total, cfg) for s in range(total + 1)]
    assert rates.index(max(rates)) == 25
    assert all(a <= b for a, b in zip(rates[:25], rates[1:26], strict=True))
    assert all(a >= b for a, b in zip(rates[25:], rates[26:], strict=False))


def test_alternating_flips_mirror_each_image_in_every_other_epoch():
    g = torch.Generator().manual_seed(0)
    e0, e1, e2 = (flip_bits(1000, 3, epoch, True, g) for epoch in range(3))
    assert torch.equal(e0, ~e1) and torch.equal(e0, e2)
    assert 400 < int(e0.sum()) < 600
    random0, random1 = flip_bits(1000, 3, 0, False, g), flip_bits(1000, 3, 1, False, g)
    assert 400 < int((random0 == random1).sum()) < 600  # independent coins


def test_multi_crop_tta_averages_the_mirror_and_two_one_pixel_shifts():
    class Probe(nn.Module):  # "logits": the first pixel's value and the image's left-right asymmetry
        def forward(self, x):
            return torch.stack([x[:, 0, 0, 0], (x[..., :16] - x[..., 16:]).sum((1, 2, 3))], 1)

    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(multi_crop_logits(Probe(), x, 0), Probe()(x))
    mirrored = multi_crop_logits(Probe(), x, 1)
    assert torch.allclose(mirrored[:, 1], torch.zeros(3), atol=1e-4)  # the asymmetry cancels
    level2 = multi_crop_logits(Probe(), x, 2)
    assert not torch.allclose(level2[:, 0], mirrored[:, 0])  # shifted views move the first pixel


def test_lookahead_ends_on_its_running_average():
    model = nn.Linear(2, 2)
    lookahead = Lookahead(model)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    lookahead.update(step=90, total=100)  # a strong pull back towards the start
    assert (model.weight - start).abs().max() < 1.0
    assert torch.equal(model.weight, lookahead.average["weight"])
    with torch.no_grad():
        model.weight.add_(5.0)
    lookahead.finish()
    assert torch.equal(model.weight, lookahead.average["weight"])


def test_presets_set_the_shape_and_flags_given_win():
    cfg = config_from({"preset": "airbench96"})
    assert (cfg.widths, cfg.depth, cfg.epochs, cfg.translate, cfg.cutout) == ("128,384,512", 3, 37.0, 4, 12)
    assert config_from({"preset": "airbench96", "epochs": 50.0, "cutout": 8}).cutout == 8
    default = config_from({})
    assert (default.widths, default.depth, default.epochs, default.lookahead) == ("64,256,256", 2, 9.9, True)
    ab95 = config_from({"preset": "airbench95"})  # airbench95's decoupled lr 10 and wd 0.0153
    assert (ab95.widths, ab95.depth, ab95.epochs, ab95.translate) == ("128,384,384", 2, 15.0, 2)
    assert ab95.lr == pytest.approx(10.0 / 7.6667) and ab95.weight_decay * 10.0 == pytest.approx(0.0153)


def legacy_teacher() -> nn.Module:
    """The teacher network as it was before AirbenchNet (TeacherNet, 1,978,016 parameters)."""

    def group(c_in: int, c_out: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.MaxPool2d(2),
            nn.BatchNorm2d(c_out), nn.GELU(),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.GELU(),
        )  # fmt: skip

    class TeacherNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(
                nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.GELU()
            )
            self.groups = nn.Sequential(group(32, 64), group(64, 256), group(256, 256))
            self.fc = nn.Linear(256, 10, bias=False)

        def forward(self, x):
            return self.fc(torch.amax(self.groups(self.stem(x)), dim=(2, 3))) / 8

    torch.manual_seed(0)
    model = TeacherNet()
    model.train()
    model(normalize(smooth_images(32, low=8)))  # BatchNorm statistics of its own
    return model.eval()


def test_a_teacher_written_before_airbenchnet_loads_with_the_same_logits(tmp_path):
    old = legacy_teacher()
    path = tmp_path / "teacher.pt"
    torch.save(
        {
            "format": LEGACY_FORMAT,
            "widths": [32, 64, 256, 256],
            "classes": list(CLASSES),
            "mean": list(MEAN),
            "std": list(STD),
            "metrics": {"val_acc": 0.5},
            "state_dict": old.state_dict(),
        },
        path,
    )
    model, meta = load_teacher(path)
    x = normalize(smooth_images(8, seed=1, low=8))
    with torch.no_grad():
        assert torch.allclose(model(x), old(x), atol=1e-6)
    assert meta["widths"] == [32, 64, 256, 256] and len(meta["sha256"]) == 64


@pytest.mark.slow
def test_a_signal_that_reaches_one_torchrun_teacher_worker_stops_both_saves_and_resumes(tiny_data, tmp_path):
    """The teacher's ranks agree on the step to stop at, as the student's do: a rank that stopped
    alone would leave the other blocked in the gradient all-reduce until torchrun killed both."""
    out = tmp_path / "teacher"
    args = ["--data", str(tiny_data), "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    args += [
        "--epochs",
        "300",
        "--val-size",
        "20",
        "--batch-size",
        "20",
        "--widths",
        "8,16,16",
        "--device",
        "cpu",
    ]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "training.teacher"]
    stderr = signal_one_torchrun_worker([*torchrun, *args], out)
    assert "continue with --resume" in stderr, stderr[-3000:]
    state = torch.load(out / "last.pt", weights_only=True)
    assert 1 <= state["epoch"] < 300
    resumed = subprocess.run(
        [sys.executable, "-m", "training.teacher", "--resume", "--out", str(out), "--threads", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(1, 301))
    _, meta = load_teacher(out / "teacher.pt")  # written once, by the resumed run's end
    assert meta["epoch"] == 300 and 0.0 <= meta["metrics"]["val_acc"] <= 1.0
