"""Augmentation on whole batches of normalised images, on whatever device the batch lives on.

The family the original design used (flip, shift-scale-rotate, coarse dropout), done the way
fast CIFAR-10 trainers do it: random horizontal flip, random translation with reflect padding,
and cutout (a square set to 0, which after normalisation is the data set's mean colour); and
mixup, which blends a batch with a shuffled copy of itself and the loss over the pair of labels.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F


def flip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    mask = torch.rand(x.shape[0], generator=g, device=g.device) < 0.5
    return torch.where(mask.to(x.device).view(-1, 1, 1, 1), x.flip(3), x)


def translate(x: torch.Tensor, pad: int, g: torch.Generator) -> torch.Tensor:
    """Shift each image by its own (dy, dx) in [-pad, pad], filling the edge by reflection."""
    if pad == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g, device=g.device).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g, device=g.device).to(x.device)
    rows = (dy.view(n, 1) + torch.arange(h, device=x.device)).view(n, 1, h, 1)
    cols = (dx.view(n, 1) + torch.arange(w, device=x.device)).view(n, 1, 1, w)
    batch = torch.arange(n, device=x.device).view(n, 1, 1, 1)
    channels = torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1)
    return padded[batch, channels, rows, cols]


def cutout(x: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """Zero one size x size square per image, centred anywhere (it may hang over the edge)."""
    if size == 0:
        return x
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n, 1, 1), generator=g, device=g.device).to(x.device)
    cx = torch.randint(0, w, (n, 1, 1), generator=g, device=g.device).to(x.device)
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    top, left = cy - size // 2, cx - size // 2
    inside = (ys >= top) & (ys < top + size) & (xs >= left) & (xs < left + size)
    return x.masked_fill(inside.unsqueeze(1), 0.0)


def augment(x: torch.Tensor, pad: int, cutout_size: int, g: torch.Generator) -> torch.Tensor:
    return cutout(translate(flip(x, g), pad, g), cutout_size, g)


def mixup(
    x: torch.Tensor, y: torch.Tensor, alpha: float, key: str, g: torch.Generator
) -> tuple[torch.Tensor, tuple[float, torch.Tensor] | None]:
    """The batch blended with a shuffled copy of itself, lam * x + (1 - lam) * x[pair] with lam ~
    Beta(alpha, alpha) drawn from `key` (the same after a resume), and (lam, the pair's labels);
    (x, None) when alpha is 0."""
    if alpha <= 0:
        return x, None
    lam = random.Random(key).betavariate(alpha, alpha)
    pair = torch.randperm(len(y), generator=g, device=g.device).to(x.device)
    return lam * x + (1 - lam) * x[pair], (lam, y[pair])


def mixed_cross_entropy(
    logits: torch.Tensor, y: torch.Tensor, label_smoothing: float, mix: tuple[float, torch.Tensor] | None
) -> torch.Tensor:
    """Label-smoothed cross-entropy; for a mixed batch, blended over the pair of labels."""
    ce = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    if mix is None:
        return ce
    lam, y_pair = mix
    return lam * ce + (1 - lam) * F.cross_entropy(logits, y_pair, label_smoothing=label_smoothing)
