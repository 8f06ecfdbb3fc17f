"""CenterNet, objects as points: one centre peak per object plus its size and sub-cell offset.

Network (its §4), targets (eq. 1-3 via kpnet.targets), loss (eq. 4: focal + 0.1·L1 size + 1·L1 offset
with XZ's normalisation, REFERENCE §3), decoding (§4.1: 3x3 max-pool peaks, top-K; REFERENCE §4.3)
and the flip rule (heatmaps and sizes averaged, offsets from the original only; REFERENCE §4.6).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from kpnet.detectors.heads import HEAT_BIAS, kp_head
from kpnet.losses import focal_loss, heat_sigmoid, reg_l1_loss
from kpnet.ops import heatmap_peaks
from kpnet.targets import center_targets, dense_from_centers

HEADS = ("hm", "wh", "reg")
LOSS_WEIGHTS = ("hm_weight", "wh_weight", "off_weight")  # LossConfig fields passed to `loss`
DETECT_PARAMS = ("k",)  # TestConfig fields passed to `detect`


class CenterNetPoints(nn.Module):
    """Backbone + per-stack heads hm (C), wh (2), reg (2); raw logits out, one dict per stack."""

    def __init__(self, backbone: nn.Module, num_classes: int, head_conv: int = 64) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        ch = backbone.out_channels
        stacks = backbone.num_stacks
        self.hm = nn.ModuleList(kp_head(ch, head_conv, num_classes, bias=HEAT_BIAS) for _ in range(stacks))
        self.wh = nn.ModuleList(kp_head(ch, head_conv, 2, bias=0.0) for _ in range(stacks))
        self.reg = nn.ModuleList(kp_head(ch, head_conv, 2, bias=0.0) for _ in range(stacks))

    def forward(self, images: Tensor) -> list[dict[str, Tensor]]:
        feats = self.backbone(images)
        first = 0 if self.training else len(feats) - 1
        return [
            {"hm": self.hm[i](feats[i]), "wh": self.wh[i](feats[i]), "reg": self.reg[i](feats[i])}
            for i in range(first, len(feats))
        ]


def encode(
    boxes: np.ndarray,
    classes: np.ndarray,
    num_classes: int,
    out_hw: tuple[int, int],
    max_objs: int,
    radius_mode: str,
    min_overlap: float,
) -> dict[str, np.ndarray]:
    """Targets for one image from boxes in output-grid units (objects as points eq. 1-3)."""
    return center_targets(boxes, classes, num_classes, out_hw, max_objs, radius_mode, min_overlap)


def loss(
    outputs: list[dict[str, Tensor]],
    targets: dict[str, Tensor],
    hm_weight: float = 1.0,
    wh_weight: float = 0.1,
    off_weight: float = 1.0,
) -> dict[str, Tensor]:
    """L = L_k + λsize·L_size + λoff·L_off (objects as points eq. 4), each term averaged over stacks."""
    n = len(outputs)
    hm = sum(focal_loss(heat_sigmoid(o["hm"]), targets["hm"]) for o in outputs) / n
    wh = sum(reg_l1_loss(o["wh"], targets["ind"], targets["reg_mask"], targets["wh"]) for o in outputs) / n
    off = sum(reg_l1_loss(o["reg"], targets["ind"], targets["reg_mask"], targets["reg"]) for o in outputs) / n
    total = hm_weight * hm + wh_weight * wh + off_weight * off
    return {"loss": total, "hm_loss": hm, "wh_loss": wh, "off_loss": off}


def merge_flip(outputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """Average hm and wh of a [image, flipped image] batch; reg from the original (REFERENCE §4.6)."""
    hm = outputs["hm"].sigmoid()
    hm = (hm[0:1] + hm[1:2].flip(-1)) / 2
    wh = (outputs["wh"][0:1] + outputs["wh"][1:2].flip(-1)) / 2
    return {"hm": hm, "wh": wh, "reg": outputs["reg"][0:1]}


def decode(hm: Tensor, wh: Tensor, reg: Tensor, k: int = 100) -> Tensor:
    """Peaks -> boxes (B, K, 6): x1, y1, x2, y2, score, class in output-grid units (REFERENCE §4.3).

    `hm` holds probabilities; a box is (cx + ox ± w/2, cy + oy ± h/2) at each of the top-K peaks.
    """
    scores, classes, ys, xs = heatmap_peaks(hm, k)
    b, kk = scores.shape
    width = hm.shape[-1]
    ind = ys * width + xs
    flat_wh = wh.reshape(b, 2, -1)
    flat_reg = reg.reshape(b, 2, -1)
    idx = ind.unsqueeze(1).expand(-1, 2, -1)
    size = flat_wh.gather(2, idx)
    off = flat_reg.gather(2, idx)
    cx = xs.float() + off[:, 0]
    cy = ys.float() + off[:, 1]
    half_w, half_h = size[:, 0] / 2, size[:, 1] / 2
    return torch.stack(
        [cx - half_w, cy - half_h, cx + half_w, cy + half_h, scores, classes.float()], dim=-1
    ).reshape(b, kk, 6)


def detect(outputs: dict[str, Tensor], flip: bool, k: int) -> Tensor:
    """Decode one image's outputs (a batch of 1, or 2 with its flip) into (K, 6) output-grid boxes."""
    if flip:
        merged = merge_flip(outputs)
    else:
        merged = {"hm": outputs["hm"].sigmoid(), "wh": outputs["wh"], "reg": outputs["reg"]}
    return decode(merged["hm"], merged["wh"], merged["reg"], k)[0]


def gt_heads(
    boxes: np.ndarray, classes: np.ndarray, num_classes: int, out_hw: tuple[int, int], radius_mode: str, min_overlap: float
) -> dict[str, Tensor]:
    """Ground truth shaped as network outputs for a batch of one (objects as points Table 7 oracle).

    hm is the rendered heatmap as logits; wh and reg are filled outward from each centre so that
    a peak anywhere reads a ground-truth value (XZ `gen_oracle_map`, REFERENCE §6).
    """
    t = center_targets(boxes, classes, num_classes, out_hw, max(len(boxes), 1), radius_mode, min_overlap)
    hm = torch.logit(torch.from_numpy(t["hm"]).clamp(1e-6, 1 - 1e-6))
    dense = {k: torch.from_numpy(dense_from_centers(t[k], t["ind"], t["reg_mask"], out_hw)) for k in ("wh", "reg")}
    return {"hm": hm[None], "wh": dense["wh"][None], "reg": dense["reg"][None]}
