"""Test-time pipeline (REFERENCE §4.6): per scale pad and normalise, run the net (with its flip),
let the detector decode, map boxes back to image pixels, postprocess the scales, NMS, keep the best.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from kpnet.config import Recipe, TestConfig, resolved_input_size
from kpnet.data.dataset import CocoIndex, ImageFiles, TestImages
from kpnet.data.transforms import test_input
from kpnet.detectors.base import Detections, Detector, GridFeatures, ScaleOutput
from kpnet.engine.host_memory import reuse_freed_memory
from kpnet.errors import KpnetError, warn
from kpnet.masks import paste_masks, to_rle
from kpnet.ops import soft_nms, soft_nms_merge

# test.nms -> the soft-NMS method; a multi-scale test with nms "none" still merges, with gaussian (REFERENCE §4.3)
NMS_METHODS = {"none": "gaussian", "soft_gaussian": "gaussian", "soft_linear": "linear", "hard": "hard"}

Heads = Callable[[Tensor, dict[str, float]], dict[str, Tensor]]


@torch.no_grad()
def detect_image(detector: Detector, image: np.ndarray, full_hw: tuple[int, int] | None = None) -> Detections:
    """Detections of one BGR image in image pixels, with the detector's own test settings (`full_hw`: the full
    image's size when `image` was decoded smaller; the boxes are then in the full image's pixels)."""
    detector.eval()
    return detect_with_heads(detector.network_heads, detector, image, detector.test, full_hw)


def input_scale(detector: Detector, test: TestConfig, image_hw: tuple[int, int]) -> float:
    """The factor that brings an image's longer side to `test.input_size` (1 at the original resolution); each of
    `test.scales` multiplies it."""
    size = resolved_input_size(test, detector.recipe)
    return size / max(image_hw) if size else 1.0


def decode_side(detector: Detector, test: TestConfig) -> int | None:
    """The longer side test images need to be decoded at (the largest test scale), or None: the full image."""
    size = resolved_input_size(test, detector.recipe)
    return math.ceil(size * max(test.scales)) if size else None


def _scale_input(detector: Detector, image: np.ndarray, test: TestConfig, scale: float,
                 full_hw: tuple[int, int] | None) -> tuple[np.ndarray, dict[str, float]]:
    """The network input of one image at one test scale (resized, padded, normalised) and its meta."""
    full_hw = full_hw or image.shape[:2]
    return test_input(image, scale * input_scale(detector, test, full_hw), test.pad, test.pad_add, full_hw)


def _to_image(detector: Detector, outputs: dict[str, Tensor], inp: np.ndarray, meta: dict[str, float],
              flip: bool) -> ScaleOutput:
    """One image's head outputs at one scale decoded, in image pixels."""
    out_h, out_w = next(iter(outputs.values())).shape[-2:]
    down_x, down_y = inp.shape[-1] / out_w, inp.shape[-2] / out_h
    output = detector.decode(outputs, flip).to_image(meta, down_x, down_y)
    if "mask_features" in outputs:  # the un-flipped image's, for the mask head after NMS
        output = dataclasses.replace(output, mask_features=GridFeatures(outputs["mask_features"][:1], meta, down_x, down_y))
    return output


@torch.no_grad()
def scale_output(heads: Heads, detector: Detector, image: np.ndarray, test: TestConfig, scale: float,
                 full_hw: tuple[int, int] | None = None) -> ScaleOutput:
    """One scale of the test pipeline: the detector's decode with its coordinates in image pixels."""
    inp, meta = _scale_input(detector, image, test, scale, full_hw)
    batch = torch.from_numpy(inp)[None]
    if test.flip:
        batch = torch.cat([batch, batch.flip(-1)])
    return _to_image(detector, heads(batch, meta), inp, meta, test.flip)


@torch.no_grad()
def detect_with_heads(heads: Heads, detector: Detector, image: np.ndarray, test: TestConfig,
                      full_hw: tuple[int, int] | None = None) -> Detections:
    """The test pipeline with any head source (the network, or ground truth for error analysis).

    Every scale is decoded and mapped to image pixels, the detector's `postprocess` turns the scales into
    one image's detections (the triplet centre check, REFERENCE §4.2), then per-class soft-NMS (always
    for several scales, REFERENCE §4.3, §4.5), the best `max_per_image` by score, and their instance masks
    where the detector has a mask head (CentripetalNet §3.3).
    """
    per_scale = [scale_output(heads, detector, image, test, scale, full_hw) for scale in test.scales]
    return _finish(detector, per_scale, test)


