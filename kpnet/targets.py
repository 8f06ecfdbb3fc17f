"""Ground-truth rendering shared by every family (REFERENCE §2): gaussian radius, gaussian splat,
centre heatmap and the index / offset / size / mask tensors gathered by the losses.

Everything here works in output-grid units on numpy arrays, one image at a time, so it runs
inside DataLoader workers and is reused by error analysis to build ground-truth heads.
"""

from __future__ import annotations

import math
import typing
from typing import Any

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from kpnet.config import RadiusMode

RADIUS_MODES: tuple[str, ...] = typing.get_args(RadiusMode)
STRIDE = 4


def output_size(input_size: int) -> int:
    """Side of the stride-4 output grid: 512 -> 128 and 511 -> 128, so the ratio is 128/511 (REFERENCE §2.1)."""
    return -(-input_size // STRIDE)


def gaussian_radius(height: float, width: float, min_overlap: float, mode: str) -> int:
    """Corner radius keeping IoU >= min_overlap (CornerNet §3.2; REFERENCE §2.2, both forms).

    `cornernet_fixed` takes the correct root of each of the three quadratics (one corner in, both in,
    both out) and returns the smallest; `legacy_bug` reproduces the original 2018 code kept by the
    triplet and objects-as-points implementations, which always yields 4·t·r3 of the correct form.
    """
    h, w, t = float(height), float(width), float(min_overlap)
    if mode == "cornernet_fixed":
        b1 = h + w
        c1 = w * h * (1 - t) / (1 + t)
        r1 = (b1 - math.sqrt(max(b1 * b1 - 4 * c1, 0.0))) / 2
        b2 = 2 * (h + w)
        c2 = (1 - t) * w * h
        r2 = (b2 - math.sqrt(max(b2 * b2 - 16 * c2, 0.0))) / 8
        a3 = 4 * t
        b3 = 2 * t * (h + w)
        c3 = (t - 1) * w * h
        r3 = (-b3 + math.sqrt(max(b3 * b3 - 4 * a3 * c3, 0.0))) / (2 * a3)
    elif mode == "legacy_bug":
        b1 = h + w
        c1 = w * h * (1 - t) / (1 + t)
        r1 = (b1 + math.sqrt(max(b1 * b1 - 4 * c1, 0.0))) / 2
        b2 = 2 * (h + w)
        c2 = (1 - t) * w * h
        r2 = (b2 + math.sqrt(max(b2 * b2 - 16 * c2, 0.0))) / 2
        a3 = 4 * t
        b3 = 2 * t * (h + w)
        c3 = (t - 1) * w * h
        r3 = (-b3 + math.sqrt(max(b3 * b3 - 4 * a3 * c3, 0.0))) / 2
    else:
        raise ValueError(f"radius mode must be one of {RADIUS_MODES}, got {mode!r}")
    return max(0, int(min(r1, r2, r3)))


def gaussian_kernel(radius: int, sigma_div: float = 6.0) -> np.ndarray:
    """(2r+1)² unnormalised gaussian with σ = (2r+1)/sigma_div (REFERENCE §2.3: /6 corners and points, /5 DK centres)."""
    diameter = 2 * radius + 1
    sigma = diameter / sigma_div
    y, x = np.ogrid[-radius : radius + 1, -radius : radius + 1]
    g = np.exp(-(x * x + y * y) / (2 * sigma * sigma))
    g[g < np.finfo(g.dtype).eps * g.max()] = 0
    return g.astype(np.float32)


def draw_gaussian(heatmap: np.ndarray, cx: int, cy: int, radius: int, sigma_div: float = 6.0) -> None:
    """Splat a gaussian peak of value 1 at integer cell (cx, cy), clipped, merged by element-wise max."""
    kernel = gaussian_kernel(radius, sigma_div)
    h, w = heatmap.shape
    left, right = min(cx, radius), min(w - cx, radius + 1)
    top, bottom = min(cy, radius), min(h - cy, radius + 1)
    if right <= 0 or bottom <= 0 or left < 0 or top < 0:
        return
    region = heatmap[cy - top : cy + bottom, cx - left : cx + right]
    patch = kernel[radius - top : radius + bottom, radius - left : radius + right]
    np.maximum(region, patch, out=region)


def center_targets(
    boxes: np.ndarray,
    classes: np.ndarray,
    num_classes: int,
    out_hw: tuple[int, int],
    max_objs: int,
    radius_mode: str,
    min_overlap: float,
) -> dict[str, np.ndarray]:
    """Objects-as-points targets (eq. 1-3): centre heatmap, size, offset, flat index and mask.

    `boxes` are (N, 4) x1, y1, x2, y2 in output-grid units. Boxes are clipped to the grid and dropped
    when empty, as the reference does (REFERENCE §2.1 XZ); at most `max_objs` objects are kept.
    """
    out_h, out_w = out_hw
    hm = np.zeros((num_classes, out_h, out_w), np.float32)
    wh = np.zeros((max_objs, 2), np.float32)
    reg = np.zeros((max_objs, 2), np.float32)
    ind = np.zeros((max_objs,), np.int64)
    mask = np.zeros((max_objs,), np.float32)
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    k = 0
    for box, cls in zip(boxes, np.asarray(classes).reshape(-1)):
        if k >= max_objs:
            break
        x1, x2 = np.clip(box[[0, 2]], 0, out_w - 1)
        y1, y2 = np.clip(box[[1, 3]], 0, out_h - 1)
        bw, bh = float(x2 - x1), float(y2 - y1)
        if bw <= 0 or bh <= 0:
            continue
        radius = gaussian_radius(math.ceil(bh), math.ceil(bw), min_overlap, radius_mode)
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        ix, iy = int(cx), int(cy)
        draw_gaussian(hm[int(cls)], ix, iy, radius)
        wh[k] = bw, bh
        reg[k] = cx - ix, cy - iy
        ind[k] = iy * out_w + ix
        mask[k] = 1
        k += 1
    return {"hm": hm, "wh": wh, "reg": reg, "ind": ind, "reg_mask": mask}


def dense_from_centers(values: np.ndarray, ind: np.ndarray, mask: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Fill every cell with the value of its nearest object centre (the XZ oracle map, REFERENCE §6).

    Used by error analysis so that decoding at any peak reads a ground-truth size or offset.
    Returns (D, H, W) for `values` of shape (M, D).
    """
    out_h, out_w = out_hw
    d = values.shape[1]
    valid = mask > 0
    dense = np.zeros((d, out_h, out_w), np.float32)
    if not valid.any():
        return dense
    seeds = ind[valid]
    sy, sx = seeds // out_w, seeds % out_w
    yy, xx = np.mgrid[0:out_h, 0:out_w]
    dist = (yy[None] - sy[:, None, None]) ** 2 + (xx[None] - sx[:, None, None]) ** 2
    nearest = dist.argmin(axis=0)
    return values[valid][nearest].transpose(2, 0, 1).astype(np.float32)


def corner_targets(
    boxes: np.ndarray,
    classes: np.ndarray,
    num_classes: int,
    out_hw: tuple[int, int],
    max_objs: int,
    radius_mode: str,
    min_overlap: float,
    centers: bool = False,
    shifts: bool = False,
) -> dict[str, np.ndarray]:
    """CornerNet targets (CornerNet §3.2-3.3; REFERENCE §2.4), plus the triplet centre keypoint with `centers`
    and CentripetalNet's guiding and centripetal shifts with `shifts`.

    `boxes` are (N, 4) x1, y1, x2, y2 in output-grid units (input pixels × out/inp, 128/511 at 511),
    kept in the given order (the caller orders objects by category, as CN does). Boxes are clipped to
    the grid and dropped when empty; each corner gets a gaussian at its truncated cell, its fractional
    offset and the cell's flat index, which gathers its embedding and offset. The radius uses the
    ceiled output-grid box size. The centre ((x1+x2)/2, (y1+y2)/2) gets the same radius with
    σ = diameter/5 and no embedding (REFERENCE §2.3-2.4 DK). The guiding shift runs linearly from the
    integer corner cell to the box centre and the centripetal shift is log(|centre − corner|) from the float
    corner, per axis (CentripetalNet eq. 1 and 7 with s = 1 on the output grid; REFERENCE §2.4 KD).
    """
    out_h, out_w = out_hw
    kinds = ("tl", "br", "ct") if centers else ("tl", "br")
    t: dict[str, np.ndarray] = {}
    for kind in kinds:
        t[f"{kind}_heat"] = np.zeros((num_classes, out_h, out_w), np.float32)
        t[f"{kind}_regr"] = np.zeros((max_objs, 2), np.float32)
        t[f"{kind}_ind"] = np.zeros((max_objs,), np.int64)
    if shifts:
        for kind in ("tl", "br"):
            t[f"{kind}_guiding_shift"] = np.zeros((max_objs, 2), np.float32)
            t[f"{kind}_centripetal_shift"] = np.zeros((max_objs, 2), np.float32)
    t["tag_mask"] = np.zeros((max_objs,), np.float32)
    classes = np.asarray(classes).reshape(-1)
    for k, (i, (x1, y1, x2, y2)) in enumerate(kept_corner_objects(boxes, out_hw, max_objs)):
        cls = classes[i]
        radius = gaussian_radius(math.ceil(y2 - y1), math.ceil(x2 - x1), min_overlap, radius_mode)
        points = {"tl": (x1, y1), "br": (x2, y2), "ct": ((x1 + x2) / 2, (y1 + y2) / 2)}
        for kind in kinds:
            fx, fy = points[kind]
            ix, iy = int(fx), int(fy)
            draw_gaussian(t[f"{kind}_heat"][int(cls)], ix, iy, radius, 5.0 if kind == "ct" else 6.0)
            t[f"{kind}_regr"][k] = fx - ix, fy - iy
            t[f"{kind}_ind"][k] = iy * out_w + ix
        if shifts:
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            t["tl_guiding_shift"][k] = cx - int(x1), cy - int(y1)
            t["br_guiding_shift"][k] = int(x2) - cx, int(y2) - cy
            t["tl_centripetal_shift"][k] = np.log(cx - x1), np.log(cy - y1)
            t["br_centripetal_shift"][k] = np.log(x2 - cx), np.log(y2 - cy)
        t["tag_mask"][k] = 1
    return t


def kept_corner_objects(boxes: np.ndarray, out_hw: tuple[int, int], max_objs: int) -> list[tuple[int, np.ndarray]]:
    """The objects corner targets train on, in order: (index into `boxes`, the box clipped to the grid's last
    cell) for each box left with a positive size, at most `max_objs` (CN `kp_detection`, REFERENCE §2.4)."""
    out_h, out_w = out_hw
    kept: list[tuple[int, np.ndarray]] = []
    for i, box in enumerate(np.asarray(boxes, np.float32).reshape(-1, 4)):
        if len(kept) >= max_objs:
            break
        x1, x2 = np.clip(box[[0, 2]], 0, out_w - 1)
        y1, y2 = np.clip(box[[1, 3]], 0, out_h - 1)
        if x2 - x1 > 0 and y2 - y1 > 0:
            kept.append((i, np.array([x1, y1, x2, y2], np.float32)))
    return kept


MASK_SIZE = 28  # the mask head's output side (CentripetalNet §3.3)


def mask_targets(
    segmentations: list[Any],
    matrix: np.ndarray,
    image_hw: tuple[int, int],
    boxes: np.ndarray,
    classes: np.ndarray,
    ratio: float,
    out_hw: tuple[int, int],
    max_objs: int,
) -> dict[str, np.ndarray]:
    """Instance-mask targets of the objects `corner_targets` keeps (CentripetalNet §3.3, eq. 8).

    `segmentations` are the COCO polygons or RLEs of the original image (`image_hw`), `matrix` the 2x3
    augmentation affine from original to input pixels, `boxes` the augmented input-pixel boxes and `ratio`
    output/input. Each kept object's RoI is its clipped output-grid box; its target is the object's mask
    resampled onto a 28x28 grid over that RoI (pixel centres, bilinear, ≥ 0.5).
    """
    t = {"mask_rois": np.zeros((max_objs, 4), np.float32), "mask_classes": np.zeros((max_objs,), np.int64),
         "mask_valid": np.zeros((max_objs,), np.float32),
         "mask_targets": np.zeros((max_objs, MASK_SIZE, MASK_SIZE), np.uint8)}
    h, w = image_hw
    for k, (i, roi) in enumerate(kept_corner_objects(np.asarray(boxes, np.float32) * ratio, out_hw, max_objs)):
        x1, y1, x2, y2 = roi / ratio
        to_grid = np.array([[MASK_SIZE / (x2 - x1), 0, -x1 * MASK_SIZE / (x2 - x1)],
                            [0, MASK_SIZE / (y2 - y1), -y1 * MASK_SIZE / (y2 - y1)], [0, 0, 1]])
        warp = (to_grid @ np.vstack([matrix, [0, 0, 1]]))[:2]
        mask = segmentation_mask(segmentations[i], h, w)
        # warpAffine samples at integer coordinates: shift both frames to pixel centres (x + 0.5)
        centred = warp.copy()
        centred[:, 2] += warp[:, :2].sum(1) * 0.5 - 0.5
        crop = cv2.warpAffine(mask.astype(np.float32), centred, (MASK_SIZE, MASK_SIZE), flags=cv2.INTER_LINEAR)
        t["mask_targets"][k] = crop >= 0.5
        t["mask_rois"][k] = roi
        t["mask_classes"][k] = int(np.asarray(classes).reshape(-1)[i])
        t["mask_valid"][k] = 1
    return t


def segmentation_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygons, RLE or uncompressed RLE) as an (height, width) uint8 mask."""
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_utils.decode(rle)



def pose_targets(
    boxes: np.ndarray,
    classes: np.ndarray,
    keypoints: np.ndarray,
    num_classes: int,
    out_hw: tuple[int, int],
    max_objs: int,
    radius_mode: str,
    min_overlap: float,
) -> dict[str, np.ndarray]:
    """Multi-person pose targets (objects as points §4.2): the centre targets of `center_targets`, plus per person
    the joint offsets from its integer centre cell `hps` (max_objs, 2J) and their mask (labelled joints, v > 0,
    inside the grid), J joint heatmaps `hm_hp` splatted with the person's centre radius, and each joint's sub-cell
    offset `hp_offset`, flat index `hp_ind` and mask `hp_mask` (max_objs·J). A person with no labelled joint stays a
    centre positive but trains no size or offset (XZ `datasets/sample/multi_pose.py`: it clears `reg_mask`; its
    0.9999 centre mark is overwritten by the centre gaussian drawn after it).

    `boxes` (N, 4) and `keypoints` (N, J, 3) x, y, v are in output-grid units, aligned."""
    out_h, out_w = out_hw
    joints = keypoints.shape[1]
    t = center_targets(boxes, classes, num_classes, out_hw, max_objs, radius_mode, min_overlap)
    t["hps"] = np.zeros((max_objs, 2 * joints), np.float32)
    t["hps_mask"] = np.zeros((max_objs, 2 * joints), np.float32)
    t["hm_hp"] = np.zeros((joints, out_h, out_w), np.float32)
    t["hp_offset"] = np.zeros((max_objs * joints, 2), np.float32)
    t["hp_ind"] = np.zeros((max_objs * joints,), np.int64)
    t["hp_mask"] = np.zeros((max_objs * joints,), np.float32)
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    k = 0
    for box, cls, kps in zip(boxes, np.asarray(classes).reshape(-1), keypoints):
        if k >= max_objs:
            break
        x1, x2 = np.clip(box[[0, 2]], 0, out_w - 1)
        y1, y2 = np.clip(box[[1, 3]], 0, out_h - 1)
        if x2 - x1 <= 0 or y2 - y1 <= 0:  # dropped by center_targets too: k stays aligned with its rows
            continue
        cx, cy = int(t["ind"][k] % out_w), int(t["ind"][k] // out_w)
        radius = gaussian_radius(math.ceil(y2 - y1), math.ceil(x2 - x1), min_overlap, radius_mode)
        labelled = kps[:, 2] > 0
        if not labelled.any():
            t["reg_mask"][k] = 0
        for j in np.flatnonzero(labelled & (kps[:, 0] >= 0) & (kps[:, 0] < out_w) & (kps[:, 1] >= 0) & (kps[:, 1] < out_h)):
            x, y = float(kps[j, 0]), float(kps[j, 1])
            ix, iy = int(x), int(y)
            t["hps"][k, 2 * j : 2 * j + 2] = x - cx, y - cy
            t["hps_mask"][k, 2 * j : 2 * j + 2] = 1
            t["hp_offset"][k * joints + j] = x - ix, y - iy
            t["hp_ind"][k * joints + j] = iy * out_w + ix
            t["hp_mask"][k * joints + j] = 1
            draw_gaussian(t["hm_hp"][j], ix, iy, radius)
        k += 1
    return t
