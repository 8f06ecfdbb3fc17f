"""CornerNet (Law & Deng 2018): the network — per stack a top-left and a bottom-right prediction
module, each a corner pooling module followed by heatmap, embedding and offset heads (CornerNet §3.1,
Fig. 4 and 7; REFERENCE §1.2-1.3) — its targets (§3.2-3.3, REFERENCE §2), loss (eq. 1-6 with the CN
normalisation, REFERENCE §3) and decoding (§4.1 with flip by concatenation, REFERENCE §4.1, §4.6).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from kpnet.detectors.corner_modules import BOTTOM_RIGHT, TOP_LEFT, CascadeCornerPool, CornerPool
from kpnet.detectors.heads import HEAT_BIAS, kp_head
from kpnet.losses import ae_loss, focal_loss, gather_feat, heat_sigmoid, reg_smooth_l1_loss
from kpnet.ops import group_corners, heatmap_peaks
from kpnet.targets import corner_targets, dense_from_centers

HEADS = ("tl_heat", "br_heat", "tl_tag", "br_tag", "tl_regr", "br_regr")
LOSS_WEIGHTS = ("hm_weight", "pull_weight", "push_weight", "off_weight")  # LossConfig fields passed to `loss`
DETECT_PARAMS = ("k", "ae_threshold", "num_dets")  # TestConfig fields passed to `detect`
NMS_KERNEL = 3


class CornerNet(nn.Module):
    """Backbone + per-stack TL/BR prediction modules; forward returns raw head outputs (logits).

    In training one dict per stack (intermediate supervision); in eval only the last stack's heads
    run (CornerNet `kp._test`). `cascade=True` swaps in cascade corner pooling: the "CornerNet + CCP"
    row of the triplet paper's Table 4. Pool/head widths default to the paper's 256 -> 128 / 256
    scaled to `backbone.out_channels`.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        cascade: bool = False,
        pool_mid: int | None = None,
        head_mid: int | None = None,
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
        self.tl_tags = nn.ModuleList(kp_head(dim, head_mid, 1) for _ in range(stacks))
        self.br_tags = nn.ModuleList(kp_head(dim, head_mid, 1) for _ in range(stacks))
        self.tl_regrs = nn.ModuleList(kp_head(dim, head_mid, 2) for _ in range(stacks))
        self.br_regrs = nn.ModuleList(kp_head(dim, head_mid, 2) for _ in range(stacks))

    def stack_outputs(self, stack: int, feature: Tensor) -> dict[str, Tensor]:
        """Head outputs of one stack: heatmaps (C), embeddings (1) and offsets (2) per corner type."""
        tl = self.tl_pools[stack](feature)
        br = self.br_pools[stack](feature)
        return {
            "tl_heat": self.tl_heats[stack](tl),
            "br_heat": self.br_heats[stack](br),
            "tl_tag": self.tl_tags[stack](tl),
            "br_tag": self.br_tags[stack](br),
            "tl_regr": self.tl_regrs[stack](tl),
            "br_regr": self.br_regrs[stack](br),
        }

    def forward(self, images: Tensor) -> list[dict[str, Tensor]]:
        features = self.backbone(images)
        stacks = range(len(features)) if self.training else [len(features) - 1]
        return [self.stack_outputs(stack, features[stack]) for stack in stacks]


def encode(
    boxes: np.ndarray,
    classes: np.ndarray,
    num_classes: int,
    out_hw: tuple[int, int],
    max_objs: int,
    radius_mode: str,
    min_overlap: float,
) -> dict[str, np.ndarray]:
    """Targets for one image from boxes in output-grid units (CornerNet §3.2-3.3, REFERENCE §2.4)."""
    return corner_targets(boxes, classes, num_classes, out_hw, max_objs, radius_mode, min_overlap)


def corner_terms(outputs: list[dict[str, Tensor]], targets: dict[str, Tensor], kinds: tuple[str, ...]) -> dict[str, Tensor]:
    """Each loss term summed over the corner `kinds` ("tl", "br"[, "ct"]) and averaged over stacks (REFERENCE §3.4).

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


def loss(
    outputs: list[dict[str, Tensor]],
    targets: dict[str, Tensor],
    hm_weight: float = 1.0,
    pull_weight: float = 0.1,
    push_weight: float = 0.1,
    off_weight: float = 1.0,
) -> dict[str, Tensor]:
    """L = L_det + 0.1·L_pull + 0.1·L_push + L_off (CornerNet eq. 7), tl + br summed, stacks averaged."""
    t = corner_terms(outputs, targets, ("tl", "br"))
    total = hm_weight * t["focal"] + pull_weight * t["pull"] + push_weight * t["push"] + off_weight * t["off"]
    return {"loss": total, "focal_loss": t["focal"], "pull_loss": t["pull"], "push_loss": t["push"], "off_loss": t["off"]}


def keypoints(heat: Tensor, regr: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Top-K peaks of a probability heatmap with their offsets added: (scores, classes, xs, ys, flat index), each (B, K)."""
    scores, classes, ys, xs = heatmap_peaks(heat, k, NMS_KERNEL)
    ind = ys * heat.shape[-1] + xs
    off = gather_feat(regr, ind).float()
    return scores, classes, xs.float() + off[..., 0], ys.float() + off[..., 1], ind


