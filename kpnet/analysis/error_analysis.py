"""Error analysis by ground-truth replacement (CornerNet Table 3, triplet Table 5, objects as points
Table 7): chosen heads are replaced by ground truth rendered through kpnet.targets and the rest of
the test pipeline runs unchanged, so the AP gap says which head limits the detector.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kpnet.config import Recipe
from kpnet.data.dataset import CocoIndex
from kpnet.engine.inference import detect_with_heads, iterate_images, network_heads, to_coco_results
from kpnet.models import family_of
from kpnet.targets import output_size


def gt_head_source(
    recipe: Recipe, boxes: np.ndarray, classes: np.ndarray, replace: set[str], model: nn.Module | None
) -> Callable[[Tensor, dict[str, float]], dict[str, Tensor]]:
    """A head source for one image: the network's heads with those in `replace` taken from ground truth."""
    family = family_of(recipe)
    predicted = network_heads(model) if model is not None else None
    t = recipe.targets

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
        rendered = [
            family.gt_heads(v * ratio, classes, recipe.model.num_classes, out_hw, t.radius_mode, t.min_overlap) for v in views
        ]
        gt = {k: torch.cat([r[k] for r in rendered]) for k in rendered[0]}
        if predicted is None:
            return gt
        pred = predicted(batch, meta)
        return {k: (gt[k].to(v.device) if k in replace else v) for k, v in pred.items()}

    return heads


@torch.no_grad()
def predict_with_replacement(
    recipe: Recipe, index: CocoIndex, replace: set[str], model: nn.Module | None = None, num_workers: int = 0
) -> list[dict[str, Any]]:
    """COCO results of the test pipeline over a data set with `replace` heads set to ground truth.

    With `model=None` every head must be replaced (the all-ground-truth row). With nothing
    replaced this is exactly `kpnet eval`; under flip test the flipped copy gets the flipped ground truth.
    """
    family = family_of(recipe)
    if model is None and set(family.HEADS) - replace:
        raise ValueError(f"without a model every head must be replaced: {sorted(family.HEADS)}")
    test = recipe.test
    if model is not None:
        model.eval()
    results: list[dict[str, Any]] = []
    for item in iterate_images(index, num_workers):
        boxes, classes = index.boxes(item["image_id"])
        heads = gt_head_source(recipe, boxes, classes, replace, model) if replace else network_heads(model)
        dets = detect_with_heads(heads, family, item["image"], test)
        results += to_coco_results(dets, item["image_id"], index.cat_ids, test.round_decimals)
    return results