@torch.no_grad()
def detect_batch(detector: Detector, images: Sequence[np.ndarray],
                 full_hws: Sequence[tuple[int, int] | None]) -> list[Detections]:
    """`detect_image` for several images (`test.batch_size`): at each scale the images whose network inputs share a
    shape go through the network as one batch (each followed by its flip), then each is decoded on its own."""
    detector.eval()
    test = detector.test
    copies = 2 if test.flip else 1
    per_image: list[list[ScaleOutput]] = [[] for _ in images]
    for scale in test.scales:
        prepared = [_scale_input(detector, image, test, scale, hw) for image, hw in zip(images, full_hws, strict=True)]
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, (inp, _) in enumerate(prepared):
            by_shape.setdefault(inp.shape, []).append(i)
        for members in by_shape.values():
            batch = torch.from_numpy(np.stack([prepared[i][0] for i in members]))
            if test.flip:
                batch = torch.stack([batch, batch.flip(-1)], 1).flatten(0, 1)
            outputs = detector.network_heads(batch, prepared[members[0]][1])  # the network reads no meta
            for j, i in enumerate(members):
                one = {key: value[j * copies:(j + 1) * copies] for key, value in outputs.items()}
                per_image[i].append(_to_image(detector, one, *prepared[i], test.flip))
    return [_finish(detector, per_scale, test) for per_scale in per_image]


def _finish(detector: Detector, per_scale: list[ScaleOutput], test: TestConfig) -> Detections:
    dets = postprocess_image(detector, per_scale, test)
    return detector.predict_masks(dets, per_scale) if detector.has_masks else dets


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


def to_coco_results(dets: Detections, image_id: int, cat_ids: list[int], decimals: int,
                    image_hw: tuple[int, int] | None = None, mask_threshold: float = 0.5) -> list[dict[str, Any]]:
    """COCO results entries ([x, y, w, h] boxes) for one image; values rounded as the reference does.

    A box decoded with a negative size (possible early in training) is written with size 0. Detections with
    masks also get a `segmentation`: the mask pasted into the image (`image_hw`) at `mask_threshold`, as RLE.
    A pose family's joints are written as COCO `keypoints` (x, y, confidence per joint; COCOeval reads x and y).
    """
    rnd = (lambda v: round(float(v), decimals)) if decimals >= 0 else float
    masks: list[Any] = [None] * len(dets)
    if dets.masks is not None:
        if image_hw is None:
            raise ValueError("detections with masks need the image size to paste them")
        masks = [to_rle(m) for m in paste_masks(dets.masks, dets.boxes, *image_hw, mask_threshold)]
    out = []
    for (x1, y1, x2, y2), score, cls, mask in zip(dets.boxes.tolist(), dets.scores.tolist(), dets.classes.tolist(), masks):
        entry = {
            "image_id": image_id,
            "category_id": cat_ids[int(cls)],
            "bbox": [rnd(x1), rnd(y1), rnd(max(x2 - x1, 0.0)), rnd(max(y2 - y1, 0.0))],
            "score": rnd(score),
        }
        if mask is not None:
            entry["segmentation"] = mask
        out.append(entry)
    if dets.keypoints is not None:
        for entry, joints in zip(out, dets.keypoints.reshape(len(dets), -1).tolist()):
            entry["keypoints"] = [rnd(v) for v in joints]
    return out


def iterate_images(index: CocoIndex, num_workers: int, min_side: int | None = None,
                   positions: Sequence[int] | None = None) -> Iterator[dict[str, Any]]:
    """Decoded test images in file order (no larger than `min_side` needs; only those at `positions`, e.g. a rank's
    shard, when given), read by DataLoader workers; a bad image stops with its line."""
    images = TestImages(index, min_side)
    return _iterate(images if positions is None else torch.utils.data.Subset(images, list(positions)), num_workers)


def _iterate(images: Dataset, num_workers: int) -> Iterator[dict[str, Any]]:
    loader = torch.utils.data.DataLoader(images, batch_size=None, num_workers=num_workers, collate_fn=lambda s: s)
    for item in loader:
        if "error" in item:
            raise KpnetError(None, item["error"])
        yield item


