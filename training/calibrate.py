"""Fit a checkpoint's temperature and unsure detector on its own validation split, and record them.

    python -m training.calibrate --weights weights/final_model.pt --data path/to/cifar10-jpeg.tar.gz

`python -m training` and `python -m training.teacher` run this at the end of every run; this
command does it for an existing checkpoint (rewritten in place, atomically, unless --out names
another file). The split is the checkpoint's own (its --val-size and --seed), so the images were
never trained on; the test split is never read. `app.calibration` says what is fitted and how the
service applies it; `python -m training.evaluate` reports the calibration error on the test split.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from app.calibration import KEEP, Detector, expected_calibration_error
from app.checkpoint import CheckpointError, atomic_torch_save, build_model, load_checkpoint
from app.device import DEVICE_CHOICES, resolve_device
from app.model import StagedNet
from app.predictor import TorchPredictor
from app.predictor import forward_all as forward_predictor
from training.data import DataError, Split, limit_index, limit_split, load_cifar10, split_validation

log = logging.getLogger("training.calibrate")

FIT_IMAGES = 20_000  # training images whose stage statistics fit the detector's Gaussians
SHRINK = 1e-3  # covariance + SHRINK * its mean variance * I: a stable inverse for the wide stages


def forward_all(
    model: StagedNet, images: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N, 10), stage statistics (N, D)) in float32 on the CPU: the service's PyTorch fp32
    forward pass (`TorchPredictor`), as evaluation reports it."""
    out = forward_predictor(TorchPredictor(model.to(device), device), images, stats=True)
    assert out.stats is not None
    return out.logits, out.stats


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T > 0 minimising the mean NLL of softmax(logits / T) (Guo et al. 2017)."""
    log_t = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    # a network no better than chance would drive T to infinity: keep it in a readable range
    return log_t.detach().clamp(-3, 5).exp().item()


def fit_detector(fit: torch.Tensor, val: torch.Tensor, sizes: list[int], keep: float = KEEP) -> Detector:
    """A Gaussian per stage over `fit`'s statistics; distances standardised on `val`, whose
    `keep` share stays under the threshold."""
    means, precisions = [], []
    for part in fit.double().split(sizes, 1):
        mean = part.mean(0)
        centred = part - mean
        covariance = centred.T @ centred / len(part)
        covariance += SHRINK * covariance.diagonal().mean() * torch.eye(len(mean), dtype=covariance.dtype)
        means.append(mean.float())
        precisions.append(torch.linalg.inv(covariance).float())
    draft = Detector(sizes, means, precisions, [0.0] * len(sizes), [1.0] * len(sizes), 0.0)
    distances = draft.distances(val)
    centre, spread = distances.mean(0).tolist(), distances.std(0).clamp(min=1e-12).tolist()
    scored = Detector(sizes, means, precisions, centre, spread, 0.0)
    threshold = float(torch.quantile(scored.score(val).double(), keep))
    return Detector(sizes, means, precisions, centre, spread, threshold)


def stage_sizes(model: StagedNet, device: torch.device) -> list[int]:
    """Each stage's share of `stage_statistics`."""
    with torch.no_grad():
        maps, _, _ = model.eval().to(device).forward_stages(torch.zeros(1, 3, 32, 32, device=device))
    return [2 * m.shape[1] for m in maps[:-1]] + [maps[-1].shape[1]]


