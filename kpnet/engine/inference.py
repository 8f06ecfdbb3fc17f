"""Test-time pipeline (REFERENCE §4.6): per scale pad and normalise, run the net (with its flip),
let the detector decode, map boxes back to image pixels, postprocess the scales, NMS, keep the best.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kpnet.config import TestConfig
from kpnet.data.dataset import CocoIndex, TestImages
from kpnet.data.transforms import test_input
from kpnet.detectors.base import Detections, Detector, ScaleOutput
from kpnet.engine.host_memory import reuse_freed_memory
from kpnet.errors import KpnetError
from kpnet.ops import soft_nms, soft_nms_merge

# test.nms -> the soft-NMS method; a multi-scale test with nms "none" still merges, with gaussian (REFERENCE §4.3)
NMS_METHODS = {"none": "gaussian", "soft_gaussian": "gaussian", "soft_linear": "linear", "hard": "hard"}

Heads = Callable[[Tensor, dict[str, float]], dict[str, Tensor]]


@torch.no_grad()
def detect_image(detector: Detector, image: np.ndarray) -> Detections:
    """Detections of one BGR image in image pixels, with the detector's own test settings."""
    detector.eval()
    return detect_with_heads(detector.network_heads, detector, image, detector.test)


@torch.no_grad()
def scale_output(heads: Heads, detector: Detector, image: np.ndarray, test: TestConfig, scale: float) -> ScaleOutput:
    """One scale of the test pipeline: the detector's decode with its coordinates in image pixels."""
    inp, meta = test_input(image, scale, test.pad, test.pad_add)
    batch = torch.from_numpy(inp)[None]
    if test.flip:
        batch = torch.cat([batch, batch.flip(-1)])
    outputs = heads(batch, meta)
    out_h, out_w = next(iter(outputs.values())).shape[-2:]
    return detector.decode(outputs, test.flip).to_image(meta, inp.shape[-1] / out_w, inp.shape[-2] / out_h)


@torch.no_grad()
def detect_with_heads(heads: Heads, detector: Detector, image: np.ndarray, test: TestConfig) -> Detections:
    """The test pipeline with any head source (the network, or ground truth for error analysis).

    Every scale is decoded and mapped to image pixels, the detector's `postprocess` turns the scales into
    one image's detections (the triplet centre check, REFERENCE §4.2), then per-class soft-NMS (always
    for several scales, REFERENCE §4.3, §4.5) and the best `max_per_image` by score.
    """
    return postprocess_image(detector, [scale_output(heads, detector, image, test, scale) for scale in test.scales], test)


def postprocess_image(detector: Detector, per_scale: list[ScaleOutput], test: TestConfig) -> Detections:
    """Every scale of one image (image pixels) -> its detections: `postprocess`, scores > 0, NMS, top max_per_image."""
    dets = detector.postprocess(per_scale, tuple(test.scales))
    dets = dets.select(dets.scores > 0)
    if len(test.scales) > 1 or test.nms != "none" or test.nms_merge:
        nms_args = dict(method=NMS_METHODS[test.nms], sigma=test.nms_sigma, iou_threshold=test.nms_threshold)
        if test.nms_merge:
            if dets.corner_scores is None:
                raise KpnetError("test.nms_merge", "this family's detections carry no tl/br scores to merge with")
            keep, scores, boxes = soft_nms_merge(
                dets.boxes, dets.scores, dets.classes, dets.corner_scores[:, 0], dets.corner_scores[:, 1],
                weight_exp=test.weight_exp, **nms_args,
            )
            dets = dets.select(keep).replace(boxes=boxes)
        else:
            keep, scores = soft_nms(dets.boxes, dets.scores, dets.classes, **nms_args)
            dets = dets.select(keep)
        dets = dets.replace(scores=scores)
    order = dets.scores.argsort(descending=True, stable=True)[: test.max_per_image]
    return dets.select(order)


def to_coco_results(dets: Detections, image_id: int, cat_ids: list[int], decimals: int) -> list[dict[str, Any]]:
    """COCO results entries ([x, y, w, h] boxes) for one image; values rounded as the reference does.

    A box decoded with a negative size (possible early in training) is written with size 0. A pose family's
    joints are written as COCO `keypoints` (x, y, confidence per joint; COCOeval reads x and y).
    """
    rnd = (lambda v: round(float(v), decimals)) if decimals >= 0 else float
    out = []
    for (x1, y1, x2, y2), score, cls in zip(dets.boxes.tolist(), dets.scores.tolist(), dets.classes.tolist()):
        out.append(
            {
                "image_id": image_id,
                "category_id": cat_ids[int(cls)],
                "bbox": [rnd(x1), rnd(y1), rnd(max(x2 - x1, 0.0)), rnd(max(y2 - y1, 0.0))],
                "score": rnd(score),
            }
        )
    if dets.keypoints is not None:
        for entry, joints in zip(out, dets.keypoints.reshape(len(dets), -1).tolist()):
            entry["keypoints"] = [rnd(v) for v in joints]
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
    detector: Detector,
    index: CocoIndex,
    num_workers: int = 0,
    on_image: Callable[[], None] | None = None,
    detect: Callable[[np.ndarray], Detections] | None = None,
) -> list[dict[str, Any]]:
    """Run the test pipeline over every image of a data set -> COCO results list; `detect` replaces the
    detector's network (e.g. an exported model in onnxruntime, which runs on the CPU)."""
    if detect is None:
        detector.eval()
    if detect is not None or detector.device.type == "cpu":
        reuse_freed_memory()
    results: list[dict[str, Any]] = []
    for item in iterate_images(index, num_workers):
        dets = detect(item["image"]) if detect is not None else detect_image(detector, item["image"])
        results += to_coco_results(dets, item["image_id"], index.cat_ids, detector.test.round_decimals)
        if on_image:
            on_image()
    return results
