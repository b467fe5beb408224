"""Where the model looked: a heatmap per image for its predicted class (`?explain=cam`).

Every served network ends in a global pool of its last map and a linear layer (`StagedNet`), so
the map is one small product on what the forward pass already computed:

- FinalModel and LiteModel (global *average* pool): exact CAM (Zhou et al. 2016),
  sum_k w[c, k] * A_k, whose mean over the map is the class's logit.
- AirbenchNet (global *max* pool): Grad-CAM (Selvaraju et al. 2017). Each channel's gradient
  reaches only the position of its maximum, so the gradient-averaged channel weights are w[c, k]
  over the map's size and Grad-CAM is relu(sum_k w[c, k] * A_k) up to a positive factor, with no
  backward pass.

Maps are placed on the 32x32 image: FinalModel's 20x20 map is aligned with the image's centre
(each of its three unpadded dilated convs trims 2 pixels a side, so map cell i sits over pixel
i + 6) and its edge values are repeated outwards; a pooled network's coarse map is stretched over
the image (bilinear). Each heatmap is scaled to 0..1 (0: least, 1: most evidence for the class).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from app.model import IMAGE_SIZE, StagedNet


def heatmaps(model: StagedNet, fmap: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """The last stage's map (N, C, h, w) and the classes (N,) -> heatmaps (N, 32, 32) in [0, 1]."""
    n, c, h, w = fmap.shape
    weights = model.class_weights().detach().float().cpu()[classes]  # (N, C)
    cam = torch.bmm(weights.unsqueeze(1), fmap.float().view(n, c, h * w)).view(n, 1, h, w)
    if model.cam_method == "grad-cam":
        cam = cam.clamp(min=0)
    if model.map_offset is not None:  # centre-aligned: pad with the edge values
        cam = F.pad(cam, (model.map_offset,) * 4, mode="replicate")
    else:
        cam = F.interpolate(cam, size=IMAGE_SIZE, mode="bilinear", align_corners=False)
    cam = cam.view(n, -1)
    if cam.shape[1] != IMAGE_SIZE * IMAGE_SIZE:
        raise ValueError(f"a {h}x{w} map does not place onto the {IMAGE_SIZE}x{IMAGE_SIZE} image")
    low, high = cam.aminmax(dim=1, keepdim=True)
    return ((cam - low) / (high - low).clamp(min=1e-12)).view(n, IMAGE_SIZE, IMAGE_SIZE)