def calibration_record(model: StagedNet, train: Split, val: Split, device: torch.device, seed: int) -> dict:
    """The checkpoint keys "calibration" and "ood" for `model`, fitted on `train` and `val`."""
    started = time.perf_counter()
    fit = limit_split(train, FIT_IMAGES, seed)
    _, fit_stats = forward_all(model, fit.images, device)
    val_logits, val_stats = forward_all(model, val.images, device)
    temperature = fit_temperature(val_logits, val.labels)
    before, after = torch.softmax(val_logits, 1), torch.softmax(val_logits / temperature, 1)
    detector = fit_detector(fit_stats, val_stats, stage_sizes(model, device))
    kept = float((detector.score(val_stats) <= detector.threshold).float().mean())
    when = datetime.now(UTC).isoformat(timespec="seconds")
    calibration: dict[str, Any] = {
        "temperature": temperature,
        "fitted_on": f"validation split ({len(val):,} held-out training images)",
        "val_nll": [F.nll_loss(before.log(), val.labels).item(), F.nll_loss(after.log(), val.labels).item()],
        "val_ece": [
            expected_calibration_error(before, val.labels),
            expected_calibration_error(after, val.labels),
        ],
        "created_at": when,
    }
    ood = detector.to_meta(
        fitted_on=f"{len(fit):,} training images; standardised and thresholded on the "
        f"{len(val):,} validation images",
        keep=KEEP,
        val_kept=kept,
        created_at=when,
    )
    log.info(
        "calibration: temperature %.3f (validation ECE %.2f%% -> %.2f%%); unsure threshold %.2f keeps "
        "%.1f%% of validation images; %.0f s",
        temperature, 100 * calibration["val_ece"][0], 100 * calibration["val_ece"][1], detector.threshold,
        100 * kept, time.perf_counter() - started,
    )  # fmt: skip
    return {"calibration": calibration, "ood": ood}


def calibrate_file(
    path: Path, train: Split, val: Split, device: torch.device, seed: int, out: Path | None = None
) -> dict:
    """Fit and record the calibration of the checkpoint at `path` (into `out`, default in place)."""
    ckpt = load_checkpoint(path)
    if ckpt.is_bare:
        raise CheckpointError(f"{path} is a bare state_dict: it records no validation split to calibrate on")
    record = calibration_record(build_model(ckpt), train, val, device, seed)
    atomic_torch_save({**ckpt.meta, **record, "state_dict": ckpt.state_dict}, out or path)
    return record


def splits_of(meta: dict[str, Any], data: str, cache_dir: str | None) -> tuple[Split, Split]:
    """The training and validation splits a checkpoint was trained on (its seed, sizes, limit)."""
    config = meta.get("config", {})
    seed, val_size = (
        meta.get("seed", config.get("seed", 0)),
        meta.get("val_size", config.get("val_size", 5000)),
    )
    loaded = load_cifar10(data, cache_dir)
    if meta.get("data_fingerprint") not in (None, loaded.fingerprint):
        raise DataError(f"{data} is not the data the checkpoint was trained on (its fingerprint differs)")
    train, val = split_validation(loaded.train, val_size, seed)
    limit = config.get("limit", 0)
    if limit:
        train = train.subset(limit_index(len(train), limit, seed))
    return train, val


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    p = argparse.ArgumentParser(prog="python -m training.calibrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument(
        "--weights", required=True, help="the checkpoint to calibrate (ours, not a bare state_dict)"
    )
    p.add_argument("--data", required=True, help="the data it was trained on, as in python -m training")
    p.add_argument(
        "--cache-dir",
        default=None,
        help="where decoded data is cached (default: $XDG_CACHE_HOME/cifar10-cnn, else ~/.cache/cifar10-cnn)",
    )
    p.add_argument("--out", default=None, help="write the calibrated checkpoint here (default: in place)")
    p.add_argument(
        "--device", default="auto", choices=DEVICE_CHOICES, help="auto picks cuda, then mps, then cpu"
    )
    args = p.parse_args(argv)
    try:
        ckpt = load_checkpoint(args.weights)
        if ckpt.is_bare:
            raise CheckpointError(f"{args.weights} is a bare state_dict: it records no validation split")
        meta = ckpt.meta
        train, val = splits_of(meta, args.data, args.cache_dir)
        seed = meta.get("seed", meta.get("config", {}).get("seed", 0))
        out = Path(args.out) if args.out else None
        record = calibrate_file(Path(args.weights), train, val, resolve_device(args.device), seed, out)
    except (CheckpointError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    c = record["calibration"]
    print(
        f"temperature {c['temperature']:.3f}: validation ECE {100 * c['val_ece'][0]:.2f}% -> "
        f"{100 * c['val_ece'][1]:.2f}%; unsure threshold {record['ood']['threshold']:.3f} "
        f"(keeps {100 * record['ood']['val_kept']:.1f}% of validation images); wrote {out or args.weights}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
