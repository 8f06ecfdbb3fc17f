"""Error analysis by ground-truth replacement (CornerNet Table 3, triplet Table 5, objects as points
Table 7): chosen heads are replaced by ground truth rendered through the detector's `gt_heads` and the
rest of the test pipeline runs unchanged, so the AP gap says which head limits the detector.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from kpnet.data.dataset import CocoIndex
from kpnet.data.poses import NUM_JOINTS, flip_permutation
from kpnet.detectors.base import Detector
from kpnet.engine.inference import Heads, detect_with_heads, iterate_images, to_coco_results
from kpnet.targets import output_size


def gt_head_source(detector: Detector, boxes: np.ndarray, classes: np.ndarray, replace: set[str],
                   use_network: bool, keypoints: np.ndarray | None = None) -> Heads:
    """A head source for one image: the network's heads with those in `replace` taken from ground truth
    (for a pose family, also from the (N, J, 3) `keypoints`, mapped and flipped as the boxes)."""

    def heads(batch: Tensor, meta: dict[str, float]) -> dict[str, Tensor]:
        inp_h, inp_w = batch.shape[-2:]
        out_hw = (output_size(inp_h), output_size(inp_w))
        ratio = np.array([out_hw[1] / inp_w, out_hw[0] / inp_h] * 2, np.float32)
        s = meta["scale"]
        mapped = boxes.astype(np.float32).reshape(-1, 4).copy()
        mapped[:, [0, 2]] = mapped[:, [0, 2]] * s + meta["border_x"]
        mapped[:, [1, 3]] = mapped[:, [1, 3]] * s + meta["border_y"]
        views = [mapped]
        if batch.shape[0] == 2:  # the flipped copy of a flip test: x -> W - x
            views.append(np.stack([inp_w - mapped[:, 2], mapped[:, 1], inp_w - mapped[:, 0], mapped[:, 3]], axis=1))
        if keypoints is None:
            rendered = [detector.gt_heads(v * ratio, classes, out_hw) for v in views]
        else:
            kps = keypoints.astype(np.float32).copy()
            kps[..., 0] = kps[..., 0] * s + meta["border_x"]
            kps[..., 1] = kps[..., 1] * s + meta["border_y"]
            kp_views = [kps]
            if batch.shape[0] == 2:
                flipped = kps[:, flip_permutation(detector.flip_pairs or (), kps.shape[1])].copy()
                flipped[..., 0] = inp_w - flipped[..., 0]
                kp_views.append(flipped)
            for k in kp_views:
                k[..., :2] *= ratio[:2]
            rendered = [detector.gt_heads(v * ratio, classes, out_hw, keypoints=k) for v, k in zip(views, kp_views)]
        gt = {k: torch.cat([r[k] for r in rendered]) for k in rendered[0]}
        if not use_network:
            return gt
        pred = detector.network_heads(batch, meta)
        return {k: (gt[k].to(v.device) if k in replace else v) for k, v in pred.items()}

    return heads


@torch.no_grad()
def predict_with_replacement(detector: Detector, index: CocoIndex, replace: set[str], num_workers: int = 0
                             ) -> list[dict[str, Any]]:
    """COCO results of the test pipeline over a data set with `replace` heads set to ground truth.

    With every head replaced the network is not run (the all-ground-truth row); with nothing replaced
    this is exactly `kpnet eval`'s boxes (the rows score boxes: masks are left out). Under flip test the
    flipped copy gets the flipped ground truth.
    """
    detector.eval()
    use_network = bool(set(detector.heads) - replace)
    test = detector.test
    results: list[dict[str, Any]] = []
    for item in iterate_images(index, num_workers):
        boxes, classes = index.boxes(item["image_id"])
        keypoints = None if detector.flip_pairs is None else index.keypoints(item["image_id"], NUM_JOINTS)
        heads = (gt_head_source(detector, boxes, classes, replace, use_network, keypoints) if replace
                 else detector.network_heads)
        dets = detect_with_heads(heads, detector, item["image"], test)
        results += to_coco_results(dets.replace(masks=None), item["image_id"], index.cat_ids, test.round_decimals)
    return results