def decode(
    tl_heat: Tensor,
    br_heat: Tensor,
    tl_tag: Tensor,
    br_tag: Tensor,
    tl_regr: Tensor,
    br_regr: Tensor,
    k: int = 100,
    ae_threshold: float = 0.5,
    num_dets: int = 1000,
) -> Tensor:
    """Corner pairs -> (B, D, 8): x1, y1, x2, y2, score, class, s_tl, s_br in output-grid units (REFERENCE §4.1).

    Heatmaps hold probabilities. The top-K corners of each type (3x3 max-pool NMS) get their offsets;
    every K×K pair scores (s_tl + s_br)/2 and is rejected (-1) when the classes differ, |e_tl − e_br| >
    ae_threshold or br < tl; the best `num_dets` pairs are returned.
    """
    tl_s, tl_c, tl_x, tl_y, tl_i = keypoints(tl_heat, tl_regr, k)
    br_s, br_c, br_x, br_y, br_i = keypoints(br_heat, br_regr, k)
    groups = group_corners(
        tl_s, tl_c, tl_x, tl_y, br_s, br_c, br_x, br_y, mode="ae",
        tl_embed=gather_feat(tl_tag, tl_i)[..., 0].float(), br_embed=gather_feat(br_tag, br_i)[..., 0].float(),
        ae_threshold=ae_threshold, allow_zero_size=True, num_dets=num_dets,
    )
    s_tl = torch.gather(tl_s, 1, groups.tl_index)
    s_br = torch.gather(br_s, 1, groups.br_index)
    return torch.cat(
        [groups.boxes, groups.scores[..., None], groups.classes[..., None].float(), s_tl[..., None], s_br[..., None]], -1
    )


def unflip(dets: Tensor, width: int) -> Tensor:
    """Boxes of a horizontally flipped input back to the original frame: x ↦ W − x, x1 and x2 swapped (REFERENCE §4.6)."""
    out = dets.clone()
    out[:, 0] = width - dets[:, 2]
    out[:, 2] = width - dets[:, 0]
    return out


def detect(outputs: dict[str, Tensor], flip: bool, k: int = 100, ae_threshold: float = 0.5, num_dets: int = 1000) -> Tensor:
    """Decode one image (a batch of 1, or 2 with its flip) into (N, 8) output-grid boxes with score > −1.

    Under flip the flipped image's boxes are un-flipped and concatenated, not averaged (REFERENCE §4.6).
    """
    dets = decode(
        outputs["tl_heat"].sigmoid(), outputs["br_heat"].sigmoid(), outputs["tl_tag"], outputs["br_tag"],
        outputs["tl_regr"], outputs["br_regr"], k, ae_threshold, num_dets,
    )
    rows = [dets[0]]
    if flip:
        rows.append(unflip(dets[1], outputs["tl_heat"].shape[-1]))
    rows = torch.cat(rows)
    return rows[rows[:, 4] > -1]


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


def gt_maps(t: dict[str, np.ndarray], out_hw: tuple[int, int], kinds: tuple[str, ...]) -> dict[str, Tensor]:
    """Rendered targets as (1, ·, H, W) network outputs: heat as logits, offsets and embeddings filled outward
    from each keypoint cell (nearest cell wins), embeddings from `embedding_groups` (CornerNet Table 3 oracle)."""
    mask = t["tag_mask"]
    objects = embedding_groups(t["tl_ind"], t["br_ind"], mask)[:, None]
    heads: dict[str, Tensor] = {}
    for kind in kinds:
        heat = torch.from_numpy(t[f"{kind}_heat"]).clamp(1e-6, 1 - 1e-6)
        heads[f"{kind}_heat"] = torch.logit(heat)[None]
        heads[f"{kind}_regr"] = torch.from_numpy(dense_from_centers(t[f"{kind}_regr"], t[f"{kind}_ind"], mask, out_hw))[None]
        if kind != "ct":
            heads[f"{kind}_tag"] = torch.from_numpy(dense_from_centers(objects, t[f"{kind}_ind"], mask, out_hw))[None]
    return heads


def gt_heads(
    boxes: np.ndarray, classes: np.ndarray, num_classes: int, out_hw: tuple[int, int], radius_mode: str, min_overlap: float
) -> dict[str, Tensor]:
    """Ground truth shaped as network outputs for a batch of one (CornerNet Table 3 error analysis)."""
    t = corner_targets(boxes, classes, num_classes, out_hw, max(len(boxes), 1), radius_mode, min_overlap)
    return gt_maps(t, out_hw, ("tl", "br"))


__all__ = ["HEADS", "CornerNet", "decode", "detect", "encode", "gt_heads", "loss"]
