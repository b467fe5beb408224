"""Pictures a person would rather look at than read: curves, confusion matrix, misclassified images."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from app.model import CLASSES  # noqa: E402


def accuracy_series(history: list[dict]) -> dict[str, list[float]]:
    """The accuracy curves (percent) by legend label. A run with a weight average (`--ema`) has
    validated both the average and the raw weights every epoch: both are drawn."""
    series = {"train (augmented)": [100 * h["train_acc"] for h in history]}
    if any("val_acc_raw" in h for h in history):
        series["validation (weight average)"] = [100 * h["val_acc"] for h in history]
        series["validation (raw weights)"] = [100 * h.get("val_acc_raw", float("nan")) for h in history]
    else:
        series["validation"] = [100 * h["val_acc"] for h in history]
    return series


def plot_curves(history: list[dict], path: Path) -> None:
    """Loss, accuracy and (where the history records it) learning rate per epoch; a teacher's
    history (python -m training.teacher) has no validation loss or learning rate."""
    epochs = [h["epoch"] for h in history]
    with_lr = all("lr" in h for h in history)
    fig, axes = plt.subplots(1, 3 if with_lr else 2, figsize=(15 if with_lr else 10, 4))
    ax_loss, ax_acc = axes[0], axes[1]
    ax_loss.plot(epochs, [h["train_loss"] for h in history], label="train (the training objective)")
    if all("val_loss" in h for h in history):
        ax_loss.plot(epochs, [h["val_loss"] for h in history], label="validation (cross-entropy)")
    ax_loss.set(title="Loss", xlabel="epoch")
    for label, values in accuracy_series(history).items():
        ax_acc.plot(epochs, values, label=label)
    ax_acc.set(title="Accuracy (%)", xlabel="epoch")
    if with_lr:
        axes[2].plot(epochs, [h["lr"] for h in history])
        axes[2].set(title="Learning rate at epoch end", xlabel="epoch")
    for ax in (ax_loss, ax_acc):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion(confusion: torch.Tensor, path: Path, title: str = "Confusion matrix") -> None:
    """confusion[true, predicted] counts, shown as row-normalised percentages."""
    rates = confusion.float() / confusion.sum(1, keepdim=True).clamp(min=1) * 100
    fig, ax = plt.subplots(figsize=(8, 7))
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=100)
    ax.set_xticks(range(len(CLASSES)), CLASSES, rotation=45, ha="right")
    ax.set_yticks(range(len(CLASSES)), CLASSES)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    for i in range(len(CLASSES)):
        for j in range(len(CLASSES)):
            value = rates[i, j].item()
            ax.text(
                j,
                i,
                f"{value:.0f}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if value > 50 else "black",
            )
    fig.colorbar(im, ax=ax, fraction=0.046, label="% of true class")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_misclassified(
    images: torch.Tensor, true: torch.Tensor, pred: torch.Tensor, path: Path, count: int = 25
) -> None:
    """A grid of misclassified uint8 (N, 3, 32, 32) images labelled predicted / true."""
    wrong = (pred != true).nonzero().flatten()
    # A seeded sample, not the first few: the test split is sorted by class.
    wrong = wrong[torch.randperm(len(wrong), generator=torch.Generator().manual_seed(0))[:count]]
    cols = 5
    rows = max(1, (len(wrong) + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong.tolist(), strict=False):
        ax.imshow(images[i].permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(f"pred: {CLASSES[pred[i]]}\ntrue: {CLASSES[true[i]]}", fontsize=9)
    fig.suptitle("Incorrect predictions")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
