"""Instance masks (CentripetalNet §3.3): the mask head on RoIAlign features, its loss (eq. 8), pasting the
28x28 box-relative masks into an image and COCO RLE encoding for the results JSON.

A mask lives on a `MASK_SIZE`² grid laid over its box: cell (i, j) covers the box's i-th row and j-th column
of 28 equal parts, and its value is the probability that the cell's centre belongs to the instance.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torch import Tensor, nn
from torchvision.ops import roi_align

from kpnet.targets import MASK_SIZE

ROI_SIZE = 14  # RoIAlign output side (CentripetalNet §3.3)
ROI_SAMPLING = 2  # RoIAlign samples per bin side, as Mask R-CNN


class MaskHead(nn.Module):
    """Four 3x3 convs + ReLU on 14x14 RoI features, a 2x2 stride-2 transposed conv + ReLU to 28x28, and a
    1x1 conv to one mask logit map per class (CentripetalNet §3.3; Mask R-CNN's head)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(4):
            layers += [nn.Conv2d(dim, dim, 3, padding=1), nn.ReLU(inplace=True)]
        layers += [nn.ConvTranspose2d(dim, dim, 2, stride=2), nn.ReLU(inplace=True), nn.Conv2d(dim, num_classes, 1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, features: Tensor, rois: Tensor, classes: Tensor) -> Tensor:
        """Mask logits (N, 28, 28) on the class channel of each RoI: `rois` (N, 5) batch index, x1, y1, x2, y2
        in the feature map's units."""
        pooled = roi_align(features.float(), rois.to(features.device, torch.float32), ROI_SIZE,
                           spatial_scale=1.0, sampling_ratio=ROI_SAMPLING, aligned=True)
        logits = self.layers(pooled)
        return logits[torch.arange(len(rois), device=logits.device), classes.to(logits.device)]


def rois_of(boxes: Tensor, batch_index: Tensor) -> Tensor:
    """(N, 4) boxes and their (N,) image index in the batch -> RoIAlign's (N, 5) rows."""
    return torch.cat([batch_index.to(boxes.dtype)[:, None], boxes], 1)


def mask_loss(head: MaskHead, features: Tensor, targets: dict[str, Tensor]) -> Tensor:
    """L_mask = 1/N Σ_i CE(m_i, m̂_i), the per-pixel binary cross entropy of each RoI on its class channel,
    averaged over the N ground-truth RoIs of the batch (eq. 8); 0 (with a graph) when there are none."""
    valid = targets["mask_valid"] > 0
    batch_index = valid.nonzero()[:, 0]
    logits = head(features, rois_of(targets["mask_rois"][valid], batch_index), targets["mask_classes"][valid])
    goal = targets["mask_targets"][valid].float()
    total = F.binary_cross_entropy_with_logits(logits.float(), goal, reduction="sum")
    return total / max(int(valid.sum()) * MASK_SIZE * MASK_SIZE, 1)


def crop_masks(masks: Tensor, boxes: Tensor) -> Tensor:
    """(N, H, W) full-image masks -> (N, 28, 28) on the grid over each (N, 4) image-pixel box (bilinear at the
    cells' centres); how ground truth is shaped as the head's output."""
    if len(boxes) == 0:
        return torch.zeros((0, MASK_SIZE, MASK_SIZE))
    rois = rois_of(boxes.float(), torch.arange(len(boxes)))
    return roi_align(masks[:, None].float(), rois, MASK_SIZE, 1.0, sampling_ratio=1, aligned=True)[:, 0]


def paste_masks(masks: Tensor, boxes: Tensor, height: int, width: int, threshold: float) -> np.ndarray:
    """(N, 28, 28) box-grid probabilities -> (N, height, width) bool image masks: each image pixel inside its
    box samples the grid bilinearly at the pixel's centre and is the instance where that is ≥ `threshold`."""
    out = np.zeros((len(masks), height, width), bool)
    for n, (mask, box) in enumerate(zip(masks.float(), boxes.float().tolist())):
        x1, y1, x2, y2 = box
        if x2 - x1 <= 0 or y2 - y1 <= 0:
            continue
        c0, c1 = max(int(np.floor(x1)), 0), min(int(np.ceil(x2)), width)
        r0, r1 = max(int(np.floor(y1)), 0), min(int(np.ceil(y2)), height)
        if c1 <= c0 or r1 <= r0:
            continue
        gx = (torch.arange(c0, c1, dtype=torch.float32) + 0.5 - x1) / (x2 - x1) * 2 - 1
        gy = (torch.arange(r0, r1, dtype=torch.float32) + 0.5 - y1) / (y2 - y1) * 2 - 1
        grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), -1)[None]
        sampled = F.grid_sample(mask[None, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        out[n, r0:r1, c0:c1] = sampled[0, 0].numpy() >= threshold
    return out


def to_rle(mask: np.ndarray) -> dict[str, Any]:
    """A bool (H, W) mask as a compressed COCO RLE with string counts (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
