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
from typing import Any

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


class StagedNet(nn.Module):
    """A network run as stages, then a head that pools the last stage's map and maps it linearly
    to the logits: what the service's unsure flag (statistics of every stage) and heatmaps (the
    last map against the head's weights) read, from the same forward pass."""

    cam_method = "cam"  # the heatmap: exact CAM for an average-pooled head
    # the last map sits over the image's centre from this pixel on; None: it is stretched over it
    map_offset: int | None = None

    def stages(self) -> list[nn.Module]:
        raise NotImplementedError

    def pool(self, fmap: torch.Tensor) -> torch.Tensor:
        """The last stage's map (N, C, h, w) -> pooled features (N, C)."""
        raise NotImplementedError

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled features (N, C) -> logits (N, 10): linear, no bias."""
        raise NotImplementedError

    def class_weights(self) -> torch.Tensor:
        """(10, C): logit c = class_weights[c] . pool(last map)."""
        raise NotImplementedError

    def head(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.classify(self.pool(fmap))

    def forward_stages(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Every stage's output map, the pooled features and the logits."""
        maps = []
        for stage in self.stages():
            x = stage(x)
            maps.append(x)
        pooled = self.pool(x)
        return maps, pooled, self.classify(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages():
            x = stage(x)
        return self.head(x)


class _AveragePooledNet(StagedNet):
    """FinalModel's and LiteModel's shape: blocks c1-c4, global average pool, bias-free linear."""

    c1: nn.Sequential
    c2: nn.Sequential
    c3: nn.Sequential
    c4: nn.Sequential
    gap: nn.AvgPool2d
    fc: nn.Linear

    map_offset = 6  # three unpadded dilated 3x3 convs trim 2 pixels a side each: 32 -> 20

    def stages(self) -> list[nn.Module]:
        return [self.c1, self.c2, self.c3, self.c4]

    def pool(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.gap(fmap).flatten(1)  # (N, C, 20, 20) -> (N, C)

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc(pooled)

    def class_weights(self) -> torch.Tensor:
        return self.fc.weight


class FinalModel(_AveragePooledNet):
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


class LiteModel(_AveragePooledNet):
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


WHITEN_KERNEL = 2
WHITEN_WIDTH = 2 * 3 * WHITEN_KERNEL**2  # 12 whitening filters and their negatives


class _BatchNorm(nn.BatchNorm2d):
    """BatchNorm whose scale may be frozen at 1 (airbench trains only the bias)."""

    def __init__(self, c: int, eps: float, momentum: float, scale: bool):
        super().__init__(c, eps=eps, momentum=momentum)
        self.weight.requires_grad_(scale)


class ConvGroup(nn.Module):
    """conv 3x3 -> 2x2 max-pool -> BN -> GELU, then one conv-BN-GELU (depth 2) or a residual pair
    of them (depth 3, airbench96's block): halves the map."""

    def __init__(self, c_in: int, c_out: int, depth: int, bn: dict[str, Any]):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = _BatchNorm(c_out, **bn)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = _BatchNorm(c_out, **bn)
        self.residual = depth == 3
        if self.residual:
            self.conv3 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
            self.norm3 = _BatchNorm(c_out, **bn)
        self.activ = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.activ(self.norm1(self.pool(self.conv1(x))))
        y = self.activ(self.norm2(self.conv2(x)))
        if self.residual:
            y = self.activ(self.norm3(self.conv3(y)) + x)
        return y


class AirbenchNet(StagedNet):
    """The airbench family (Jordan 2024, arXiv 2404.00498): served as model `best` and used as the
    distillation teacher. (N, 3, 32, 32) normalised images -> (N, 10) logits.

    A stem (airbench's frozen 2x2 whitening conv with a trained bias, then GELU; or, with
    `stem` > 0, a trained 3x3 conv-BN-GELU of that width), three ConvGroups that halve the map
    (31 -> 15 -> 7 -> 3 with the whitening stem), a global max-pool and a bias-free linear layer
    whose logits are scaled by `logit_scale`. airbench94: widths 64/256/256, depth 2 (1.97M
    parameters); airbench96: 128/384/512, depth 3.
    """

    def __init__(
        self,
        widths: tuple[int, int, int] | list[int] = (64, 256, 256),
        depth: int = 2,
        stem: int = 0,
        logit_scale: float = 1 / 9,
        bn_eps: float = 1e-12,
        bn_momentum: float = 0.4,
        bn_scale: bool = False,
        num_classes: int = len(CLASSES),
    ):
        super().__init__()
        if len(widths) != 3 or min(widths) < 1 or depth not in (2, 3) or stem < 0:
            raise ValueError(f"AirbenchNet needs three positive widths, depth 2 or 3 and stem >= 0: {widths}")
        bn: dict[str, Any] = {"eps": bn_eps, "momentum": bn_momentum, "scale": bn_scale}
        if stem:
            self.stem = nn.Sequential(
                nn.Conv2d(3, stem, 3, padding=1, bias=False), _BatchNorm(stem, **bn), nn.GELU()
            )
        else:
            whiten = nn.Conv2d(3, WHITEN_WIDTH, WHITEN_KERNEL, padding=0, bias=True)
            whiten.weight.requires_grad_(False)  # set from the data's patch statistics, never trained
            self.stem = nn.Sequential(whiten, nn.GELU())
        chans = [stem or WHITEN_WIDTH, *widths]
        self.groups = nn.Sequential(
            *(ConvGroup(a, b, depth, bn) for a, b in zip(chans, chans[1:], strict=False))
        )
        self.fc = nn.Linear(widths[-1], num_classes, bias=False)
        self.logit_scale = logit_scale

    @property
    def whitening(self) -> nn.Conv2d | None:
        """The whitening conv, or None with a trained conv stem."""
        conv = self.stem[0]
        return conv if isinstance(conv, nn.Conv2d) and conv.kernel_size == (WHITEN_KERNEL,) * 2 else None

    # Grad-CAM: for a max-pooled linear head its channel weights are class_weights (each channel's
    # gradient reaches one position), so the map is relu(class_weights[c] . map), up to a scale.
    cam_method = "grad-cam"

    def stages(self) -> list[nn.Module]:
        return [self.stem, *self.groups]

    def pool(self, fmap: torch.Tensor) -> torch.Tensor:
        # (N, C, 3, 3) with the whitening stem, (N, C, 4, 4) without -> global max-pool -> (N, C)
        return torch.amax(fmap, dim=(2, 3))

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc(pooled) * self.logit_scale

    def class_weights(self) -> torch.Tensor:
        return self.fc.weight * self.logit_scale


# The networks a checkpoint may hold, by the name it records; training's --model picks by key.
ARCHITECTURES: dict[str, type[StagedNet]] = {
    "FinalModel": FinalModel,
    "LiteModel": LiteModel,
    "AirbenchNet": AirbenchNet,
}
MODEL_KEYS: dict[str, str] = {"final": "FinalModel", "lite": "LiteModel", "best": "AirbenchNet"}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def _probe(model: nn.Module, modules: list[nn.Module], hook, input_shape: tuple[int, ...]) -> None:
    """One forward pass of a zero image in eval mode with `hook` on `modules`; the model is left
    as it was (mode, no hooks)."""
    handles = [m.register_forward_hook(hook) for m in modules]
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


def multiply_accumulates(model: nn.Module, input_shape: tuple[int, ...] = INPUT_SHAPE) -> int:
    """Multiply-accumulates of the convolutions and linear layers for one image (the rest, pooling,
    normalisation and activations, is a small share)."""
    total = 0

    def hook(module: nn.Module, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            per_output = (module.in_channels // module.groups) * module.kernel_size[0] * module.kernel_size[1]
            total += output[0].numel() * per_output
        elif isinstance(module, nn.Linear):
            total += output[0].numel() * module.in_features

    _probe(model, [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))], hook, input_shape)
    return total


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

    _probe(model, [m for m in model.modules() if not list(m.children())], hook, input_shape)
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
