"""CentripetalNet (Dong et al. 2020): corners matched by centripetal shifts instead of embeddings.

Per stack and corner type (REFERENCE §1.6): CornerNet's corner pooling module, heat and offset heads, a
guiding-shift head, the cross-star deformable convolution — a 3x3 DCN on the pooled features whose
offsets come from a 1x1 conv on the *detached* guiding shift (§3.2) — and a centripetal-shift head on
the adapted features (§3.1). Targets: guiding shift linear from the integer corner, centripetal shift
log from the float corner (eq. 1, 7; REFERENCE §2.4). Loss: focal + offsets + 0.05·guiding +
1·centripetal, tl/br averaged and stacks summed as the official code and mmdetection do (eq. 9,
REFERENCE §3.4). Decode: top-K corners, centres from exp(centripetal shift), kept when both centres lie
strictly inside the box's central region, μ by the recipe's rule (eq. 3-5, REFERENCE §4.4).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.ops import DeformConv2d

from kpnet.config import ModelConfig
from kpnet.detectors.base import Detections, ScaleOutput, TargetRenderer
from kpnet.detectors.corner import CornerDetector, CornerNetwork, gt_maps, keypoints, unflip_x
from kpnet.layers import kp_head
from kpnet.losses import focal_loss, gather_feat, heat_sigmoid, reg_smooth_l1_loss
from kpnet.ops import group_corners
from kpnet.targets import STRIDE, corner_targets, dense_from_centers

HEADS = ("tl_heat", "br_heat", "tl_regr", "br_regr", "tl_guiding_shift", "br_guiding_shift",
         "tl_centripetal_shift", "br_centripetal_shift")
MU_RULES = {  # test.centripetal_mu -> (μ for area <= centripetal_area, μ above), REFERENCE §4.4
    "official": (1 / 2.1, 1 / 2.4),  # KD `_decode_center`
    "paper": (1 / 2.4, 1 / 2.1),  # CentripetalNet §4.1: 1/2.1 for boxes larger than 3500
    "mmdetection": (1 / 2.4, 1 / 2.1),  # `centripetal_head` (its comment says the opposite of its values)
}
SHIFTS = {"guiding_shift": "guiding", "centripetal_shift": "centripetal"}  # head -> loss term


class CrossStarShift(nn.Module):
    """Guiding shift -> cross-star deformable conv -> centripetal shift on one corner's pooled features (§3.1-3.2).

    The DCN offsets (2·3·3 = 18 channels) come from a 1x1 conv on the detached guiding shift, so the
    guiding-shift loss alone shapes them (REFERENCE §1.6: offset init std 0.1, DCN init std 0.01, no biases).
    """

    def __init__(self, dim: int, head_mid: int) -> None:
        super().__init__()
        self.guiding_shift = kp_head(dim, head_mid, 2)
        self.dcn_offset = nn.Conv2d(2, 18, 1, bias=False)
        self.dcn = DeformConv2d(dim, dim, 3, padding=1, bias=False)
        self.centripetal_shift = kp_head(dim, head_mid, 2)
        nn.init.normal_(self.dcn_offset.weight, std=0.1)
        nn.init.normal_(self.dcn.weight, std=0.01)

    def forward(self, pooled: Tensor) -> tuple[Tensor, Tensor]:
        guiding = self.guiding_shift(pooled)
        offset = self.dcn_offset(guiding.detach())
        # torchvision's CPU deformable convolution has no bfloat16 kernel: it runs in float32 under autocast.
        with torch.autocast(pooled.device.type, enabled=False):
            adapted = self.dcn(pooled.float(), offset.float())
        return guiding, self.centripetal_shift(adapted)


class CentripetalNetwork(CornerNetwork):
    """CornerNet's network without embedding heads, plus a `CrossStarShift` per stack and corner type."""

    def __init__(self, backbone: nn.Module, num_classes: int, head_mid: int | None = None) -> None:
        super().__init__(backbone, num_classes, cascade=False, head_mid=head_mid, embeddings=False)
        dim = backbone.out_channels
        head_mid = head_mid or dim
        self.tl_shifts = nn.ModuleList(CrossStarShift(dim, head_mid) for _ in range(backbone.num_stacks))
        self.br_shifts = nn.ModuleList(CrossStarShift(dim, head_mid) for _ in range(backbone.num_stacks))

    def corner_features(self, stack: int, tl: Tensor, br: Tensor) -> dict[str, Tensor]:
        """The guiding and centripetal shifts (2 each) of both corner types."""
        tl_guiding, tl_centripetal = self.tl_shifts[stack](tl)
        br_guiding, br_centripetal = self.br_shifts[stack](br)
        return {"tl_guiding_shift": tl_guiding, "br_guiding_shift": br_guiding,
                "tl_centripetal_shift": tl_centripetal, "br_centripetal_shift": br_centripetal}


