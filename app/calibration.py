"""Confidence that means what it says, and an "unsure" flag: what `python -m training.calibrate`
records in a checkpoint, applied to every answer the predictor seam gives.

- **Temperature** (Guo et al. 2017): probabilities are softmax(logits / T), with the one T that
  minimises the negative log-likelihood of the validation split. The labels do not change.
- **Unsure**: out of distribution by the statistics of every stage of the network. For each
  stage, the per-channel mean and standard deviation over its map form a vector; its Mahalanobis
  distance to the training images' vectors (one Gaussian per stage, fitted on training images),
  standardised by the same distance's mean and spread on the validation split, is a z-score; the
  image's score is the largest of them. Noise, digits, text and scrambled pixels move the early
  stages' statistics far from any CIFAR-10 photo even where the classifier is confident, which
  is where the plain scores (maximum softmax, energy) fail (docs/results.md has the figures).
  The threshold keeps 95.5% of the validation images, so that, within sampling error, at least
  95% of new in-distribution images are not flagged.

A checkpoint without these (a bare state_dict, or one trained before them) is served with
temperature 1 and no unsure flag (`ood_score` and `unsure` null); the summary says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# The share of validation images the threshold keeps: 95% plus the one-sided 95% sampling margin
# of a 5,000-image split (1.645 * sqrt(0.95 * 0.05 / 5000) = 0.5 points).
KEEP = 0.955


def stage_statistics(maps: list[torch.Tensor], pooled: torch.Tensor) -> torch.Tensor:
    """Each stage's per-channel mean and standard deviation over its map, in float32; for the last
    stage, the pooled features its head computes anyway (its spread added cost, not detection):
    maps (N, C_s, h, w) but the last, and pooled (N, C_S) -> (N, 2 * C_1 + ... + 2 * C_{S-1} + C_S)."""
    parts = []
    for fmap in maps[:-1]:
        flat = fmap.float().flatten(2)
        mean = flat.mean(2)
        # E[x^2] - E[x]^2: two reductions where torch.std's export takes several passes
        parts += [mean, ((flat * flat).mean(2) - mean * mean).clamp(min=0).sqrt()]
    return torch.cat([*parts, pooled.float()], 1)


@dataclass(frozen=True)
class Detector:
    """One Gaussian per stage over `stage_statistics`; score = the largest standardised distance."""

    sizes: list[int]  # each stage's share of the statistics vector (2 * C_s; C_S for the last)
    means: list[torch.Tensor]  # (D_s,)
    precisions: list[torch.Tensor]  # (D_s, D_s): inverse covariance, shrunk towards its diagonal
    centre: list[float]  # each stage's mean distance on the validation split
    spread: list[float]  # and its standard deviation
    threshold: float  # scores above it are unsure

    def __post_init__(self) -> None:
        # The stages as one block-diagonal quadratic form, so a batch is scored in a few ops:
        # distances = ((x - mean) @ P * (x - mean)) @ stage_of, with stage_of (D, stages) 0/1.
        object.__setattr__(self, "_mean", torch.cat(self.means))
        object.__setattr__(self, "_precision", torch.block_diag(*self.precisions))
        stage_of = torch.block_diag(*(torch.ones(size, 1) for size in self.sizes))
        object.__setattr__(self, "_stage_of", stage_of)
        object.__setattr__(self, "_centre", torch.tensor(self.centre))
        object.__setattr__(self, "_spread", torch.tensor(self.spread))

    def distances(self, stats: torch.Tensor) -> torch.Tensor:
        """(N, D) statistics -> (N, stages) squared Mahalanobis distances."""
        d = stats - self._mean  # type: ignore[attr-defined]
        return (d @ self._precision * d) @ self._stage_of  # type: ignore[attr-defined]

    def score(self, stats: torch.Tensor) -> torch.Tensor:
        """(N, D) statistics -> (N,) scores; higher is further from the training images."""
        z = (self.distances(stats) - self._centre) / self._spread  # type: ignore[attr-defined]
        return z.max(1).values

    def to_meta(self, **record: Any) -> dict[str, Any]:
        return {
            "score": "stage-statistics Mahalanobis (largest z-score over the stages)",
            "sizes": self.sizes,
            "means": self.means,
            "precisions": self.precisions,
            "centre": self.centre,
            "spread": self.spread,
            "threshold": self.threshold,
            **record,
        }

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Detector:
        return cls(
            sizes=[int(s) for s in meta["sizes"]],
            means=[m.float() for m in meta["means"]],
            precisions=[p.float() for p in meta["precisions"]],
            centre=[float(c) for c in meta["centre"]],
            spread=[float(s) for s in meta["spread"]],
            threshold=float(meta["threshold"]),
        )


@dataclass(frozen=True)
class Calibration:
    """What turns a forward pass into answers: the temperature, and the detector if fitted."""

    temperature: float = 1.0
    detector: Detector | None = None

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Calibration:
        """From a checkpoint's metadata; a checkpoint without calibration gets T = 1, no detector.
        Raises ValueError for a record that is there but unusable."""
        record = meta.get("calibration") or {}
        temperature = float(record.get("temperature", 1.0))
        if not temperature > 0:
            raise ValueError(f"its calibration temperature {temperature} is not positive")
        detector = None
        if meta.get("ood"):
            try:
                detector = Detector.from_meta(meta["ood"])
            except (KeyError, TypeError, AttributeError) as exc:
                raise ValueError(f"its out-of-distribution record is unusable ({exc})") from None
        return cls(temperature, detector)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float() / self.temperature, dim=1)


def reliability_bins(
    probabilities: torch.Tensor, labels: torch.Tensor, bins: int = 15
) -> list[tuple[float, float, float]]:
    """(share of the images, accuracy, mean confidence) of each equal-width confidence bin;
    (0, 0, 0) for an empty one."""
    confidence, predicted = probabilities.max(1)
    correct = (predicted == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            out.append(
                (
                    float(inside.float().mean()),
                    float(correct[inside].mean()),
                    float(confidence[inside].mean()),
                )
            )
        else:
            out.append((0.0, 0.0, 0.0))
    return out


def expected_calibration_error(probabilities: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE over equal-width confidence bins (Guo et al. 2017's 15): the bins' |accuracy -
    confidence|, weighted by their share of the images."""
    return sum(share * abs(acc - conf) for share, acc, conf in reliability_bins(probabilities, labels, bins))


def public(meta: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's metadata fit for JSON: the detector's tensors as their shapes."""

    def plain(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return f"tensor {list(value.shape)}"
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(meta)
