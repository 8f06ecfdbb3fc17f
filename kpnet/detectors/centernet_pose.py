"""CenterNet, objects as points, for multi-person pose (its §4.2): the points family's person centre, size and offset,
plus the k = 17 COCO joints regressed as offsets from the centre (`hps`, k×2), k joint heatmaps (`hm_hp`) with
their sub-cell offset (`hp_offset`), and decoding that snaps each regressed joint to the nearest joint-heatmap
peak above 0.1 inside the person's box.

Loss (XZ `trains/multi_pose.py` with its `opts.py` defaults): focal(hm) + 0.1·L1(wh) + 1·L1(reg) + 1·L1(hps,
invisible joints masked, per coordinate) + 1·focal(hm_hp) + 1·L1(hp_offset). Flip test (XZ `detectors/multi_pose.py`):
hm, wh, hps and hm_hp averaged with the flipped copy, the flipped joint channels swapped along COCO's flip pairs
and its x offsets negated; reg and hp_offset from the original only.
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
from kpnet.data.poses import FLIP_PAIRS, NUM_JOINTS, flip_permutation
from kpnet.detectors.base import Detections, ScaleOutput, TargetRenderer
from kpnet.detectors.centernet_points import CenterNetPoints, CenterNetPointsDetector, decode_centres, merged_heads
from kpnet.export.decode import export_peaks, flip_halves, to_input_pixels
from kpnet.layers import HEAT_BIAS, kp_head
from kpnet.losses import focal_loss, heat_sigmoid, reg_l1_loss, reg_weighted_l1_loss
from kpnet.ops import heatmap_peaks
from kpnet.targets import dense_from_centers, pose_targets


class CenterNetPose(CenterNetPoints):
    """The points network (hm, wh, reg per stack) plus per stack hps (2J), hm_hp (J) and hp_offset (2) (§4.2, Fig. 4)."""

    def __init__(self, backbone: nn.Module, num_classes: int, head_conv: int, num_joints: int = NUM_JOINTS) -> None:
        super().__init__(backbone, num_classes, head_conv)
        ch, stacks = backbone.out_channels, backbone.num_stacks
        self.hps = nn.ModuleList(kp_head(ch, head_conv, 2 * num_joints, bias=0.0) for _ in range(stacks))
        self.hm_hp = nn.ModuleList(kp_head(ch, head_conv, num_joints, bias=HEAT_BIAS) for _ in range(stacks))
        self.hp_offset = nn.ModuleList(kp_head(ch, head_conv, 2, bias=0.0) for _ in range(stacks))

    def stack_heads(self, i: int, feat: Tensor) -> dict[str, Tensor]:
        return {**super().stack_heads(i, feat), "hps": self.hps[i](feat), "hm_hp": self.hm_hp[i](feat),
                "hp_offset": self.hp_offset[i](feat)}


def merged_pose_heads(outputs: dict[str, Tensor], flip: bool, perm: list[int]) -> dict[str, Tensor]:
    """Heatmaps as probabilities; under flip (XZ multi-pose): hm, wh, hps and hm_hp averaged with the un-flipped copy,
    whose joints are permuted by `perm` (left <-> right) and whose joint x offsets change sign; reg and hp_offset
    from the originals."""
    merged = merged_heads(outputs, flip)
    hm_hp = outputs["hm_hp"].sigmoid()
    if not flip:
        return {**merged, "hps": outputs["hps"], "hm_hp": hm_hp, "hp_offset": outputs["hp_offset"]}
    hps, hps_flipped = flip_halves(outputs["hps"])
    b, _, h, w = hps.shape
    unflipped = hps_flipped.flip(-1).reshape(b, len(perm), 2, h, w)[:, perm]
    unflipped = unflipped * torch.tensor([-1.0, 1.0], dtype=unflipped.dtype, device=unflipped.device)[:, None, None]
    hm_hp, hm_hp_flipped = flip_halves(hm_hp)
    return {**merged, "hps": (hps + unflipped.reshape(b, -1, h, w)) / 2,
            "hm_hp": (hm_hp + hm_hp_flipped.flip(-1)[:, perm]) / 2, "hp_offset": flip_halves(outputs["hp_offset"])[0]}


def _at_cells(heat: Tensor, xy: Tensor) -> Tensor:
    """(B, J, H, W) joint heatmaps read at (B, K, J, 2) positions (their cells, clamped to the grid) -> (B, K, J)."""
    b, j, h, w = heat.shape
    ix = xy[..., 0].floor().long().clamp(0, w - 1)
    iy = xy[..., 1].floor().long().clamp(0, h - 1)
    return heat.reshape(b, j, -1).gather(2, (iy * w + ix).permute(0, 2, 1)).permute(0, 2, 1)


def joint_peaks(hm_hp: Tensor, hp_offset: Tensor, k: int, peaks: Callable[..., tuple[Tensor, ...]] = heatmap_peaks
                ) -> tuple[Tensor, Tensor]:
    """The top-K 3x3 peaks of each joint heatmap, shifted by their sub-cell offset (§4.2): positions (B, J, K, 2)
    and scores (B, J, K)."""
    b, j, h, w = hm_hp.shape
    scores, _, ys, xs = peaks(hm_hp.reshape(b * j, 1, h, w), k)
    idx = (ys * w + xs).reshape(b, 1, -1).expand(-1, 2, -1)
    off = hp_offset.reshape(b, 2, -1).gather(2, idx).reshape(b, 2, j, -1)
    xy = torch.stack([xs.reshape(b, j, -1).float() + off[:, 0], ys.reshape(b, j, -1).float() + off[:, 1]], -1)
    return xy, scores.reshape(b, j, -1)


def snap_joints(joints: Tensor, confidence: Tensor, boxes: Tensor, peaks: Tensor, peak_scores: Tensor,
                threshold: float, distance: float) -> tuple[Tensor, Tensor]:
    """Each regressed joint (B, K, J, 2) moved to the nearest peak of its type scoring above `threshold` inside its
    person's box (§4.2), if that peak lies within `distance` × the box's longer side (XZ); its confidence becomes
    the peak's score."""
    d = (joints[:, :, :, None, :] - peaks[:, None]).square().sum(-1).sqrt()  # (B, K, J, P)
    x1, y1, x2, y2 = (boxes[..., i][:, :, None, None] for i in range(4))
    px, py = peaks[..., 0][:, None], peaks[..., 1][:, None]
    allowed = (px >= x1) & (px <= x2) & (py >= y1) & (py <= y2) & (peak_scores[:, None] > threshold)
    nearest, which = d.masked_fill(~allowed, float("inf")).min(-1)
    side = torch.maximum(boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1])[:, :, None]
    take = nearest <= distance * side
    b, k, j = which.shape
    chosen = peaks[:, None].expand(b, k, j, -1, 2).gather(3, which[..., None, None].expand(-1, -1, -1, 1, 2))[:, :, :, 0]
    chosen_scores = peak_scores[:, None].expand(b, k, j, -1).gather(3, which[..., None])[..., 0]
    return torch.where(take[..., None], chosen, joints), torch.where(take, chosen_scores, confidence)