@dataclass(frozen=True)
class CentripetalDecoding:
    """Centripetal matching settings (REFERENCE §4.4): K corners, pairs kept, μ below / above the area switch
    (input pixels), and whether eq. 5's distance weighting multiplies the score."""

    k: int
    num_dets: int
    mu_small: float
    mu_large: float
    mu_area: float
    weighting: bool


def shifted_centres(xs: Tensor, ys: Tensor, shift: Tensor, ind: Tensor, sign: float) -> tuple[Tensor, Tensor]:
    """Centres decoded from corners (B, K) and a centripetal-shift map: corner + sign·exp(shift) per axis (eq. 1)."""
    s = gather_feat(shift, ind).float().exp()
    return xs + sign * s[..., 0], ys + sign * s[..., 1]


class CentripetalNetDetector(CornerDetector):
    """CentripetalNet: pairs matched when both corners' centripetal centres fall in the box's central region."""

    heads = HEADS
    heat_heads = ("tl_heat", "br_heat")
    error_rows = (  # the CornerNet Table 3 progression, with the centripetal shifts in place of embeddings
        (("tl_heat", "br_heat"), "w/ gt heatmaps"),
        (("tl_heat", "br_heat", "tl_regr", "br_regr"), "w/ gt heatmaps + offsets"),
        (("tl_heat", "br_heat", "tl_regr", "br_regr", "tl_centripetal_shift", "br_centripetal_shift"),
         "w/ gt heatmaps + offsets + centripetal shifts"),
        (HEADS, "w/ gt all heads"),
    )
    has_central_regions = True
    export_outputs = ()  # no graph form of the centripetal matching yet: `kpnet export --heads-only` only
    decoding: CentripetalDecoding

    @staticmethod
    def build_network(backbone: nn.Module, model: ModelConfig) -> nn.Module:
        return CentripetalNetwork(backbone, model.num_classes)

    def decode_settings(self) -> CentripetalDecoding:
        t = self.recipe.test
        small, large = MU_RULES[t.centripetal_mu]
        return CentripetalDecoding(k=t.k, num_dets=t.num_dets, mu_small=small, mu_large=large,
                                   mu_area=t.centripetal_area, weighting=t.centripetal_weighting)

    def target_renderer(self) -> TargetRenderer:
        t = self.recipe.targets
        return functools.partial(corner_targets, num_classes=self.recipe.model.num_classes, max_objs=t.max_objs,
                                 radius_mode=t.radius_mode, min_overlap=t.min_overlap, shifts=True)

    def loss(self, outputs: list[dict[str, Tensor]], targets: dict[str, Tensor]) -> dict[str, Tensor]:
        """L = L_det + L_off + 0.05·L_δ + 1·L_cs (eq. 9): each term (tl + br)/2 per stack, summed over stacks;
        offsets and shifts SmoothL1 at the ground-truth corners / N (eq. 2, 6; REFERENCE §3.4)."""
        w = self.recipe.loss
        mask = targets["tag_mask"]
        terms = {"focal": 0.0, "off": 0.0, "guiding": 0.0, "centripetal": 0.0}
        for o in outputs:
            for kind in ("tl", "br"):
                ind = targets[f"{kind}_ind"]
                terms["focal"] = terms["focal"] + focal_loss(heat_sigmoid(o[f"{kind}_heat"]), targets[f"{kind}_heat"]) / 2
                terms["off"] = terms["off"] + reg_smooth_l1_loss(o[f"{kind}_regr"], ind, mask, targets[f"{kind}_regr"]) / 2
                for head, term in SHIFTS.items():
                    key = f"{kind}_{head}"
                    terms[term] = terms[term] + reg_smooth_l1_loss(o[key], ind, mask, targets[key]) / 2
        total = (w.hm_weight * terms["focal"] + w.off_weight * terms["off"] + w.guiding_weight * terms["guiding"]
                 + w.centripetal_weight * terms["centripetal"])
        return {"loss": total, **{f"{k}_loss": v for k, v in terms.items()}}

    def decode(self, outputs: dict[str, Tensor], flip: bool) -> ScaleOutput:
        """Top-K corners with offsets; centres tl + exp(cs_tl) and br − exp(cs_br); a pair is kept when the classes
        agree, br >= tl and all four centre coordinates lie strictly inside the central region (eq. 3-4), scored
        by the corners' mean (or × eq. 5); the best `num_dets`, flipped copy un-flipped and concatenated."""
        d = self.decoding
        heat = outputs["tl_heat"]
        down = self.input_stride(heat.shape[-2], heat.shape[-1])
        tl_s, tl_c, tl_x, tl_y, tl_i = keypoints(heat.sigmoid(), outputs["tl_regr"], d.k)
        br_s, br_c, br_x, br_y, br_i = keypoints(outputs["br_heat"].sigmoid(), outputs["br_regr"], d.k)
        tl_cx, tl_cy = shifted_centres(tl_x, tl_y, outputs["tl_centripetal_shift"], tl_i, 1.0)
        br_cx, br_cy = shifted_centres(br_x, br_y, outputs["br_centripetal_shift"], br_i, -1.0)
        groups = group_corners(
            tl_s, tl_c, tl_x, tl_y, br_s, br_c, br_x, br_y, mode="centripetal",
            tl_ct_xs=tl_cx, tl_ct_ys=tl_cy, br_ct_xs=br_cx, br_ct_ys=br_cy,
            mu_area=d.mu_area / (down[0] * down[1]), mu_small=d.mu_small, mu_large=d.mu_large,
            centripetal_weighting=d.weighting, allow_zero_size=True, num_dets=d.num_dets,
        )
        tl_index, br_index = groups.tl_index, groups.br_index
        corner_scores = torch.stack([torch.gather(tl_s, 1, tl_index), torch.gather(br_s, 1, br_index)], -1)
        centres = torch.stack([torch.gather(tl_cx, 1, tl_index), torch.gather(tl_cy, 1, tl_index),
                               torch.gather(br_cx, 1, br_index), torch.gather(br_cy, 1, br_index)], -1)
        boxes = groups.boxes
        if flip:
            width = heat.shape[-1]
            boxes = torch.stack([boxes[0], unflip_x(boxes[1], width)])
            centres = torch.stack([centres[0], unflip_x(centres[1].reshape(-1, 2), width).reshape(-1, 4)])
        dets = Detections(boxes.flatten(0, 1), groups.scores.flatten(), groups.classes.flatten(),
                          corner_scores.flatten(0, 1), centres=centres.flatten(0, 1))
        return ScaleOutput(dets.select(dets.scores > -1))

    def central_regions(self, dets: Detections) -> tuple[Tensor, Tensor]:
        """Each box's central region (eq. 3-4, μ by the box's area in image pixels, which equal input pixels at
        scale 1) and the two centres its corners decoded (tl then br)."""
        d = self.decoding
        x1, y1, x2, y2 = dets.boxes.unbind(-1)
        w, h = x2 - x1, y2 - y1
        mu = torch.where((w * h).abs() <= d.mu_area, d.mu_small, d.mu_large).to(dets.boxes.dtype)
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        regions = torch.stack([cx - mu * w / 2, cy - mu * h / 2, cx + mu * w / 2, cy + mu * h / 2], -1)
        centres = dets.centres if dets.centres is not None else torch.full((len(dets), 4), float("nan"))
        return regions, centres

    def input_stride(self, out_h: int, out_w: int) -> tuple[float, float]:
        """Input pixels per output cell along x and y for this recipe's test pad rule: inp = 4·out − (1 − pad_add)."""
        add = self.recipe.test.pad_add
        return ((STRIDE * out_w - (1 - add)) / out_w, (STRIDE * out_h - (1 - add)) / out_h)

    def gt_heads(self, boxes: np.ndarray, classes: np.ndarray, out_hw: tuple[int, int]) -> dict[str, Tensor]:
        """Ground-truth heatmaps and offsets (as CornerNet's) plus both shifts filled outward from each corner cell."""
        t = self.recipe.targets
        rendered = corner_targets(boxes, classes, self.recipe.model.num_classes, out_hw, max(len(boxes), 1),
                                  t.radius_mode, t.min_overlap, shifts=True)
        heads = gt_maps(rendered, out_hw, ("tl", "br"), embeddings=False)
        for kind in ("tl", "br"):
            for head in SHIFTS:
                key = f"{kind}_{head}"
                dense = dense_from_centers(rendered[key], rendered[f"{kind}_ind"], rendered["tag_mask"], out_hw)
                heads[key] = torch.from_numpy(dense)[None]
        return heads
