"""CenterNet, keypoint triplets (Duan et al. 2019): the network — CornerNet's corner branches (with
cascade corner pooling) plus a centre keypoint branch on center pooling (triplet paper §3.2-3.3,
Fig. 2 and 5; REFERENCE §1.2, §1.4-1.5) — its targets and loss (CornerNet's plus the centre heatmap
with σ = diameter/5 and centre offsets, REFERENCE §2.4, §3.4) and the triplet decode (§3.1, §3.4:
boxes rescored by centre keypoints inside the scale-aware central region, REFERENCE §4.2).

Decoding is split so that the central-region test runs in original-image pixels, where the 22500
area switch is defined, and with centres of scale 1 only: `detect` returns the CornerNet boxes of one
scale together with the top-K centres (as rows with KIND_COLUMN = 1), the test pipeline maps every
row back to the image, and `postprocess` rescores the boxes of all scales against scale 1's centres.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from kpnet.detectors import cornernet
from kpnet.detectors.corner_modules import CenterPool
from kpnet.detectors.cornernet import CornerNet, corner_terms, gt_maps, keypoints, unflip
from kpnet.detectors.heads import HEAT_BIAS, kp_head
from kpnet.targets import corner_targets

HEADS = (*cornernet.HEADS, "ct_heat", "ct_regr")
LOSS_WEIGHTS = cornernet.LOSS_WEIGHTS
DETECT_PARAMS = cornernet.DETECT_PARAMS
POSTPROCESS_PARAMS = ("central_region", "region_area", "region_n_small", "region_n_large")  # TestConfig fields
KIND_COLUMN = 8  # detect's rows: 0 = box (x1, y1, x2, y2, score, class, s_tl, s_br), 1 = centre (x, y, x, y, score, class, ·, ·)


class CenterNetTriplet(CornerNet):
    """CornerNet heads plus `ct_heat` (C, bias -2.19) and `ct_regr` (2) on a centre module; no centre tag.

    Table 4 ablation switches: `cascade` (CCP) chooses cascade or plain corner pooling; `center_pool`
    (CTP) chooses center pooling or, when off, the same centre module with its two line maxima
    skipped, so the centre heads run on conventional convolutions with the same parameter count.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        cascade: bool = True,
        center_pool: bool = True,
        pool_mid: int | None = None,
        head_mid: int | None = None,
    ) -> None:
        super().__init__(backbone, num_classes, cascade, pool_mid, head_mid)
        dim = backbone.out_channels
        stacks = backbone.num_stacks
        pool_mid = pool_mid or dim // 2
        head_mid = head_mid or dim
        self.center_pool = center_pool
        self.ct_pools = nn.ModuleList(CenterPool(dim, pool_mid, pooling=center_pool) for _ in range(stacks))
        self.ct_heats = nn.ModuleList(kp_head(dim, head_mid, num_classes, HEAT_BIAS) for _ in range(stacks))
        self.ct_regrs = nn.ModuleList(kp_head(dim, head_mid, 2) for _ in range(stacks))

    def stack_outputs(self, stack: int, feature: Tensor) -> dict[str, Tensor]:
        """CornerNet's outputs of one stack plus the centre heatmap (C) and centre offsets (2)."""
        outputs = super().stack_outputs(stack, feature)
        ct = self.ct_pools[stack](feature)
        outputs["ct_heat"] = self.ct_heats[stack](ct)
        outputs["ct_regr"] = self.ct_regrs[stack](ct)
        return outputs


def encode(
    boxes: np.ndarray,
    classes: np.ndarray,
    num_classes: int,
    out_hw: tuple[int, int],
    max_objs: int,
    radius_mode: str,
    min_overlap: float,
) -> dict[str, np.ndarray]:
    """CornerNet's targets plus the centre heatmap (σ = diameter/5), centre offsets and indices (REFERENCE §2.4 DK)."""
    return corner_targets(boxes, classes, num_classes, out_hw, max_objs, radius_mode, min_overlap, centers=True)


def loss(
    outputs: list[dict[str, Tensor]],
    targets: dict[str, Tensor],
    hm_weight: float = 1.0,
    pull_weight: float = 0.1,
    push_weight: float = 0.1,
    off_weight: float = 1.0,
) -> dict[str, Tensor]:
    """CornerNet's loss with the centre focal and offset terms added to L_det and L_off (triplet eq. 2)."""
    t = corner_terms(outputs, targets, ("tl", "br", "ct"))
    total = hm_weight * t["focal"] + pull_weight * t["pull"] + push_weight * t["push"] + off_weight * t["off"]
    return {"loss": total, "focal_loss": t["focal"], "pull_loss": t["pull"], "push_loss": t["push"], "off_loss": t["off"]}


def center_rows(ct_heat: Tensor, ct_regr: Tensor, k: int) -> Tensor:
    """Top-K centre keypoints (3x3 NMS, offsets added, no score threshold) as (B, K, 9) rows of kind 1."""
    scores, classes, xs, ys, _ = keypoints(ct_heat, ct_regr, k)
    cls = classes.float()
    return torch.stack([xs, ys, xs, ys, scores, cls, scores, scores, torch.ones_like(scores)], -1)


