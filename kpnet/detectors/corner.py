"""Corner-family building blocks that CornerNet and the triplet family compose (and CentripetalNet will):
the network with per-stack top-left / bottom-right prediction modules (CornerNet §3.1, Fig. 4 and 7;
REFERENCE §1.2-1.3), corner keypoints and the flip rule (§4.1, REFERENCE §4.1, §4.6), the loss terms
(eq. 1-6 with the CN normalisation, REFERENCE §3) and ground-truth heads for error analysis (Table 3).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from kpnet.config import Recipe
from kpnet.detectors.base import Detections, Detector, ScaleOutput, TargetRenderer
from kpnet.detectors.corner_modules import BOTTOM_RIGHT, TOP_LEFT, CascadeCornerPool, CornerPool
from kpnet.export.decode import export_pairs, export_peaks, flip_halves, to_input_pixels
from kpnet.layers import HEAT_BIAS, kp_head
from kpnet.losses import ae_loss, focal_loss, gather_feat, heat_sigmoid, reg_smooth_l1_loss
from kpnet.ops import group_corners, heatmap_peaks
from kpnet.targets import corner_targets, dense_from_centers

CORNER_HEADS = ("tl_heat", "br_heat", "tl_tag", "br_tag", "tl_regr", "br_regr")
NMS_KERNEL = 3  # the max-pool window of the peak test (REFERENCE §4.1 step 2)


class CornerNetwork(nn.Module):
    """Backbone + per-stack TL/BR prediction modules; forward returns raw head outputs (logits).

    In training one dict per stack (intermediate supervision); in eval only the last stack's heads
    run (CornerNet `kp._test`). `cascade=True` swaps in cascade corner pooling: the "CornerNet + CCP"
    row of the triplet paper's Table 4; `embeddings=False` leaves out the embedding heads (CentripetalNet).
    Pool/head widths default to the paper's 256 -> 128 / 256 scaled to `backbone.out_channels`.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        cascade: bool = False,
        pool_mid: int | None = None,
        head_mid: int | None = None,
        embeddings: bool = True,
    ) -> None:
        super().__init__()
        dim = backbone.out_channels
        stacks = backbone.num_stacks
        pool_mid = pool_mid or dim // 2
        head_mid = head_mid or dim
        pool = CascadeCornerPool if cascade else CornerPool
        self.backbone = backbone
        self.num_classes = num_classes
        self.cascade = cascade
        self.tl_pools = nn.ModuleList(pool(TOP_LEFT, dim, pool_mid) for _ in range(stacks))
        self.br_pools = nn.ModuleList(pool(BOTTOM_RIGHT, dim, pool_mid) for _ in range(stacks))
        self.tl_heats = nn.ModuleList(kp_head(dim, head_mid, num_classes, HEAT_BIAS) for _ in range(stacks))
        self.br_heats = nn.ModuleList(kp_head(dim, head_mid, num_classes, HEAT_BIAS) for _ in range(stacks))
        self.embeddings = embeddings
        if embeddings:
            self.tl_tags = nn.ModuleList(kp_head(dim, head_mid, 1) for _ in range(stacks))
            self.br_tags = nn.ModuleList(kp_head(dim, head_mid, 1) for _ in range(stacks))
        self.tl_regrs = nn.ModuleList(kp_head(dim, head_mid, 2) for _ in range(stacks))
        self.br_regrs = nn.ModuleList(kp_head(dim, head_mid, 2) for _ in range(stacks))

    def stack_outputs(self, stack: int, feature: Tensor) -> dict[str, Tensor]:
        """Head outputs of one stack: heatmaps (C), embeddings (1) and offsets (2) per corner type."""
        tl = self.tl_pools[stack](feature)
        br = self.br_pools[stack](feature)
        outputs = {"tl_heat": self.tl_heats[stack](tl), "br_heat": self.br_heats[stack](br)}
        if self.embeddings:
            outputs.update(tl_tag=self.tl_tags[stack](tl), br_tag=self.br_tags[stack](br))
        outputs.update(tl_regr=self.tl_regrs[stack](tl), br_regr=self.br_regrs[stack](br))
        outputs.update(self.corner_features(stack, tl, br))
        return outputs

    def corner_features(self, stack: int, tl: Tensor, br: Tensor) -> dict[str, Tensor]:
        """Further heads on the pooled corner features of one stack (none here; CentripetalNet adds its shifts)."""
        return {}

    def forward(self, images: Tensor) -> list[dict[str, Tensor]]:
        features = self.backbone(images)
        stacks = range(len(features)) if self.training else [len(features) - 1]
        return [self.stack_outputs(stack, features[stack]) for stack in stacks]


