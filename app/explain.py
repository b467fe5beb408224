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
    weights = model.class_weights().detach().float().cpu()[classes]  # (N, C)
    cam = torch.einsum("nchw,nc->nhw", fmap.float(), weights)
    if model.cam_method == "grad-cam":
        cam = cam.clamp(min=0)
    size = cam.shape[-1]
    cam = cam.unsqueeze(1)
    if isinstance(model.map_offset, int):  # centre-aligned: pad with the edge values
        cam = F.pad(cam, (model.map_offset,) * 4, mode="replicate")
    else:
        cam = F.interpolate(cam, size=IMAGE_SIZE, mode="bilinear", align_corners=False)
    cam = cam.squeeze(1)
    assert cam.shape[-1] == IMAGE_SIZE, f"a {size}x{size} map does not place onto the image"
    low = cam.flatten(1).min(1).values.view(-1, 1, 1)
    high = cam.flatten(1).max(1).values.view(-1, 1, 1)
    return torch.where(high > low, (cam - low) / (high - low).clamp(min=1e-12), torch.zeros_like(cam))
