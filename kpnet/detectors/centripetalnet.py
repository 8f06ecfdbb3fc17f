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
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.ops import DeformConv2d

from kpnet.config import ModelConfig
from kpnet.detectors.base import Detections, MaskEncoder, ScaleOutput, TargetRenderer
from kpnet.detectors.corner import CornerDetector, CornerNetwork, gt_maps, keypoints, unflip_x
from kpnet.export.decode import export_peaks, flip_halves, to_input_pixels, top_pairs
from kpnet.layers import kp_head
from kpnet.masks import MaskHead, mask_loss, rois_of
from kpnet.losses import focal_loss, gather_feat, heat_sigmoid, reg_smooth_l1_loss
from kpnet.ops import group_corners
from kpnet.ops.decoding import pair_scores_reference
from kpnet.targets import STRIDE, corner_targets, dense_from_centers, mask_targets

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

    def __init__(self, backbone: nn.Module, num_classes: int, head_mid: int | None = None, mask: bool = False) -> None:
        super().__init__(backbone, num_classes, cascade=False, head_mid=head_mid, embeddings=False)
        dim = backbone.out_channels
        head_mid = head_mid or dim
        self.tl_shifts = nn.ModuleList(CrossStarShift(dim, head_mid) for _ in range(backbone.num_stacks))
        self.br_shifts = nn.ModuleList(CrossStarShift(dim, head_mid) for _ in range(backbone.num_stacks))
        self.num_stacks = backbone.num_stacks
        self.mask_head = MaskHead(dim, num_classes) if mask else None

    def stack_outputs(self, stack: int, feature: Tensor) -> dict[str, Tensor]:
        """The stack's heads; with the mask head, the last stack also returns its backbone features as
        `mask_features`, which the mask head reads (only the last stack's, CentripetalNet §3.4)."""
        outputs = super().stack_outputs(stack, feature)
        if self.mask_head is not None and stack == self.num_stacks - 1:
            outputs["mask_features"] = feature
        return outputs

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
    export_outputs = ("boxes", "scores", "classes", "corner_scores", "centres")
    export_meanings = {"centres": "(N, D, 4) the centres decoded from each box's tl and br corners' centripetal "
                                  "shifts, x, y each, in input pixels"}
    decoding: CentripetalDecoding

    @staticmethod
    def build_network(backbone: nn.Module, model: ModelConfig) -> nn.Module:
        return CentripetalNetwork(backbone, model.num_classes, mask=model.mask)

    @property
    def has_masks(self) -> bool:
        return self.recipe.model.mask

    def mask_encoder(self, ratio: float, out_hw: tuple[int, int]) -> MaskEncoder | None:
        """Mask targets for the objects the corner targets keep (`targets.mask_targets`), with the mask head."""
        if not self.has_masks:
            return None
        return functools.partial(mask_targets, ratio=ratio, out_hw=out_hw, max_objs=self.recipe.targets.max_objs)

    def predict_masks(self, dets: Detections, per_scale: Sequence[ScaleOutput]) -> Detections:
        """Masks of the final detections from the scale closest to 1 (the top-k proposals of §3.3 are these boxes:
        a mask depends only on its box and features, so masking after soft-NMS gives the kept boxes' masks);
        unchanged when no scale carries mask features."""
        grids = [s.mask_features for s in per_scale if s.mask_features is not None]
        if not grids:  # heads that did not come from the network (all-ground-truth error analysis)
            return dets
        grid = min(grids, key=lambda g: abs(math.log(g.meta["scale"])))
        rois = rois_of(grid.to_grid(dets.boxes), torch.zeros(len(dets)))
        with torch.no_grad():
            logits = self.network.mask_head(grid.features, rois, dets.classes)
        return dets.replace(masks=logits.float().sigmoid().cpu())

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
        """L = L_det + L_off + 0.05·L_δ + 1·L_cs (+ L_mask with the mask head) (eq. 9): each term (tl + br)/2 per
        stack, summed over stacks; offsets and shifts SmoothL1 at the ground-truth corners / N (eq. 2, 6; REFERENCE
        §3.4); L_mask on the last stack only (eq. 8, §3.4)."""
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
        if self.has_masks:
            terms["mask"] = mask_loss(self.network.mask_head, outputs[-1]["mask_features"], targets)
            total = total + w.mask_weight * terms["mask"]
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

    def export_decode(self, outputs: dict[str, Tensor], flip: bool, down: tuple[Any, Any]) -> dict[str, Tensor]:
        """`decode` in graph form: every K×K pair scored by the same rule (`pair_scores_reference`, eq. 3-5), the
        best num_dets by one TopK, with both decoded centres; under flip the flipped copy's pairs un-flipped and
        concatenated; rejected pairs kept with score −1; coordinates in input pixels."""
        d = self.decoding
        corners, centres = [], []
        for kind, sign in (("tl", 1.0), ("br", -1.0)):
            s, c, x, y, ind = keypoints(outputs[f"{kind}_heat"].sigmoid(), outputs[f"{kind}_regr"], d.k, export_peaks)
            corners.append((s, c, x, y))
            centres.append(shifted_centres(x, y, outputs[f"{kind}_centripetal_shift"], ind, sign))
        (tl_s, tl_c, tl_x, tl_y), (br_s, br_c, br_x, br_y) = corners
        score = pair_scores_reference(
            "centripetal", tl_s, tl_c, tl_x, tl_y, br_s, br_c, br_x, br_y, None, None, None, *centres[0], *centres[1],
            d.mu_area / (down[0] * down[1]), d.mu_small, d.mu_large, d.weighting, allow_zero_size=True)
        pairs = top_pairs(score, corners[0], corners[1], d.num_dets)
        corner_scores = torch.stack([torch.gather(tl_s, 1, pairs.tl_index), torch.gather(br_s, 1, pairs.br_index)], -1)
        centre_xy = torch.stack([torch.gather(centres[0][0], 1, pairs.tl_index), torch.gather(centres[0][1], 1, pairs.tl_index),
                                 torch.gather(centres[1][0], 1, pairs.br_index), torch.gather(centres[1][1], 1, pairs.br_index)], -1)
        boxes, scores, classes = pairs.boxes, pairs.scores, pairs.classes
        if flip:
            width = outputs["tl_heat"].shape[-1]
            boxes, flipped = flip_halves(boxes)
            boxes = torch.cat([boxes, unflip_x(flipped, width)], 1)
            centre_xy, flipped = flip_halves(centre_xy)
            unflipped = unflip_x(flipped.reshape(flipped.shape[0], -1, 2), width).reshape(flipped.shape)
            centre_xy = torch.cat([centre_xy, unflipped], 1)
            scores, classes, corner_scores = (torch.cat(flip_halves(t), 1) for t in (scores, classes, corner_scores))
        return {"boxes": to_input_pixels(boxes, down), "scores": scores, "classes": classes,
                "corner_scores": corner_scores, "centres": to_input_pixels(centre_xy, down)}

    def export_scale_output(self, outputs: dict[str, Tensor]) -> ScaleOutput:
        """The kept pairs of one image with both decoded centres, as `decode` returns them (input pixels)."""
        dets = Detections(outputs["boxes"], outputs["scores"], outputs["classes"], outputs["corner_scores"],
                          centres=outputs["centres"])
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