def predict_dataset(
    detector: Detector,
    index: CocoIndex,
    num_workers: int = 0,
    on_image: Callable[[], None] | None = None,
    detect: Callable[[np.ndarray, tuple[int, int]], Detections] | None = None,
    positions: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """Run the test pipeline over every image of a data set (or those at `positions`: a distributed rank's
    shard) -> COCO results list; `detect` replaces the detector's network (e.g. an exported model in
    onnxruntime, which runs on the CPU)."""
    if detect is None:
        detector.eval()
    if detect is not None or detector.device.type == "cpu":
        reuse_freed_memory()
    results: list[dict[str, Any]] = []
    batch_size = 1 if detect is not None else detector.test.batch_size
    if batch_size < 1:
        raise KpnetError("test.batch_size", f"must be at least 1, got {batch_size}")
    pending: list[dict[str, Any]] = []

    def flush() -> None:
        if detect is not None:
            found = [detect(item["image"], item["full_hw"]) for item in pending]
        elif batch_size == 1:
            found = [detect_image(detector, item["image"], item["full_hw"]) for item in pending]
        else:
            found = detect_batch(detector, [item["image"] for item in pending], [item["full_hw"] for item in pending])
        for item, dets in zip(pending, found, strict=True):
            results.extend(to_coco_results(dets, item["image_id"], index.cat_ids, detector.test.round_decimals,
                                           item["full_hw"], detector.test.mask_threshold))
            if on_image:
                on_image()
        pending.clear()

    for item in iterate_images(index, num_workers, decode_side(detector, detector.test), positions):
        pending.append(item)
        if len(pending) == batch_size:
            flush()
    flush()
    return results


@torch.no_grad()
def predict_files(detector: Detector, paths: list[Path], num_workers: int = 0) -> Iterator[tuple[dict[str, Any], Detections]]:
    """The test pipeline over unlabelled image files, streamed: (item, detections in full-image pixels) per file in
    order, the item holding the decoded (possibly reduced) `image`, its `index` and the full image's `full_hw`."""
    detector.eval()
    if detector.device.type == "cpu":
        reuse_freed_memory()
    for item in _iterate(ImageFiles(paths, decode_side(detector, detector.test)), num_workers):
        yield item, detect_image(detector, item["image"], item["full_hw"])


def warn_scale(detector: Detector, image_hw: list[tuple[int, int]]) -> None:
    """Warn (one line, `kpnet.errors.warn`) when the test scale differs from the one the model was trained at."""
    line = scale_warning(detector.recipe, detector.test, image_hw)
    if line is not None:
        warn(detector.recipe.source or None, line)


def scale_warning(recipe: Recipe, test: TestConfig, image_hw: list[tuple[int, int]]) -> str | None:
    """A line when the middle test scale shows objects at a size training never showed them (issue 18), else None.

    Training's `centernet` crop resizes a side of max(h, w)·s to train.input_size, so the longer side trained at
    lies in input_size / s for s in augment.scales; the `cornernet` crop cuts input_size·s windows at the original
    resolution, so a longer side L was trained at L / s. Compared at the data set's median longer side.
    """
    if not image_hw:
        return None
    longer = float(np.median([max(hw) for hw in image_hw]))
    train, scales = recipe.train.input_size, recipe.augment.scales
    if recipe.augment.crop == "centernet":
        low, high = train / max(scales), train / min(scales)
        trained = f"train.input_size {train} with augment.scales {min(scales)}-{max(scales)}"
    else:
        low, high = longer / max(scales), longer / min(scales)
        trained = f"original-resolution crops with augment.scales {min(scales)}-{max(scales)}"
    size = resolved_input_size(test, recipe)
    middle = float(np.median(test.scales))
    tested = (size or longer) * middle
    if low * (1 - 1e-6) <= tested <= high * (1 + 1e-6):
        return None
    how = f"test.input_size {size}" if size else "the original resolution (test.input_size null)"
    hint = f"test.input_size {'null' if recipe.augment.crop == 'cornernet' else train}"
    return (f"the model was trained seeing images at a longer side of {low:.0f}-{high:.0f} px ({trained}) but is "
            f"tested at {tested:.0f} px ({how}, test scale {middle:g}, images of median longer side {longer:.0f} px): "
            f"objects at a scale it never saw are detected poorly; set {hint} (--set test.input_size=...)")
