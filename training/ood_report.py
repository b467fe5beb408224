"""How well each served model's unsure flag tells CIFAR-10 from pictures that are not CIFAR-10.

    python -m training.ood_report --data path/to/cifar10-jpeg.tar.gz \\
        weights/final_model.pt weights/lite_model.pt weights/best_model.pt

For each checkpoint and each set of `training.ood_sets`: the share flagged unsure at the model's
own threshold (fitted on validation), and, against the CIFAR-10 test split (JPEG q75) as the
in-distribution side, AUROC and FPR95 (the share of the set still accepted at the score that
accepts 95% of the test images) of its score, and of the maximum softmax probability and the
energy score (Liu et al. 2020) for comparison. Prints one markdown table per model.
"""

from __future__ import annotations

import argparse
import sys

import torch

from app.calibration import Calibration
from app.checkpoint import CheckpointError, build_model, load_checkpoint
from app.predictor import TorchPredictor, forward_all
from training.data import DataError, load_cifar10
from training.ood_sets import ood_sets


def auroc(inside: torch.Tensor, outside: torch.Tensor) -> float:
    """P(score of an outside image > score of an inside one), ties counted half (Mann-Whitney U)."""
    scores = torch.cat([inside, outside]).double()
    ranks = torch.empty_like(scores)
    order = scores.argsort()
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.double)
    for value in scores.unique()[scores.unique(return_counts=True)[1] > 1]:  # average tied ranks
        tied = scores == value
        ranks[tied] = ranks[tied].mean()
    n_in, n_out = len(inside), len(outside)
    return float((ranks[n_in:].sum() - n_out * (n_out + 1) / 2) / (n_in * n_out))


def fpr95(inside: torch.Tensor, outside: torch.Tensor) -> float:
    """The share of outside images scored at or under the score that keeps 95% of inside ones."""
    return float((outside <= torch.quantile(inside.double(), 0.95)).double().mean())


def scores(
    predictor: TorchPredictor, calibration: Calibration, images: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Out-of-distribution scores (higher: stranger) of the model's detector and the two baselines."""
    out = forward_all(predictor, images, stats=True)
    logits = out.logits / calibration.temperature
    assert calibration.detector is not None and out.stats is not None
    return {
        "detector": calibration.detector.score(out.stats),
        "max softmax": -torch.softmax(logits, 1).max(1).values,
        "energy": -torch.logsumexp(logits, 1),
    }


def report(weights: str, test: torch.Tensor, sets: dict[str, torch.Tensor]) -> str:
    ckpt = load_checkpoint(weights)
    calibration = Calibration.from_meta(ckpt.meta)
    if calibration.detector is None:
        raise CheckpointError(f"{weights} has no unsure detector; run python -m training.calibrate on it")
    predictor = TorchPredictor(build_model(ckpt), torch.device("cpu"))
    inside = scores(predictor, calibration, test)
    threshold = calibration.detector.threshold
    rows = [
        f"**{ckpt.meta.get('model')}** (`{weights}`): CIFAR-10 test (JPEG q75) flagged unsure: "
        f"{100 * float((inside['detector'] > threshold).double().mean()):.1f}%",
        "",
        "| set | images | flagged unsure | AUROC | FPR95 | max softmax AUROC / FPR95 "
        "| energy AUROC / FPR95 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, images in sets.items():
        outside = scores(predictor, calibration, images)
        flagged = float((outside["detector"] > threshold).double().mean())
        cells = [f"{100 * auroc(inside[k], outside[k]):.1f} / {100 * fpr95(inside[k], outside[k]):.1f}%"
                 for k in ("max softmax", "energy")]  # fmt: skip
        rows.append(
            f"| {name} | {len(images):,} | {100 * flagged:.1f}% | "
            f"{100 * auroc(inside['detector'], outside['detector']):.1f} | "
            f"{100 * fpr95(inside['detector'], outside['detector']):.1f}% | {cells[0]} | {cells[1]} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.ood_report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("weights", nargs="+", help="calibrated checkpoints (python -m training.calibrate)")
    p.add_argument("--data", required=True, help="CIFAR-10 as in python -m training (its test split is used)")
    p.add_argument(
        "--cache-dir",
        default=None,
        help="where decoded data is cached (default: $XDG_CACHE_HOME/cifar10-cnn, else ~/.cache/cifar10-cnn)",
    )
    p.add_argument("--images", type=int, default=2000, help="images per set")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    try:
        test = load_cifar10(args.data, args.cache_dir).test.images
        sets = ood_sets(test, args.images)
        for weights in args.weights:
            print(report(weights, test, sets), end="\n\n", flush=True)
    except (CheckpointError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
