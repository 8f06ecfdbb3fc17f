"""Test-time pipeline (REFERENCE §4.6): per scale pad and normalise, run the net (with its flip),
decode with the family's rule, map boxes back to image pixels, merge scales, keep the best.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kpnet.config import TestConfig
from kpnet.data.dataset import CocoIndex, TestImages
from kpnet.data.transforms import test_input
from kpnet.engine.host_memory import reuse_freed_memory
from kpnet.errors import KpnetError
from kpnet.models import family_of
from kpnet.ops import soft_nms, soft_nms_merge

NMS_METHODS = {"soft_gaussian": "gaussian", "soft_linear": "linear"}


def to_image_coords(dets: Tensor, meta: dict[str, float], down_x: float, down_y: float) -> Tensor:
    """Output-grid boxes -> original image pixels: x = (x·inp/out − border)/scale, clipped (REFERENCE §4.6)."""
    dets = dets.clone()
    s = meta["scale"]
    dets[:, [0, 2]] = ((dets[:, [0, 2]] * down_x - meta["border_x"]) / s).clamp(0, meta["width"])
    dets[:, [1, 3]] = ((dets[:, [1, 3]] * down_y - meta["border_y"]) / s).clamp(0, meta["height"])
    return dets


Heads = Callable[[Tensor, dict[str, float]], dict[str, Tensor]]


def network_heads(model: nn.Module) -> Heads:
    """The usual head source: the last stack's outputs of `model` for a batch."""
    device = next(model.parameters()).device

    def heads(batch: Tensor, meta: dict[str, float]) -> dict[str, Tensor]:
        return model(batch.to(device))[-1]

    return heads


@torch.no_grad()
def detect_image(model: nn.Module, image: np.ndarray, test: TestConfig) -> Tensor:
    """Detections (N, 6) x1, y1, x2, y2, score, class in image pixels for one BGR image."""
    model.eval()
    return detect_with_heads(network_heads(model), family_of(model.recipe), image, test)


@torch.no_grad()
def scale_rows(heads: Heads, family: ModuleType, image: np.ndarray, test: TestConfig, scale: float) -> Tensor:
    """One scale of the test pipeline: the family's decoded rows with columns 0-3 in image pixels."""
    inp, meta = test_input(image, scale, test.pad, test.pad_add)
    batch = torch.from_numpy(inp)[None]
    if test.flip:
        batch = torch.cat([batch, batch.flip(-1)])
    outputs = heads(batch, meta)
    rows = family.detect(outputs, test.flip, **{k: getattr(test, k) for k in family.DETECT_PARAMS}).float().cpu()
    out_h, out_w = next(iter(outputs.values())).shape[-2:]
    return to_image_coords(rows, meta, inp.shape[-1] / out_w, inp.shape[-2] / out_h)


@torch.no_grad()
def detect_with_heads(heads: Heads, family: ModuleType, image: np.ndarray, test: TestConfig) -> Tensor:
    """The test pipeline with any head source (the network, or ground truth for error analysis).

    A family's `detect` gives rows x1, y1, x2, y2, score, class[, ...] in output-grid units; columns 0-3
    are mapped to image pixels per scale. A family with `postprocess(per_scale, scales, **params)` then
    turns the per-scale rows into boxes (the triplet centre check, REFERENCE §4.2); otherwise the scales
    are concatenated. Under `nms_merge`, columns 6 and 7 must hold the tl / br scores that weight the merge.
    """
    per_scale = [scale_rows(heads, family, image, test, scale) for scale in test.scales]
    if hasattr(family, "postprocess"):
        params = {k: getattr(test, k) for k in family.POSTPROCESS_PARAMS}
        dets = family.postprocess(per_scale, tuple(test.scales), **params)
    else:
        dets = torch.cat(per_scale)
    dets = dets[dets[:, 4] > 0]
    if len(test.scales) > 1 or test.nms != "none" or test.nms_merge:
        method = NMS_METHODS.get(test.nms, "gaussian")
        nms_args = dict(method=method, sigma=test.nms_sigma, iou_threshold=test.nms_threshold)
        if test.nms_merge:
            if dets.shape[1] < 8:
                raise KpnetError("test.nms_merge", "this family's detections carry no tl/br scores to merge with")
            keep, scores, boxes = soft_nms_merge(
                dets[:, :4], dets[:, 4], dets[:, 5].long(), dets[:, 6], dets[:, 7], weight_exp=test.weight_exp, **nms_args
            )
            dets = dets[keep]
            dets[:, :4] = boxes
        else:
            keep, scores = soft_nms(dets[:, :4], dets[:, 4], dets[:, 5].long(), **nms_args)
            dets = dets[keep]
        dets[:, 4] = scores
    order = dets[:, 4].argsort(descending=True, stable=True)[: test.max_per_image]
    return dets[order, :6]


def to_coco_results(dets: Tensor, image_id: int, cat_ids: list[int], decimals: int) -> list[dict[str, Any]]:
    """COCO results entries ([x, y, w, h] boxes) for one image; values rounded as the reference does.

    A box decoded with a negative size (possible early in training) is written with size 0.
    """
    rnd = (lambda v: round(float(v), decimals)) if decimals >= 0 else float
    out = []
    for x1, y1, x2, y2, score, cls in dets.tolist():
        out.append(
            {
                "image_id": image_id,
                "category_id": cat_ids[int(cls)],
                "bbox": [rnd(x1), rnd(y1), rnd(max(x2 - x1, 0.0)), rnd(max(y2 - y1, 0.0))],
                "score": rnd(score),
            }
        )
    return out


def iterate_images(index: CocoIndex, num_workers: int) -> Iterator[dict[str, Any]]:
    """Decoded test images in file order, read by DataLoader workers; a bad image stops with its line."""
    loader = torch.utils.data.DataLoader(
        TestImages(index), batch_size=None, num_workers=num_workers, collate_fn=lambda s: s
    )
    for item in loader:
        if "error" in item:
            raise KpnetError(None, item["error"])
        yield item


def predict_dataset(
    model: nn.Module,
    index: CocoIndex,
    test: TestConfig,
    num_workers: int = 0,
    on_image: Callable[[], None] | None = None,
) -> list[dict[str, Any]]:
    """Run the test pipeline over every image of a data set -> COCO results list."""
    model.eval()
    if next(model.parameters()).device.type == "cpu":
        reuse_freed_memory()
    results: list[dict[str, Any]] = []
    for item in iterate_images(index, num_workers):
        dets = detect_image(model, item["image"], test)
        results += to_coco_results(dets, item["image_id"], index.cat_ids, test.round_decimals)
        if on_image:
            on_image()
    return results
