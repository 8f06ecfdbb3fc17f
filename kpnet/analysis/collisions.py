"""Collision statistics of a COCO-format data set (objects-as-points paper, Appendix C).

How often two same-class objects fall on one centre cell (eq. 9), how many same-class pairs
overlap above an IoU (eq. 10), and how many objects a RetinaNet-style anchor set can only cover
by a forced assignment (best anchor IoU < 0.5). All of it vectorised with numpy (float64).

Conventions (the reference's, REFERENCE §6): object size by the annotation's `area` (COCO's
own size rule: small < 32², medium < 96², large otherwise; w·h where `area` is absent); crowd
annotations count in the object total but are left out of the pairs and the anchor count unless
`include_crowd`. A pair, and an object lost to a centre collision, is booked under the size of
its smaller object: in a cell with k objects the largest one survives and the k − 1 others are lost.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kpnet.errors import KpnetError
from kpnet.data.validate import BOX_STATISTICS_KEYS, load_coco_checked

SIZE_LABELS: tuple[str, ...] = ("small", "medium", "large")
SMALL_AREA, MEDIUM_AREA = 32.0**2, 96.0**2
# RetinaNet's anchors as appendix C uses them: 5 sizes x 3 aspect ratios (h / w), stride 16.
RETINA_SIZES: tuple[float, ...] = (32.0, 64.0, 128.0, 256.0, 512.0)
RETINA_RATIOS: tuple[float, ...] = (0.5, 1.0, 2.0)
RETINA_STRIDE = 16
FORCED_IOU = 0.5
_PAIR_CHUNK = 1 << 20  # same-class pairs scored per numpy pass


@dataclass(frozen=True)
class BoxSet:
    """One COCO annotation file as arrays, one row per annotation (boxes are COCO x, y, w, h)."""

    source: str
    num_images: int
    image_index: np.ndarray  # int64 [N], row into image_width / image_height
    category_id: np.ndarray  # int64 [N]
    boxes: np.ndarray  # float64 [N, 4]
    area: np.ndarray  # float64 [N]
    iscrowd: np.ndarray  # bool [N]
    image_width: np.ndarray  # int64 [num_images]
    image_height: np.ndarray  # int64 [num_images]


def load_boxes(path: str | Path) -> BoxSet:
    """Read a COCO annotation file into a BoxSet; KpnetError naming the file and entry when malformed.

    Checked by `kpnet.data.validate` with the keys box statistics need (no file names, areas or categories
    required; annotation ids are not used, so id 0 and repeated ids pass); a negative box size is an error.
    """
    source = str(path)
    data = load_coco_checked(path, None, required=BOX_STATISTICS_KEYS,
                             tolerate=frozenset({"annotation_id_zero", "duplicate_annotation_id"}))
    images, anns = data["images"], data["annotations"]
    n = len(anns)
    img_ids = np.array([img["id"] for img in images], dtype=np.int64)
    width = np.array([img["width"] for img in images], dtype=np.int64)
    height = np.array([img["height"] for img in images], dtype=np.int64)
    ann_image = np.fromiter((a["image_id"] for a in anns), dtype=np.int64, count=n)
    category = np.fromiter((a["category_id"] for a in anns), dtype=np.int64, count=n)
    boxes = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(n, 4)
    area = np.fromiter((a.get("area", math.nan) for a in anns), dtype=np.float64, count=n)
    iscrowd = np.fromiter((a["iscrowd"] for a in anns), dtype=np.int64, count=n)
    negative = np.flatnonzero((boxes[:, 2:] < 0).any(axis=1))
    if len(negative):
        i = int(negative[0])
        raise KpnetError(source, f"annotations[{i}]: 'bbox' {anns[i]['bbox']!r} has a negative width or height")
    order = np.argsort(img_ids, kind="stable")
    image_index = order[np.searchsorted(img_ids, ann_image, sorter=order)] if n else np.zeros(0, dtype=np.int64)
    area = np.where(np.isnan(area), boxes[:, 2] * boxes[:, 3], area)
    return BoxSet(source, len(images), image_index.astype(np.int64), category, boxes, area,
                  iscrowd.astype(bool), width, height)


def size_class(area: np.ndarray) -> np.ndarray:
    """COCO size class per object: 0 small (area < 32²), 1 medium (< 96²), 2 large."""
    return np.where(area < SMALL_AREA, 0, np.where(area < MEDIUM_AREA, 1, 2))


def _rank_in_groups(keys: Sequence[np.ndarray], area: np.ndarray) -> np.ndarray:
    """Per object, how many objects of its group (equal `keys`) come before it by (area desc, index)."""
    n = len(area)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((np.arange(n), -area, *reversed(keys)))
    same = np.ones(n - 1, dtype=bool)
    for k in keys:
        ks = k[order]
        same &= ks[1:] == ks[:-1]
    new_group = np.concatenate(([True], ~same))
    start = np.maximum.accumulate(np.where(new_group, np.arange(n), 0))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - start
    return rank


def center_collisions(image_index: np.ndarray, category_id: np.ndarray, boxes: np.ndarray,
                      area: np.ndarray, stride: float) -> np.ndarray:
    """Objects-as-points eq. 9: per object, the same-image same-class objects sharing its centre cell
    floor((x + w/2)/stride), floor((y + h/2)/stride) that are larger than it (area, then order).

    Summed it is the number of colliding pairs; a rank > 0 marks an object lost to the collision.
    """
    cx = np.floor_divide(boxes[:, 0] + boxes[:, 2] / 2, stride)
    cy = np.floor_divide(boxes[:, 1] + boxes[:, 3] / 2, stride)
    return _rank_in_groups((image_index, category_id, cx, cy), area)


def box_iou_xywh(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise IoU of two [N, 4] arrays of COCO x, y, w, h boxes (continuous coordinates, 0 if empty)."""
    iw = np.minimum(a[:, 0] + a[:, 2], b[:, 0] + b[:, 2]) - np.maximum(a[:, 0], b[:, 0])
    ih = np.minimum(a[:, 1] + a[:, 3], b[:, 1] + b[:, 3]) - np.maximum(a[:, 1], b[:, 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    union = a[:, 2] * a[:, 3] + b[:, 2] * b[:, 3] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def same_class_iou_pairs(image_index: np.ndarray, category_id: np.ndarray, boxes: np.ndarray,
                         area: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """Objects-as-points eq. 10: for each threshold t and object, the same-image same-class pairs with
    IoU > t in which it is the smaller object (area, then order). Returns int64 [len(thresholds), N]."""
    n = len(area)
    counts = np.zeros((len(thresholds), n), dtype=np.int64)
    if n < 2:
        return counts
    order = np.lexsort((np.arange(n), -area, category_id, image_index))
    img, cat = image_index[order], category_id[order]
    boundary = np.flatnonzero((img[1:] != img[:-1]) | (cat[1:] != cat[:-1])) + 1
    group_end = np.repeat(np.append(boundary, n), np.diff(np.concatenate(([0], boundary, [n]))))
    partners = group_end - np.arange(n) - 1  # later (smaller) objects in the same group
    cum = np.concatenate(([0], np.cumsum(partners)))
    start = 0
    while start < n:
        stop = int(np.searchsorted(cum, cum[start] + _PAIR_CHUNK, side="right")) - 1
        stop = min(max(stop, start + 1), n)
        reps = partners[start:stop]
        total = int(reps.sum())
        if total:
            left = np.repeat(np.arange(start, stop), reps)
            first = np.repeat(cum[start:stop] - cum[start], reps)
            right = left + 1 + (np.arange(total) - first)
            iou = box_iou_xywh(boxes[order[left]], boxes[order[right]])
            smaller = order[right]
            for t, threshold in enumerate(thresholds):
                counts[t] += np.bincount(smaller[iou > threshold], minlength=n)
        start = stop
    return counts


def retina_anchor_shapes(sizes: Sequence[float] = RETINA_SIZES,
                         ratios: Sequence[float] = RETINA_RATIOS) -> np.ndarray:
    """The [len(sizes) * len(ratios), 2] anchor widths and heights: area size², aspect h / w = ratio."""
    s = np.asarray(sizes, dtype=np.float64)[:, None]
    r = np.asarray(ratios, dtype=np.float64)[None, :]
    return np.stack([(s / np.sqrt(r)).ravel(), (s * np.sqrt(r)).ravel()], axis=1)


def resized_image(width: np.ndarray, height: np.ndarray,
                  short_edge: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scale factor and the integer size of each image resized so its shorter edge is `short_edge`."""
    short = np.minimum(width, height)
    return short_edge / short.astype(np.float64), (width * short_edge) // short, (height * short_edge) // short


def anchor_best_iou(boxes: np.ndarray, width: np.ndarray, height: np.ndarray, short_edge: int = 800,
                    stride: int = RETINA_STRIDE, shapes: np.ndarray | None = None) -> np.ndarray:
    """Per object, the best IoU over every anchor of its resized image (objects-as-points appendix C).

    Anchor centres are (S/2 + i·S, S/2 + j·S) for i in [0, ⌊(W − S/2)/S⌋], j in [0, ⌊(H − S/2)/S⌋]
    on the image resized to `short_edge`. For a fixed anchor shape the overlap along each axis only
    shrinks as the centre moves away from the box centre, so the best anchor of a shape sits at
    the grid position nearest the box centre in x and in y; both neighbours are scored in float64.
    `width`, `height` are the original image sizes per object.
    """
    shapes = retina_anchor_shapes() if shapes is None else shapes
    scale, rw, rh = resized_image(width, height, short_edge)
    x1, y1 = boxes[:, 0] * scale, boxes[:, 1] * scale
    bw, bh = boxes[:, 2] * scale, boxes[:, 3] * scale
    x2, y2 = x1 + bw, y1 + bh
    half = stride / 2
    nx = np.floor((rw - half) / stride)
    ny = np.floor((rh - half) / stride)

    def candidates(lo: np.ndarray, hi: np.ndarray, last: np.ndarray) -> list[np.ndarray]:
        f = np.floor(((lo + hi) / 2 - half) / stride)
        return [half + np.clip(f + d, 0, np.maximum(last, 0)) * stride for d in (0, 1)]

    cxs, cys = candidates(x1, x2, nx), candidates(y1, y2, ny)
    best = np.zeros(len(boxes), dtype=np.float64)
    for aw, ah in shapes:
        ox = np.maximum.reduce([np.clip(np.minimum(c + aw / 2, x2) - np.maximum(c - aw / 2, x1), 0, None)
                                for c in cxs])
        oy = np.maximum.reduce([np.clip(np.minimum(c + ah / 2, y2) - np.maximum(c - ah / 2, y1), 0, None)
                                for c in cys])
        inter = ox * oy
        best = np.maximum(best, inter / (aw * ah + bw * bh - inter))
    return np.where((nx >= 0) & (ny >= 0), best, 0.0)


def _by_size(values: np.ndarray, size: np.ndarray) -> dict[str, int]:
    out = {"all": int(values.sum())}
    out.update({label: int(values[size == s].sum()) for s, label in enumerate(SIZE_LABELS)})
    return out


def threshold_key(t: float) -> str:
    """The JSON key of an IoU threshold: '0.5', '0.7'."""
    return f"{t:g}"


def collision_stats(boxset: BoxSet, stride: float = 4, iou_thresholds: Sequence[float] = (0.5, 0.7),
                    short_edge: int = 800, include_crowd: bool = False) -> dict[str, Any]:
    """Appendix C's statistics for one annotation file, totals and per COCO size class.

    Keys: images, objects (crowd included), crowd, center_collision_pairs, objects_lost,
    iou_pairs (threshold -> count), forced_anchors; `by_size` repeats all but images/crowd
    for small, medium and large.
    """
    size = size_class(boxset.area)
    used = np.ones(len(size), dtype=bool) if include_crowd else ~boxset.iscrowd
    img, cat = boxset.image_index[used], boxset.category_id[used]
    boxes, area = boxset.boxes[used], boxset.area[used]
    used_size = size[used]
    rank = center_collisions(img, cat, boxes, area, stride)
    iou_counts = same_class_iou_pairs(img, cat, boxes, area, iou_thresholds)
    best = anchor_best_iou(boxes, boxset.image_width[img], boxset.image_height[img], short_edge)
    forced = best < FORCED_IOU
    objects = _by_size(np.ones(len(size), dtype=np.int64), size)
    pairs = _by_size(rank, used_size)
    lost = _by_size((rank > 0).astype(np.int64), used_size)
    iou = {threshold_key(t): _by_size(iou_counts[i], used_size) for i, t in enumerate(iou_thresholds)}
    anchors = _by_size(forced.astype(np.int64), used_size)
    stats: dict[str, Any] = {
        "file": boxset.source,
        "images": boxset.num_images,
        "objects": objects["all"],
        "crowd": int(boxset.iscrowd.sum()),
        "center_collision_pairs": pairs["all"],
        "objects_lost": lost["all"],
        "iou_pairs": {k: v["all"] for k, v in iou.items()},
        "forced_anchors": anchors["all"],
        "by_size": {
            label: {
                "objects": objects[label],
                "center_collision_pairs": pairs[label],
                "objects_lost": lost[label],
                "iou_pairs": {k: v[label] for k, v in iou.items()},
                "forced_anchors": anchors[label],
            }
            for label in SIZE_LABELS
        },
    }
    return stats