@dataclass(frozen=True)
class PoseDecoding:
    """Pose decode settings (§4.2): the top-K centres, snapping on/off, the joint-peak threshold and the farthest
    snap as a fraction of the box's longer side."""

    k: int
    snap: bool
    threshold: float
    snap_distance: float


def decode_pose(heads: dict[str, Tensor], d: PoseDecoding, peaks: Callable[..., tuple[Tensor, ...]] = heatmap_peaks
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Merged heads -> boxes (B, K, 4), scores, classes (B, K) and joints (B, K, J, 3: x, y, confidence) in
    output-grid units: joints = integer centre + regressed offsets, then snapped (§4.2)."""
    boxes, scores, classes, ys, xs = decode_centres(heads["hm"], heads["wh"], heads["reg"], d.k, peaks)
    b, k = scores.shape
    j = heads["hm_hp"].shape[1]
    idx = (ys * heads["hm"].shape[-1] + xs).unsqueeze(1).expand(-1, 2 * j, -1)
    offsets = heads["hps"].reshape(b, 2 * j, -1).gather(2, idx).reshape(b, j, 2, k).permute(0, 3, 1, 2)
    joints = offsets + torch.stack([xs, ys], -1).to(offsets.dtype)[:, :, None, :]
    confidence = _at_cells(heads["hm_hp"], joints)
    if d.snap:
        found, found_scores = joint_peaks(heads["hm_hp"], heads["hp_offset"], d.k, peaks)
        joints, confidence = snap_joints(joints, confidence, boxes, found, found_scores, d.threshold, d.snap_distance)
    return boxes, scores, classes, torch.cat([joints, confidence[..., None]], -1)


class CenterNetPoseDetector(CenterNetPointsDetector):
    """Objects as points for human pose (§4.2): a person box per centre peak and its 17 joints."""

    heads = ("hm", "wh", "reg", "hps", "hm_hp", "hp_offset")
    heat_heads = ("hm", "hm_hp")
    export_outputs = ("boxes", "scores", "classes", "keypoints")
    export_meanings = {"keypoints": "(N, D, 17, 3) each person's COCO joints: x, y in input pixels, confidence"}
    flip_pairs = FLIP_PAIRS
    error_rows = (  # objects as points Table 7's replacement for pose: centre heatmap, then the joints' heads
        (("hm",), "w/ gt centre heatmap"),
        (("hm", "hps"), "w/ gt centre heatmap+joint offsets"),
        (("hm", "hps", "hm_hp", "hp_offset"), "w/ gt centre heatmap+joint offsets+joint heatmaps"),
        (("hm", "wh", "reg", "hps", "hm_hp", "hp_offset"), "w/ gt all heads"),
    )

    def __init__(self, recipe: Recipe, network: nn.Module | None = None) -> None:
        super().__init__(recipe, network)
        t = recipe.test
        self.decoding = PoseDecoding(t.k, t.joint_snap, t.joint_threshold, t.joint_snap_distance)
        self.flip_order = flip_permutation(FLIP_PAIRS, NUM_JOINTS)

    @staticmethod
    def build_network(backbone: nn.Module, model: ModelConfig) -> nn.Module:
        return CenterNetPose(backbone, model.num_classes, model.head_conv)

    def target_renderer(self) -> TargetRenderer:
        t = self.recipe.targets
        return functools.partial(pose_targets, num_classes=self.recipe.model.num_classes, max_objs=t.max_objs,
                                 radius_mode=t.radius_mode, min_overlap=t.min_overlap)

    def loss(self, outputs: list[dict[str, Tensor]], targets: dict[str, Tensor]) -> dict[str, Tensor]:
        """The points loss (eq. 4) + λhp·L1(joint offsets) + λhm_hp·focal(joint heatmaps) + λoff·L1(joint offsets
        within the cell) (§4.2), each term averaged over stacks."""
        w = self.recipe.loss
        n = len(outputs)
        points = super().loss(outputs, targets)
        hp = sum(reg_weighted_l1_loss(o["hps"], targets["ind"], targets["hps_mask"], targets["hps"]) for o in outputs) / n
        hm_hp = sum(focal_loss(heat_sigmoid(o["hm_hp"]), targets["hm_hp"]) for o in outputs) / n
        hp_off = sum(reg_l1_loss(o["hp_offset"], targets["hp_ind"], targets["hp_mask"], targets["hp_offset"])
                     for o in outputs) / n
        total = points["loss"] + w.hp_weight * hp + w.hm_hp_weight * hm_hp + w.off_weight * hp_off
        return {**points, "loss": total, "hp_loss": hp, "hm_hp_loss": hm_hp, "hp_off_loss": hp_off}

    def decode(self, outputs: dict[str, Tensor], flip: bool) -> ScaleOutput:
        """The top-K people of one image with their joints; under flip the heads are averaged first."""
        boxes, scores, classes, joints = decode_pose(merged_pose_heads(outputs, flip, self.flip_order), self.decoding)
        return ScaleOutput(Detections(boxes[0], scores[0], classes[0], keypoints=joints[0]))

    def export_decode(self, outputs: dict[str, Tensor], flip: bool, down: tuple[Any, Any]) -> dict[str, Tensor]:
        """`decode` in graph form for a batch: the top-K people and their snapped joints, coordinates in input pixels."""
        merged = merged_pose_heads(outputs, flip, self.flip_order)
        boxes, scores, classes, joints = decode_pose(merged, self.decoding, export_peaks)
        xy = to_input_pixels(joints[..., :2].flatten(-2), down).unflatten(-1, (joints.shape[-2], 2))
        return {"boxes": to_input_pixels(boxes, down), "scores": scores, "classes": classes,
                "keypoints": torch.cat([xy, joints[..., 2:]], -1)}

    def export_scale_output(self, outputs: dict[str, Tensor]) -> ScaleOutput:
        """One image's people with their joints, as `decode` returns them (input pixels)."""
        return ScaleOutput(Detections(outputs["boxes"], outputs["scores"], outputs["classes"],
                                      keypoints=outputs["keypoints"]))

    def gt_heads(self, boxes: np.ndarray, classes: np.ndarray, out_hw: tuple[int, int],
                 keypoints: np.ndarray | None = None) -> dict[str, Tensor]:
        """The points family's ground-truth heads plus hps filled outward from each centre, the rendered joint
        heatmaps as logits and hp_offset filled outward from each joint cell (XZ `gen_oracle_map`, REFERENCE §6)."""
        if keypoints is None:
            keypoints = np.zeros((len(boxes), NUM_JOINTS, 3), np.float32)
        t = self.recipe.targets
        rendered = pose_targets(boxes, classes, keypoints, self.recipe.model.num_classes, out_hw, max(len(boxes), 1),
                                t.radius_mode, t.min_overlap)
        rows = (rendered["wh"] > 0).all(1).astype(np.float32)  # every rendered person, with or without joints
        hps = dense_from_centers(rendered["hps"], rendered["ind"], rows, out_hw)
        hp_offset = dense_from_centers(rendered["hp_offset"], rendered["hp_ind"], rendered["hp_mask"], out_hw)
        hm_hp = torch.logit(torch.from_numpy(rendered["hm_hp"]).clamp(1e-6, 1 - 1e-6))
        return {**super().gt_heads(boxes, classes, out_hw), "hps": torch.from_numpy(hps)[None], "hm_hp": hm_hp[None],
                "hp_offset": torch.from_numpy(hp_offset)[None]}
