"""COCO's person-keypoint layout (17 joints, flip pairs, limbs) and the synthetic `poses` set: stick-figure people
written in COCO person-keypoint format, so the pose family (objects as points §4.2) trains on a CPU in minutes.

Each person is a frontal stick figure (the person's left on the image's right, as a person facing the camera):
a head with eyes, nose and ears, a torso, and arms and legs of plausible proportions with random joint angles,
at COCO medium and large scales, several per image, overlapping, some truncated by the image border and some
partly hidden behind an occluder. A joint is labelled v=2 where its own person is drawn on top at that pixel,
v=1 where something else covers it, and v=0 (x = y = 0, COCO's convention) outside the image. `bbox` is the
extent of the person's whole silhouette clipped to the image, and `area` the silhouette's pixel count (the OKS
scale). No two joints of an image share a stride-4 cell, as no two shapes share a centre cell: the joint heatmaps'
sub-cell offset `hp_offset` has one value per cell for every joint type (XZ's 2 channels), so joints sharing a cell
would cost ground-truth decoding accuracy the network is not to blame for. Each image comes from its own seed
`(seed, split, index)`, as the shapes set.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from kpnet.data.shapes import JPEG_QUALITY, _background, _draw_clutter, _luminance
from kpnet.io import atomic_write_bytes, atomic_write_json

KEYPOINT_NAMES: tuple[str, ...] = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder", "left_elbow",
    "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle",
    "right_ankle",
)
NUM_JOINTS = len(KEYPOINT_NAMES)
FLIP_PAIRS: tuple[tuple[int, int], ...] = ((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16))
# COCO's `skeleton` (1-based joint ids, as in person_keypoints_*.json): the limbs drawn between joints.
SKELETON: tuple[tuple[int, int], ...] = (
    (16, 14), (14, 12), (17, 15), (15, 13), (12, 13), (6, 12), (7, 13), (6, 7), (6, 8), (7, 9), (8, 10), (9, 11),
    (2, 3), (1, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7),
)
PERSON_CATEGORY: dict[str, Any] = {"id": 1, "name": "person", "supercategory": "person",
                                   "keypoints": list(KEYPOINT_NAMES), "skeleton": [list(p) for p in SKELETON]}

HEIGHT_RANGE = (48.0, 124.0)  # figure height in pixels (head top to ankles, straight legs), in a 128 image
PEOPLE_WEIGHTS = (0.4, 0.35, 0.25)  # 1, 2 or 3 people per image
MAX_BOX_IOU = 0.4  # a new person overlaps each placed one by at most this box IoU
OCCLUDER_PROB = 0.3
PLACEMENT_TRIES = 12
CENTRE_STRIDE = 4
_SHIFT = 4  # OpenCV sub-pixel bits
_SPLIT_CODES = {"train": 0, "val": 1}


def flip_permutation(flip_pairs: tuple[tuple[int, int], ...], num_joints: int) -> list[int]:
    """The joint order after a horizontal flip: joint i takes the place of its partner (left <-> right)."""
    perm = list(range(num_joints))
    for a, b in flip_pairs:
        perm[a], perm[b] = b, a
    return perm


def _direction(angle_deg: float, outward: float) -> np.ndarray:
    """Unit vector at `angle_deg` from straight down, turned towards image-x sign `outward` (+1 right, -1 left)."""
    a = math.radians(angle_deg)
    return np.array([outward * math.sin(a), math.cos(a)])


def skeleton(rng: np.random.Generator, hip: np.ndarray, height: float) -> np.ndarray:
    """(17, 2) joint positions of a frontal figure of `height` pixels whose hip centre is at `hip`."""
    h = height
    lean = math.radians(rng.uniform(-15, 15))
    up = np.array([math.sin(lean), -math.cos(lean)])
    right = np.array([math.cos(lean), math.sin(lean)])  # image right: the person's left side
    neck = hip + 0.30 * h * up
    head = neck + 0.12 * h * up
    yaw = rng.uniform(-0.025, 0.025) * h
    j = np.zeros((NUM_JOINTS, 2))
    j[0] = head + 0.045 * h * (-up) + yaw * right
    j[1], j[2] = head + 0.02 * h * up + (yaw + 0.045 * h) * right, head + 0.02 * h * up + (yaw - 0.045 * h) * right
    j[3], j[4] = head + 0.09 * h * right, head - 0.09 * h * right
    j[5], j[6] = neck + 0.11 * h * right, neck - 0.11 * h * right
    j[11], j[12] = hip + 0.075 * h * right, hip - 0.075 * h * right
    for side, outward in ((0, 1.0), (1, -1.0)):  # 0: the person's left (image right)
        upper = rng.uniform(-15, 165)
        j[7 + side] = j[5 + side] + 0.16 * h * _direction(upper, outward)
        j[9 + side] = j[7 + side] + 0.14 * h * _direction(upper + rng.uniform(-100, 60), outward)
        thigh = rng.uniform(-8, 40)
        j[13 + side] = j[11 + side] + 0.24 * h * _direction(thigh, outward)
        j[15 + side] = j[13 + side] + 0.23 * h * _direction(thigh + rng.uniform(-45, 15), outward)
    return j


def _pt(p: np.ndarray) -> tuple[int, int]:
    return int(round(p[0] * (1 << _SHIFT))), int(round(p[1] * (1 << _SHIFT)))


def _draw_person(canvas: np.ndarray, joints: np.ndarray, height: float, body: tuple[float, ...],
                 skin: tuple[float, ...], dark: tuple[float, ...]) -> None:
    """A stick figure on `canvas` (an image, or a mask with every colour 255): torso, limbs, head and face."""
    t = max(3, int(round(0.085 * height)))
    torso = np.array([_pt(joints[5]), _pt(joints[6]), _pt(joints[12]), _pt(joints[11])], np.int32)
    cv2.fillPoly(canvas, [torso], body, cv2.LINE_AA, _SHIFT)
    for a, b in ((5, 7), (7, 9), (6, 8), (8, 10), (11, 13), (13, 15), (12, 14), (14, 16)):
        cv2.line(canvas, _pt(joints[a]), _pt(joints[b]), body, t, cv2.LINE_AA, _SHIFT)
    neck = (joints[5] + joints[6]) / 2
    head = (joints[3] + joints[4]) / 2
    cv2.line(canvas, _pt(neck), _pt(head), skin, max(2, t - 1), cv2.LINE_AA, _SHIFT)
    r = 0.095 * height
    cv2.circle(canvas, _pt(head), int(round(r * (1 << _SHIFT))), skin, -1, cv2.LINE_AA, _SHIFT)
    dot = int(round(max(1.0, 0.014 * height) * (1 << _SHIFT)))
    for k in (1, 2):
        cv2.circle(canvas, _pt(joints[k]), dot, dark, -1, cv2.LINE_AA, _SHIFT)
    cv2.circle(canvas, _pt(joints[0]), dot, body, -1, cv2.LINE_AA, _SHIFT)
    for k in (3, 4):
        cv2.circle(canvas, _pt(joints[k]), int(round(max(1.5, 0.022 * height) * (1 << _SHIFT))), body, -1,
                   cv2.LINE_AA, _SHIFT)


def _colour(rng: np.random.Generator, bg_lum: float) -> tuple[float, ...]:
    for _ in range(60):
        c = rng.uniform(0, 255, size=3)
        if abs(float(_luminance(c)) - bg_lum) >= 60:
            return tuple(float(v) for v in c)
    return tuple(float(v) for v in (np.zeros(3) if bg_lum > 127 else np.full(3, 255.0)))


def _box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def render_image(seed: int, split: str, index: int, size: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Draw one image (uint8 BGR) of people and their COCO person-keypoint annotations."""
    rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
    bg = _background(rng, size)
    canvas = np.round(bg).astype(np.uint8)
    _draw_clutter(rng, canvas)
    owner = np.full((size, size), -1, np.int32)  # which person is drawn on top at each pixel (-2: an occluder)
    people: list[dict[str, Any]] = []
    taken: set[tuple[int, int]] = set()  # stride-4 cells holding a joint: one sub-cell offset each (hp_offset)
    count = int(rng.choice(len(PEOPLE_WEIGHTS), p=PEOPLE_WEIGHTS)) + 1
    for _ in range(count * PLACEMENT_TRIES):
        if len(people) == count:
            break
        height = float(rng.uniform(*HEIGHT_RANGE)) * size / 128
        hip = rng.uniform([0.15 * size, 0.25 * size], [0.85 * size, 0.75 * size])
        joints = skeleton(rng, hip, height)
        inside = [(int(x) // CENTRE_STRIDE, int(y) // CENTRE_STRIDE) for x, y in joints if 0 <= x < size and 0 <= y < size]
        if len(set(inside)) < len(inside) or taken.intersection(inside):
            continue
        mask = np.zeros((size, size), np.uint8)
        _draw_person(mask, joints, height, (255,), (255,), (255,))
        ys, xs = np.nonzero(mask > 127)
        if len(xs) < 30:
            continue
        box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
        cell = (int((box[0] + box[2]) / 2) // CENTRE_STRIDE, int((box[1] + box[3]) / 2) // CENTRE_STRIDE)
        if any(_box_iou(box, p["box"]) > MAX_BOX_IOU or cell == p["cell"] for p in people):
            continue
        region = bg[int(box[1]):int(box[3]), int(box[0]):int(box[2])]
        bg_lum = float(_luminance(region.reshape(-1, 3)).mean())
        body, skin = _colour(rng, bg_lum), _colour(rng, bg_lum)
        dark = (20.0, 20.0, 20.0) if bg_lum > 90 or _luminance(np.array(skin)) > 110 else (235.0, 235.0, 235.0)
        _draw_person(canvas, joints, height, body, skin, dark)
        owner[mask > 127] = len(people)
        people.append({"joints": joints, "box": box, "cell": cell, "area": float(len(xs))})
        taken.update(inside)
    if people and rng.random() < OCCLUDER_PROB:
        target = people[int(rng.integers(len(people)))]
        x1, y1, x2, y2 = target["box"]
        c = rng.uniform([x1, y1], [x2, y2])
        axes = (int(rng.uniform(0.12, 0.3) * (x2 - x1 + y2 - y1) / 2) + 2, int(rng.uniform(0.08, 0.2) * (y2 - y1)) + 2)
        occ = np.zeros((size, size), np.uint8)
        cv2.ellipse(occ, (int(c[0]), int(c[1])), axes, float(rng.uniform(0, 180)), 0, 360, 255, -1)
        colour = tuple(float(v) for v in rng.uniform(0, 255, size=3))
        canvas[occ > 127] = np.array(colour, np.uint8)
        owner[occ > 127] = -2
    noise = rng.standard_normal((size, size, 1), dtype=np.float32) * 3.0
    image = np.clip(np.round(canvas + noise), 0, 255).astype(np.uint8)
    anns = []
    for i, person in enumerate(people):
        kps: list[float] = []
        for x, y in person["joints"]:
            if not (0 <= x < size and 0 <= y < size):
                kps += [0.0, 0.0, 0]
                continue
            v = 2 if owner[int(y), int(x)] == i else 1
            kps += [round(float(x), 2), round(float(y), 2), v]
        x1, y1, x2, y2 = person["box"]
        anns.append({"category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "area": person["area"],
                     "keypoints": kps, "num_keypoints": sum(1 for v in kps[2::3] if v > 0)})
    return image, anns


def _write_split(root: Path, split: str, count: int, size: int, seed: int) -> dict[str, Any]:
    images, annotations = [], []
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
    for index in range(count):
        image, anns = render_image(seed, split, index, size)
        ok, buf = cv2.imencode(".jpg", image, params)
        if not ok:
            raise OSError(f"{root / split / f'{index:06d}.jpg'}: JPEG encoding failed")
        atomic_write_bytes(root / split / f"{index:06d}.jpg", buf.tobytes())
        images.append({"id": index + 1, "file_name": f"{index:06d}.jpg", "width": size, "height": size})
        for ann in anns:
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, **ann, "iscrowd": 0})
    doc = {"info": {"description": f"kpnet synthetic people, split {split}, seed {seed}, size {size}"},
           "licenses": [], "images": images, "annotations": annotations, "categories": [PERSON_CATEGORY]}
    ann_path = root / "annotations" / f"person_keypoints_{split}.json"
    atomic_write_json(ann_path, doc)
    labelled = sum(a["num_keypoints"] for a in annotations)
    return {"images_dir": str(root / split), "annotations": str(ann_path), "images": len(images),
            "people": len(annotations), "labelled_joints": labelled,
            "visible_joints": sum(1 for a in annotations for v in a["keypoints"][2::3] if v == 2)}


def make_poses(out_dir: str | Path, num_train: int = 2000, num_val: int = 200, image_size: int = 128,
               seed: int = 0) -> dict[str, Any]:
    """Write the synthetic people set under `out_dir` (train/, val/, annotations/person_keypoints_*.json)."""
    if image_size < 64:
        raise ValueError(f"image_size must be >= 64, got {image_size}")
    root = Path(out_dir)
    start = time.perf_counter()
    splits = {split: _write_split(root, split, n, image_size, seed) for split, n in (("train", num_train), ("val", num_val))}
    return {"root": str(root), "image_size": image_size, "seed": seed, **splits,
            "seconds": round(time.perf_counter() - start, 3)}
