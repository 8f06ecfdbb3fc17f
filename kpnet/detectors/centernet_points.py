"""CenterNet, objects as points: one centre peak per object plus its size and sub-cell offset.

Network (its §4), targets (eq. 1-3 via kpnet.targets), loss (eq. 4: focal + 0.1·L1 size + 1·L1 offset
with XZ's normalisation, REFERENCE §3), decoding (§4.1: 3x3 max-pool peaks, top-K; REFERENCE §4.3)
and the flip rule (heatmaps and sizes averaged, offsets from the original only; REFERENCE §4.6).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kpnet.config import ModelConfig, Recipe
from kpnet.detectors.base import Detections, Detector, ScaleOutput, TargetRenderer
from kpnet.export.decode import export_peaks, flip_halves, to_input_pixels
from kpnet.layers import HEAT_BIAS, kp_head
from kpnet.losses import focal_loss, heat_sigmoid, reg_l1_loss
from kpnet.ops import heatmap_peaks
from kpnet.targets import center_targets, dense_from_centers


class CenterNetPoints(nn.Module):
    """Backbone + per-stack heads hm (C), wh (2), reg (2); raw logits out, one dict per stack."""

    def __init__(self, backbone: nn.Module, num_classes: int, head_conv: int) -> None:
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
        return [self.stack_heads(i, feats[i]) for i in range(first, len(feats))]

    def stack_heads(self, i: int, feat: Tensor) -> dict[str, Tensor]:
        """The raw heads of stack `i` on its features (a variant adds its own heads here)."""
        return {"hm": self.hm[i](feat), "wh": self.wh[i](feat), "reg": self.reg[i](feat)}


def merged_heads(outputs: dict[str, Tensor], flip: bool) -> dict[str, Tensor]:
    """hm as probabilities; under flip, hm and wh of an [images, flipped images] batch averaged and reg from the
    originals (REFERENCE §4.6)."""
    if not flip:
        return {"hm": outputs["hm"].sigmoid(), "wh": outputs["wh"], "reg": outputs["reg"]}
    hm, hm_flipped = flip_halves(outputs["hm"].sigmoid())
    wh, wh_flipped = flip_halves(outputs["wh"])
    return {"hm": (hm + hm_flipped.flip(-1)) / 2, "wh": (wh + wh_flipped.flip(-1)) / 2, "reg": flip_halves(outputs["reg"])[0]}


def decode_points(hm: Tensor, wh: Tensor, reg: Tensor, k: int,
                  peaks: Callable[..., tuple[Tensor, ...]] = heatmap_peaks) -> tuple[Tensor, Tensor, Tensor]:
    """Peaks -> boxes (B, K, 4) in output-grid units, scores (B, K), classes (B, K) (REFERENCE §4.3).

    `hm` holds probabilities; a box is (cx + ox ± w/2, cy + oy ± h/2) at each of the top-K peaks; `peaks` is
    `heatmap_peaks` or its graph form `export_peaks`.
    """
    return decode_centres(hm, wh, reg, k, peaks)[:3]


def decode_centres(hm: Tensor, wh: Tensor, reg: Tensor, k: int, peaks: Callable[..., tuple[Tensor, ...]] = heatmap_peaks
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """`decode_points` plus the integer peak cells ys, xs (B, K) the boxes were read at (REFERENCE §4.3)."""
    scores, classes, ys, xs = peaks(hm, k)
    b = scores.shape[0]
    ind = ys * hm.shape[-1] + xs
    idx = ind.unsqueeze(1).expand(-1, 2, -1)
    size = wh.reshape(b, 2, -1).gather(2, idx)
    off = reg.reshape(b, 2, -1).gather(2, idx)
    cx = xs.float() + off[:, 0]
    cy = ys.float() + off[:, 1]
    half_w, half_h = size[:, 0] / 2, size[:, 1] / 2
    return torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=-1), scores, classes, ys, xs


@dataclass(frozen=True)
class PointsDecoding:
    """Objects-as-points decode settings (REFERENCE §4.3): the top-K centre peaks."""

    k: int


class CenterNetPointsDetector(Detector):
    """Objects as points: a box per centre peak, sized by `wh` and shifted by `reg`."""

    heads = ("hm", "wh", "reg")
    heat_heads = ("hm",)
    export_outputs = ("boxes", "scores", "classes")
    error_rows = (  # objects as points Table 7
        (("wh",), "w/ gt size"),
        (("hm",), "w/ gt heatmap"),
        (("hm", "wh"), "w/ gt heatmap+size"),
        (("hm", "wh", "reg"), "w/ gt hm.+size+offset"),
    )

    def __init__(self, recipe: Recipe, network: nn.Module | None = None) -> None:
        super().__init__(recipe, network)
        self.decoding = PointsDecoding(k=recipe.test.k)

    @staticmethod
    def build_network(backbone: nn.Module, model: ModelConfig) -> nn.Module:
        return CenterNetPoints(backbone, model.num_classes, model.head_conv)

    def target_renderer(self) -> TargetRenderer:
        t = self.recipe.targets
        return functools.partial(center_targets, num_classes=self.recipe.model.num_classes, max_objs=t.max_objs,
                                 radius_mode=t.radius_mode, min_overlap=t.min_overlap)

    def loss(self, outputs: list[dict[str, Tensor]], targets: dict[str, Tensor]) -> dict[str, Tensor]:
        """L = L_k + λsize·L_size + λoff·L_off (objects as points eq. 4), each term averaged over stacks."""
        w = self.recipe.loss
        n = len(outputs)
        hm = sum(focal_loss(heat_sigmoid(o["hm"]), targets["hm"]) for o in outputs) / n
        wh = sum(reg_l1_loss(o["wh"], targets["ind"], targets["reg_mask"], targets["wh"]) for o in outputs) / n
        off = sum(reg_l1_loss(o["reg"], targets["ind"], targets["reg_mask"], targets["reg"]) for o in outputs) / n
        total = w.hm_weight * hm + w.wh_weight * wh + w.off_weight * off
        return {"loss": total, "hm_loss": hm, "wh_loss": wh, "off_loss": off}

    def decode(self, outputs: dict[str, Tensor], flip: bool) -> ScaleOutput:
        """The top-K boxes of one image; under flip the heads are averaged first (REFERENCE §4.6)."""
        merged = merged_heads(outputs, flip)
        boxes, scores, classes = decode_points(merged["hm"], merged["wh"], merged["reg"], self.decoding.k)
        return ScaleOutput(Detections(boxes[0], scores[0], classes[0]))

    def export_decode(self, outputs: dict[str, Tensor], flip: bool, down: tuple[Any, Any]) -> dict[str, Tensor]:
        """`decode` in graph form for a batch: the top-K boxes of each image, scores >= 0 (REFERENCE §4.3, §4.6)."""
        merged = merged_heads(outputs, flip)
        boxes, scores, classes = decode_points(merged["hm"], merged["wh"], merged["reg"], self.decoding.k, export_peaks)
        return {"boxes": to_input_pixels(boxes, down), "scores": scores, "classes": classes}

    def gt_heads(self, boxes: np.ndarray, classes: np.ndarray, out_hw: tuple[int, int]) -> dict[str, Tensor]:
        """hm is the rendered heatmap as logits; wh and reg are filled outward from each centre so that a peak
        anywhere reads a ground-truth value (XZ `gen_oracle_map`, objects as points Table 7, REFERENCE §6)."""
        t = self.recipe.targets
        rendered = center_targets(boxes, classes, self.recipe.model.num_classes, out_hw, max(len(boxes), 1),
                                  t.radius_mode, t.min_overlap)
        hm = torch.logit(torch.from_numpy(rendered["hm"]).clamp(1e-6, 1 - 1e-6))
        dense = {k: torch.from_numpy(dense_from_centers(rendered[k], rendered["ind"], rendered["reg_mask"], out_hw))
                 for k in ("wh", "reg")}
        return {"hm": hm[None], "wh": dense["wh"][None], "reg": dense["reg"][None]}