def detect(outputs: dict[str, Tensor], flip: bool, k: int = 70, ae_threshold: float = 0.5, num_dets: int = 1000) -> Tensor:
    """CornerNet boxes (kind 0) and the top-K centres (kind 1) of one scale, in output-grid units.

    Rows of the original image come first, then the un-flipped rows of the flipped image; centres
    of each image are in descending score, which sets the "first match" order of `postprocess`.
    """
    boxes = cornernet.detect(outputs, flip, k, ae_threshold, num_dets)
    boxes = torch.cat([boxes, boxes.new_zeros((len(boxes), 1))], 1)
    centres = center_rows(outputs["ct_heat"].sigmoid(), outputs["ct_regr"], k)
    rows = [centres[0]]
    if flip:
        rows.append(unflip(centres[1], outputs["ct_heat"].shape[-1]))
    return torch.cat([boxes, *rows])


def central_regions(boxes: Tensor, area: float, n_small: float, n_large: float) -> Tensor:
    """(N, 4) central regions: the middle 1/n of each side, n = n_small if w·h <= area else n_large (triplet eq. 1)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    n = torch.where((x2 - x1) * (y2 - y1) <= area, n_small, n_large).to(boxes.dtype)
    return torch.stack(
        [((n + 1) * x1 + (n - 1) * x2) / (2 * n), ((n + 1) * y1 + (n - 1) * y2) / (2 * n),
         ((n - 1) * x1 + (n + 1) * x2) / (2 * n), ((n - 1) * y1 + (n + 1) * y2) / (2 * n)], -1
    )


def matching_centres(boxes: Tensor, centres: Tensor, area: float = 22500.0, n_small: float = 3.0,
                     n_large: float = 5.0) -> Tensor:
    """(N,) row of the first same-class centre strictly inside each box's central region, -1 for none (§3.1)."""
    if len(centres) == 0 or len(boxes) == 0:
        return torch.full((len(boxes),), -1, dtype=torch.long)
    region = central_regions(boxes[:, :4], area, n_small, n_large)
    cx, cy = centres[None, :, 0], centres[None, :, 1]
    match = (
        (centres[None, :, 5] == boxes[:, 5:6])
        & (cx > region[:, 0:1]) & (cx < region[:, 2:3]) & (cy > region[:, 1:2]) & (cy < region[:, 3:4])
    )
    first = match.to(torch.uint8).argmax(1)  # the first of equal maxima
    return torch.where(match.any(1), first, -1)


def rescore(boxes: Tensor, centres: Tensor, area: float = 22500.0, n_small: float = 3.0, n_large: float = 5.0) -> Tensor:
    """Keep boxes whose central region strictly contains a same-class centre; score ← (s_tl + s_br + s_ct)/3.

    boxes (N, ≥6) x1, y1, x2, y2, score, class, ...; centres (M, ≥6) x, y, ·, ·, score, class in the same
    (original-image) frame. The first matching centre in row order scores the box; boxes without a match
    are deleted (triplet §3.1; REFERENCE §4.2).
    """
    first = matching_centres(boxes, centres, area, n_small, n_large)
    has = first >= 0
    out = boxes[has].clone()
    out[:, 4] = (2 * out[:, 4] + centres[first[has], 4]) / 3
    return out


def postprocess(
    per_scale: list[Tensor],
    scales: tuple[float, ...],
    central_region: bool = True,
    region_area: float = 22500.0,
    region_n_small: float = 3.0,
    region_n_large: float = 5.0,
) -> Tensor:
    """Rows of every scale in image pixels -> rescored boxes (N, 8); centres come from scale 1 only (REFERENCE §4.2).

    Scale 1 is the scale equal to 1.0, or the first listed when 1.0 is absent. With `central_region`
    off, the boxes pass unchanged (the CornerNet decode of a triplet network: Table 4 without CRE).
    """
    rows = torch.cat(per_scale)
    boxes = rows[rows[:, KIND_COLUMN] == 0, :KIND_COLUMN]
    if not central_region:
        return boxes
    base = per_scale[scales.index(1.0) if 1.0 in scales else 0]
    centres = base[base[:, KIND_COLUMN] == 1]
    return rescore(boxes, centres, region_area, region_n_small, region_n_large)


def gt_heads(
    boxes: np.ndarray, classes: np.ndarray, num_classes: int, out_hw: tuple[int, int], radius_mode: str, min_overlap: float
) -> dict[str, Tensor]:
    """Ground truth shaped as network outputs for a batch of one, centre heads included (triplet Table 5)."""
    t = corner_targets(boxes, classes, num_classes, out_hw, max(len(boxes), 1), radius_mode, min_overlap, centers=True)
    return gt_maps(t, out_hw, ("tl", "br", "ct"))


__all__ = ["HEADS", "CenterNetTriplet", "center_rows", "central_regions", "detect", "encode", "gt_heads", "loss", "matching_centres", "postprocess", "rescore"]