def keypoints(heat: Tensor, regr: Tensor, k: int, peaks: Callable[..., tuple[Tensor, ...]] = heatmap_peaks
              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Top-K peaks of a probability heatmap with their offsets added: (scores, classes, xs, ys, flat index), each
    (B, K); `peaks` is `heatmap_peaks` or its graph form `export_peaks`."""
    scores, classes, ys, xs = peaks(heat, k, NMS_KERNEL)
    ind = ys * heat.shape[-1] + xs
    off = gather_feat(regr, ind).float()
    return scores, classes, xs.float() + off[..., 0], ys.float() + off[..., 1], ind


def unflip_x(coords: Tensor, width: int) -> Tensor:
    """x, y pairs of a horizontally flipped input back to the original frame: x ↦ W − x (REFERENCE §4.6).

    For boxes (x1, y1, x2, y2) the two x swap, so x1' = W − x2 and x2' = W − x1.
    """
    out = coords.clone()
    if coords.shape[-1] == 4:
        out[..., 0] = width - coords[..., 2]
        out[..., 2] = width - coords[..., 0]
    else:
        out[..., 0] = width - coords[..., 0]
    return out


def decode_pairs(
    outputs: dict[str, Tensor], k: int, ae_threshold: float, num_dets: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Corner pairs of a batch -> boxes (B, D, 4), scores (B, D), classes (B, D), corner scores (B, D, 2)
    in output-grid units (REFERENCE §4.1).

    The top-K corners of each type (3x3 max-pool NMS) get their offsets; every K×K pair scores
    (s_tl + s_br)/2 and is rejected (-1) when the classes differ, |e_tl − e_br| > ae_threshold or
    br < tl; the best `num_dets` pairs are returned.
    """
    tl_s, tl_c, tl_x, tl_y, tl_i = keypoints(outputs["tl_heat"].sigmoid(), outputs["tl_regr"], k)
    br_s, br_c, br_x, br_y, br_i = keypoints(outputs["br_heat"].sigmoid(), outputs["br_regr"], k)
    groups = group_corners(
        tl_s, tl_c, tl_x, tl_y, br_s, br_c, br_x, br_y, mode="ae",
        tl_embed=gather_feat(outputs["tl_tag"], tl_i)[..., 0].float(),
        br_embed=gather_feat(outputs["br_tag"], br_i)[..., 0].float(),
        ae_threshold=ae_threshold, allow_zero_size=True, num_dets=num_dets,
    )
    corner_scores = torch.stack([torch.gather(tl_s, 1, groups.tl_index), torch.gather(br_s, 1, groups.br_index)], -1)
    return groups.boxes, groups.scores, groups.classes, corner_scores


def corner_terms(outputs: list[dict[str, Tensor]], targets: dict[str, Tensor], kinds: tuple[str, ...]) -> dict[str, Tensor]:
    """Each loss term summed over the keypoint `kinds` ("tl", "br"[, "ct"]) and averaged over stacks (REFERENCE §3.4).

    focal: eq. 1 per heatmap; off: SmoothL1 / N per keypoint kind (eq. 2-3, 6); pull, push: eq. 4-5 on tl/br.
    """
    n = len(outputs)
    mask = targets["tag_mask"]
    terms = {"focal": 0.0, "pull": 0.0, "push": 0.0, "off": 0.0}
    for o in outputs:
        for kind in kinds:
            terms["focal"] = terms["focal"] + focal_loss(heat_sigmoid(o[f"{kind}_heat"]), targets[f"{kind}_heat"])
            terms["off"] = terms["off"] + reg_smooth_l1_loss(
                o[f"{kind}_regr"], targets[f"{kind}_ind"], mask, targets[f"{kind}_regr"]
            )
        pull, push = ae_loss(o["tl_tag"], o["br_tag"], targets["tl_ind"], targets["br_ind"], mask)
        terms["pull"] = terms["pull"] + pull
        terms["push"] = terms["push"] + push
    return {k: v / n for k, v in terms.items()}


def embedding_groups(tl_ind: np.ndarray, br_ind: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """One ground-truth embedding value per object, shared only by objects linked through a shared corner cell.

    A one-channel embedding map holds one value per cell, so objects whose top-left (or bottom-right)
    corners fall in the same cell must carry the same value; linked objects form a group (union-find).
    """
    parent = list(range(len(mask)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    valid = np.flatnonzero(mask > 0)
    for ind in (tl_ind, br_ind):
        first: dict[int, int] = {}
        for i in valid:
            j = first.setdefault(int(ind[i]), int(i))
            parent[root(int(i))] = root(j)
    return np.array([root(i) for i in range(len(mask))], np.float32)


def gt_maps(t: dict[str, np.ndarray], out_hw: tuple[int, int], kinds: tuple[str, ...],
            embeddings: bool = True) -> dict[str, Tensor]:
    """Rendered targets as (1, ·, H, W) network outputs: heat as logits, offsets and embeddings filled outward
    from each keypoint cell (nearest cell wins), embeddings from `embedding_groups` (CornerNet Table 3 oracle)."""
    mask = t["tag_mask"]
    objects = embedding_groups(t["tl_ind"], t["br_ind"], mask)[:, None] if embeddings else None
    heads: dict[str, Tensor] = {}
    for kind in kinds:
        heat = torch.from_numpy(t[f"{kind}_heat"]).clamp(1e-6, 1 - 1e-6)
        heads[f"{kind}_heat"] = torch.logit(heat)[None]
        heads[f"{kind}_regr"] = torch.from_numpy(dense_from_centers(t[f"{kind}_regr"], t[f"{kind}_ind"], mask, out_hw))[None]
        if objects is not None and kind != "ct":
            heads[f"{kind}_tag"] = torch.from_numpy(dense_from_centers(objects, t[f"{kind}_ind"], mask, out_hw))[None]
    return heads


@dataclass(frozen=True)
class CornerDecoding:
    """Corner-pair decode settings (REFERENCE §4.1): K corners per type, the embedding threshold, pairs kept."""

    k: int
    ae_threshold: float
    num_dets: int


class CornerDetector(Detector):
    """What every corner family shares: corner targets, the CornerNet loss over its keypoint `kinds`, the
    pair decode with flip by concatenation (REFERENCE §4.6) and ground-truth heads."""

    kinds: ClassVar[tuple[str, ...]] = ("tl", "br")
    export_outputs: ClassVar[tuple[str, ...]] = ("boxes", "scores", "classes", "corner_scores")

    def __init__(self, recipe: Recipe, network: nn.Module | None = None) -> None:
        super().__init__(recipe, network)
        self.decoding = self.decode_settings()

    def decode_settings(self) -> CornerDecoding:
        t = self.recipe.test
        return CornerDecoding(k=t.k, ae_threshold=t.ae_threshold, num_dets=t.num_dets)

    def target_renderer(self) -> TargetRenderer:
        t = self.recipe.targets
        return functools.partial(corner_targets, num_classes=self.recipe.model.num_classes, max_objs=t.max_objs,
                                 radius_mode=t.radius_mode, min_overlap=t.min_overlap, centers="ct" in self.kinds)

    def loss(self, outputs: list[dict[str, Tensor]], targets: dict[str, Tensor]) -> dict[str, Tensor]:
        """L = L_det + 0.1·L_pull + 0.1·L_push + L_off (CornerNet eq. 7; triplet eq. 2 adds the centre's focal
        and offset terms), keypoint kinds summed, stacks averaged; weights from the recipe's `loss`."""
        w = self.recipe.loss
        t = corner_terms(outputs, targets, self.kinds)
        total = w.hm_weight * t["focal"] + w.pull_weight * t["pull"] + w.push_weight * t["push"] + w.off_weight * t["off"]
        return {"loss": total, "focal_loss": t["focal"], "pull_loss": t["pull"], "push_loss": t["push"], "off_loss": t["off"]}

    def decode(self, outputs: dict[str, Tensor], flip: bool) -> ScaleOutput:
        """Corner pairs of the image, then the un-flipped pairs of its flipped copy, concatenated, not
        averaged (REFERENCE §4.6); rejected pairs (score −1) dropped."""
        d = self.decoding
        boxes, scores, classes, corner_scores = decode_pairs(outputs, d.k, d.ae_threshold, d.num_dets)
        if flip:
            boxes = torch.stack([boxes[0], unflip_x(boxes[1], outputs["tl_heat"].shape[-1])])
        dets = Detections(boxes.flatten(0, 1), scores.flatten(), classes.flatten(), corner_scores.flatten(0, 1))
        return ScaleOutput(dets.select(dets.scores > -1))

    def export_decode(self, outputs: dict[str, Tensor], flip: bool, down: tuple[Any, Any]) -> dict[str, Tensor]:
        """`decode` in graph form: the best num_dets pairs of each image (then those of its flipped copy, un-flipped
        and concatenated under flip), rejected pairs kept with score −1 (REFERENCE §4.1, §4.6)."""
        d = self.decoding
        corners = []
        for kind in ("tl", "br"):
            s, c, x, y, ind = keypoints(outputs[f"{kind}_heat"].sigmoid(), outputs[f"{kind}_regr"], d.k, export_peaks)
            corners.append((s, c, x, y, gather_feat(outputs[f"{kind}_tag"], ind)[..., 0].float()))
        pairs = export_pairs(corners[0], corners[1], d.ae_threshold, d.num_dets)
        corner_scores = torch.stack([torch.gather(corners[0][0], 1, pairs.tl_index),
                                     torch.gather(corners[1][0], 1, pairs.br_index)], -1)
        boxes, scores, classes = pairs.boxes, pairs.scores, pairs.classes
        if flip:
            boxes, flipped = flip_halves(boxes)
            boxes = torch.cat([boxes, unflip_x(flipped, outputs["tl_heat"].shape[-1])], 1)
            scores, classes, corner_scores = (torch.cat(flip_halves(t), 1) for t in (scores, classes, corner_scores))
        return {"boxes": to_input_pixels(boxes, down), "scores": scores, "classes": classes, "corner_scores": corner_scores}

    def gt_heads(self, boxes: np.ndarray, classes: np.ndarray, out_hw: tuple[int, int]) -> dict[str, Tensor]:
        """Ground truth for every head of `kinds` (CornerNet Table 3, triplet Table 5)."""
        t = self.recipe.targets
        rendered = corner_targets(boxes, classes, self.recipe.model.num_classes, out_hw, max(len(boxes), 1),
                                  t.radius_mode, t.min_overlap, centers="ct" in self.kinds)
        return gt_maps(rendered, out_hw, self.kinds)

