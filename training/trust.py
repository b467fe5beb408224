"""How far a served model's answers can be trusted, measured on the test split by
`python -m training.evaluate`: calibration error before and after the temperature, the share of
test images flagged unsure, and whether the heatmaps point at what the label depends on.

The deletion check (after Petsiuk et al. 2018's deletion metric): blank the quarter of the pixels
a heatmap ranks highest (set them to the data set's mean colour, what normalisation maps to 0)
and, separately, the quarter it ranks lowest; a heatmap that shows where the evidence lies costs
the predicted class far more probability in the first case.
"""

from __future__ import annotations

from pathlib import Path

import torch

from app.calibration import Calibration, expected_calibration_error, reliability_bins
from app.model import MEAN, StagedNet
from app.predictor import Predictor, answer

DELETE_SHARE = 0.25


def calibration_report(
    calibration: Calibration, labels: torch.Tensor, logits: torch.Tensor, stats: torch.Tensor | None
) -> dict:
    """ECE (15 bins) of softmax(logits) and of the calibrated probabilities, mean confidence and
    accuracy, and the unsure share (from the stage statistics of the same forward pass, when the
    model has a detector)."""
    raw, calibrated = torch.softmax(logits, 1), calibration.probabilities(logits)
    report = {
        "temperature": calibration.temperature,
        "ece_before": expected_calibration_error(raw, labels),
        "ece_after": expected_calibration_error(calibrated, labels),
        "confidence_before": float(raw.max(1).values.mean()),
        "confidence_after": float(calibrated.max(1).values.mean()),
        "accuracy": float((logits.argmax(1) == labels).float().mean()),
    }
    if calibration.detector is not None and stats is not None:
        flagged = calibration.detector.score(stats) > calibration.detector.threshold
        report["unsure_share"] = float(flagged.float().mean())
    return report


def delete_pixels(
    images: torch.Tensor, ranking: torch.Tensor, top: bool, share: float = DELETE_SHARE
) -> torch.Tensor:
    """uint8 images (N, 3, 32, 32) with the `share` of pixels that `ranking` (N, 32, 32) ranks
    highest (top) or lowest set to the mean colour."""
    n = ranking[0].numel()
    order = ranking.flatten(1).argsort(1, descending=top)[:, : round(share * n)]
    mask = (
        torch.zeros(len(images), n, dtype=torch.bool).scatter_(1, order, True).view(-1, 1, *ranking.shape[1:])
    )
    mean = (torch.tensor(MEAN) * 255).round().to(torch.uint8).view(1, 3, 1, 1)
    return torch.where(mask, mean, images)


def deletion_check(
    predictor: Predictor,
    model: StagedNet,
    calibration: Calibration,
    images: torch.Tensor,
    batch_size: int = 100,
) -> dict:
    """Mean drop of the predicted class's probability when the heatmap's top and bottom quarter
    of pixels are deleted."""
    drops: dict[str, list[torch.Tensor]] = {"top": [], "bottom": []}
    for s in range(0, len(images), batch_size):
        x = images[s : s + batch_size]
        first = answer(predictor, model, calibration, x, explain=True)
        assert first.heatmaps is not None
        label = first.probabilities.argmax(1, keepdim=True)
        before = first.probabilities.gather(1, label)
        for which in drops:
            after = answer(predictor, model, calibration, delete_pixels(x, first.heatmaps, which == "top"))
            drops[which].append((before - after.probabilities.gather(1, label)).flatten())
    return {
        "images": len(images),
        "method": model.cam_method,
        "drop_top": float(torch.cat(drops["top"]).mean()),
        "drop_bottom": float(torch.cat(drops["bottom"]).mean()),
    }


def plot_reliability(
    labels: torch.Tensor, before: torch.Tensor, after: torch.Tensor, path: Path, bins: int = 15
) -> None:
    """The reliability diagram: accuracy against confidence per bin, before and after calibration."""
    from training.plots import plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), sharey=True)
    centres = [float(c) for c in (torch.arange(bins) + 0.5) / bins]
    for ax, probs, title in zip(axes, (before, after), ("softmax (T = 1)", "calibrated"), strict=True):
        accuracy = [acc for _, acc, _ in reliability_bins(probs, labels, bins)]
        ax.bar(centres, accuracy, width=1 / bins, edgecolor="black", alpha=0.8, label="accuracy")
        ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
        ece = expected_calibration_error(probs, labels)
        ax.set(title=f"{title}: ECE {100 * ece:.2f}%", xlabel="confidence", xlim=(0, 1), ylim=(0, 1))
        ax.legend(loc="upper left")
    axes[0].set_ylabel("accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
