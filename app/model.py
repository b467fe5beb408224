"""FinalModel: the compact CIFAR-10 CNN (149,584 parameters), and the one definition of its inputs.

No max-pooling: the feature map shrinks only through 3x3 convolutions with dilation 2 and no
padding (32 -> 28 -> 24 -> 20); depthwise-separable convolutions keep the wide layers cheap, and a
global average pool feeds a bias-free linear classifier. Inside each block the order is
Conv -> ReLU -> BatchNorm -> Dropout, exactly as the original summary printed it.

Training, evaluation and serving all import `CLASSES`, `MEAN`, `STD` and `IMAGE_SIZE` from here,
so every path sees the same labels and the same normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

MODEL_NAME = "FinalModel"

# CIFAR-10's own label order.
CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

# Per-channel statistics of the CIFAR-10 training split, on the 0..1 scale.
MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)

IMAGE_SIZE = 32
INPUT_SHAPE: tuple[int, int, int] = (3, IMAGE_SIZE, IMAGE_SIZE)

DEFAULT_DROPOUT = 0.05


def _conv_unit(c_in: int, c_out: int, dropout: float | None, **conv_kwargs) -> list[nn.Module]:
    """Conv -> ReLU -> BatchNorm [-> Dropout]; convs feeding a BatchNorm carry no bias."""
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel_size=3, bias=False, **conv_kwargs),
        nn.ReLU(),
        nn.BatchNorm2d(c_out),
    ]
    if dropout is not None:
        layers.append(nn.Dropout(dropout))
    return layers


def _shrink(c: int) -> list[nn.Module]:
    """3x3 conv with dilation 2 and no padding: the map loses 4 pixels per side pair."""
    return _conv_unit(c, c, None, dilation=2, padding=0)


def _separable(c_in: int, c_out: int, dropout: float) -> list[nn.Module]:
    """Depthwise 3x3 (one filter per channel) followed by a pointwise 1x1 unit."""
    return [
        nn.Conv2d(c_in, c_in, kernel_size=3, padding=1, groups=c_in, bias=False),
        nn.Conv2d(c_in, c_out, kernel_size=1, bias=False),
        nn.ReLU(),
        nn.BatchNorm2d(c_out),
        nn.Dropout(dropout),
    ]


class FinalModel(nn.Module):
    """(N, 3, 32, 32) normalised images -> (N, 10) logits."""

    def __init__(self, dropout: float = DEFAULT_DROPOUT, num_classes: int = len(CLASSES)):
        super().__init__()
        d = dropout
        self.c1 = nn.Sequential(
            *_conv_unit(3, 32, d, padding=1),
            *_conv_unit(32, 64, d, padding=1),
            nn.Conv2d(64, 16, kernel_size=1),  # 1x1 squeeze, with bias
            *_shrink(16),  # 32x32 -> 28x28
        )
        self.c2 = nn.Sequential(
            *_conv_unit(16, 32, d, padding=1),
            *_conv_unit(32, 64, d, padding=1),
            nn.Conv2d(64, 32, kernel_size=1),
            *_shrink(32),  # 28x28 -> 24x24
        )
        self.c3 = nn.Sequential(
            *_conv_unit(32, 64, d, padding=1),
            *_separable(64, 256, d),
            nn.Conv2d(256, 32, kernel_size=1),
            *_shrink(32),  # 24x24 -> 20x20
        )
        self.c4 = nn.Sequential(
            *_conv_unit(32, 64, d, padding=1),
            *_separable(64, 256, d),
        )
        self.gap = nn.AvgPool2d(kernel_size=20)  # the whole 20x20 map -> 1x1
        self.fc = nn.Linear(256, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c4(self.c3(self.c2(self.c1(x))))  # (N, 256, 20, 20)
        x = self.gap(x).flatten(1)  # (N, 256)
        return self.fc(x)  # (N, 10) logits


class LiteModel(nn.Module):
    """The original project's second target: under 50,000 parameters (47,648), FinalModel's blocks.

    The same pattern at smaller widths: conv units, a 1x1 squeeze, and a dilated shrink per block
    (32 -> 28 -> 24 -> 20), depthwise-separable units for the wider layers, global average pooling
    and a bias-free linear classifier.
    """

    def __init__(self, dropout: float = DEFAULT_DROPOUT, num_classes: int = len(CLASSES)):
        super().__init__()
        d = dropout
        self.c1 = nn.Sequential(
            *_conv_unit(3, 16, d, padding=1),
            *_conv_unit(16, 32, d, padding=1),
            nn.Conv2d(32, 16, kernel_size=1),
            *_shrink(16),  # 32x32 -> 28x28
        )
        self.c2 = nn.Sequential(
            *_conv_unit(16, 32, d, padding=1),
            *_separable(32, 64, d),
            nn.Conv2d(64, 32, kernel_size=1),
            *_shrink(32),  # 28x28 -> 24x24
        )
        self.c3 = nn.Sequential(
            *_separable(32, 64, d),
            nn.Conv2d(64, 32, kernel_size=1),
            *_shrink(32),  # 24x24 -> 20x20
        )
        self.c4 = nn.Sequential(*_separable(32, 160, d))
        self.gap = nn.AvgPool2d(kernel_size=20)
        self.fc = nn.Linear(160, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c4(self.c3(self.c2(self.c1(x))))  # (N, 160, 20, 20)
        return self.fc(self.gap(x).flatten(1))  # (N, 10) logits


# The networks a checkpoint may hold, by the name it records; training's --model picks by key.
ARCHITECTURES: dict[str, type[nn.Module]] = {"FinalModel": FinalModel, "LiteModel": LiteModel}
MODEL_KEYS: dict[str, str] = {"final": "FinalModel", "lite": "LiteModel"}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


@dataclass(frozen=True)
class LayerRow:
    name: str  # "Conv2d-1", numbered in execution order like torchsummary
    type: str
    output_shape: tuple[int, ...]  # batch dimension printed as -1
    params: int


def layer_table(model: nn.Module, input_shape: tuple[int, ...] = INPUT_SHAPE) -> list[LayerRow]:
    """The model's leaf modules in execution order, measured with forward hooks on one input."""
    rows: list[LayerRow] = []

    def hook(module: nn.Module, _inputs, output: torch.Tensor) -> None:
        kind = type(module).__name__
        params = sum(p.numel() for p in module.parameters(recurse=False))
        shape = (-1, *output.shape[1:])
        rows.append(LayerRow(f"{kind}-{len(rows) + 1}", kind, tuple(shape), params))

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    param = next(model.parameters())
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=param.device, dtype=param.dtype))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return rows


def format_layer_table(rows: list[LayerRow], total: int, trainable: int) -> str:
    """The table in the layout of the original project's printed summary (torchsummary's)."""
    line = "-" * 64
    out = [line, f"{'Layer (type)':>20}  {'Output Shape':>25} {'Param #':>15}", "=" * 64]
    for r in rows:
        shape = "[" + ", ".join(str(s) for s in r.output_shape) + "]"
        out.append(f"{r.name:>20}  {shape:>25} {r.params:>15,}")
    out += [
        "=" * 64,
        f"Total params: {total:,}",
        f"Trainable params: {trainable:,}",
        f"Non-trainable params: {total - trainable:,}",
        line,
    ]
    return "\n".join(out)
