"""The synthetic `shapes` detection set: kpnet's embedded default data, written in COCO format.

Every object is a filled polygon (circle, square, triangle, star, hexagon, cross) in a random
colour that contrasts with the textured background (noise, gradient, stripes or blotches),
drawn at COCO small, medium and large scales, with overlaps, occlusion, same-class crowds and
clutter (thin lines, arcs and dots that are not objects).

Box convention: `bbox` is the full (amodal) extent of the polygon in continuous pixel
coordinates (pixel i covers [i, i+1)), `segmentation` is that polygon and `area` its area.
Occlusion is limited so that boxes stay honest for a modal reader too: a shape is only
placed if every shape under it keeps at least `MIN_VISIBLE` of its pixels and the box of its
visible pixels keeps IoU >= `MIN_VISIBLE_BOX_IOU` with its full box, and no shape covers the
centre of a shape under it (CenterNet's keypoint stays visible). No two objects share a
stride-4 centre cell. Each image is generated from its own seed `(seed, split, index)`, so a
seed reproduces byte-identical JPEGs and JSON (for a given NumPy and OpenCV build), and the
val split does not depend on `num_train`. Only circles, squares and hexagons fill enough of
their box to reach the COCO-large area (> 96^2) inside a 128-pixel image.
"""

from __future__ import annotations

import functools
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torchvision.ops import box_iou

from kpnet.io import atomic_write_bytes, atomic_write_json

CLASS_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "cross")

JPEG_QUALITY = 92
MIN_IMAGE_SIZE = 64
MIN_VISIBLE = 0.6
MIN_VISIBLE_BOX_IOU = 0.8
CENTRE_STRIDE = 4
# sqrt(area) drawn per COCO scale (small < 32, medium 32-96, large > 96), clear of the limits.
SCALE_SQRT_AREA = {"small": (13.0, 30.0), "medium": (34.0, 90.0), "large": (99.0, 116.0)}
SMALL_PROB = 0.35
CROWD_PROB = 0.15
LARGE_PROB = 0.15
PLACEMENT_TRIES = 10
_SUBPIXEL_SHIFT = 4
_SPLIT_CODES = {"train": 0, "val": 1}


def _regular(n: int, start: float) -> np.ndarray:
    t = start + 2.0 * np.pi * np.arange(n) / n
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def _star() -> np.ndarray:
    outer = _regular(5, -np.pi / 2)
    inner = 0.45 * _regular(5, -np.pi / 2 + np.pi / 5)
    return np.stack([outer, inner], axis=1).reshape(10, 2)


def _cross(arm: float = 0.36) -> np.ndarray:
    a = arm / 2
    return np.array([[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a],
                     [a, 1], [-a, 1], [-a, a], [-1, a], [-1, -a], [-a, -a]])


# Unit outlines (centred at 0) and the rotation range (degrees, +-) each class is drawn with.
_OUTLINES: dict[str, tuple[np.ndarray, float]] = {
    "circle": (_regular(32, 0.0), 0.0),
    "square": (np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]]), 12.0),
    "triangle": (_regular(3, -np.pi / 2), 15.0),
    "star": (_star(), 36.0),
    "hexagon": (_regular(6, 0.0), 30.0),
    "cross": (_cross(), 12.0),
}


@dataclass
class _Placed:
    polygon: np.ndarray  # (K, 2) float, continuous pixel coordinates
    mask: np.ndarray  # (S, S) bool, pixels the polygon covers
    window: tuple[slice, slice]  # rows, cols holding every pixel of the mask
    pixels: int  # mask.sum()
    box: tuple[float, float, float, float]  # x1, y1, x2, y2
    class_index: int
    colour: np.ndarray


def _polygon_area(p: np.ndarray) -> float:
    """Shoelace formula."""
    q = np.concatenate([p[1:], p[:1]])
    return 0.5 * abs(float(np.dot(p[:, 0], q[:, 1]) - np.dot(p[:, 1], q[:, 0])))


def _rotated_outline(rng: np.random.Generator, name: str) -> np.ndarray:
    """The class outline under a random rotation, scaled so its extent is the unit square [0, 1]^2."""
    outline, max_rot = _OUTLINES[name]
    theta = np.deg2rad(rng.uniform(-max_rot, max_rot))
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    p = outline @ rot.T
    lo, hi = p.min(axis=0), p.max(axis=0)
    return (p - lo) / (hi - lo)


def _max_side(size: int) -> float:
    return 0.95 * size - 2


def _fill_fraction(outline: np.ndarray) -> float:
    """Polygon area over the area of its bounding box."""
    extent = outline.max(axis=0) - outline.min(axis=0)
    return _polygon_area(outline) / float(extent[0] * extent[1])


@functools.lru_cache(maxsize=4)
def _large_classes(size: int) -> list[int]:
    """Classes whose unrotated outline can cover a COCO-large area inside the image."""
    need = SCALE_SQRT_AREA["large"][0] ** 2
    return [c for c, n in enumerate(CLASS_NAMES) if _fill_fraction(_OUTLINES[n][0]) * _max_side(size) ** 2 > need]


def _fill(canvas: np.ndarray, polygon: np.ndarray, colour: Any, anti_alias: bool) -> None:
    """Fill `polygon` (continuous coordinates) with OpenCV's pixel-centre convention, sub-pixel exact."""
    pts = np.round((polygon - 0.5) * (1 << _SUBPIXEL_SHIFT)).astype(np.int32)
    cv2.fillPoly(canvas, [pts], colour, lineType=cv2.LINE_AA if anti_alias else cv2.LINE_8,
                 shift=_SUBPIXEL_SHIFT)


def _polygon_mask(polygon: np.ndarray, size: int) -> np.ndarray:
    m = np.zeros((size, size), np.uint8)
    _fill(m, polygon, 1, anti_alias=False)
    return m.astype(bool)


def _luminance(bgr: np.ndarray) -> np.ndarray:
    return bgr[..., 0] * 0.114 + bgr[..., 1] * 0.587 + bgr[..., 2] * 0.299


@functools.lru_cache(maxsize=4)
def _grid(size: int) -> np.ndarray:
    return np.mgrid[0:size, 0:size].astype(np.float32)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A textured float32 BGR background: noise, a linear gradient, stripes or low-frequency blotches."""
    kind = rng.integers(4)
    base = rng.uniform(20, 235, size=3).astype(np.float32)
    yy, xx = _grid(size)
    if kind == 0:
        img = base + rng.standard_normal((size, size, 1), dtype=np.float32) * np.float32(rng.uniform(6, 18))
    elif kind == 1:
        theta = rng.uniform(0, 2 * np.pi)
        t = (math.cos(theta) * xx + math.sin(theta) * yy) / size
        t = (t - t.min()) / np.float32(max(float(t.max() - t.min()), 1e-6))
        other = rng.uniform(20, 235, size=3).astype(np.float32)
        img = base + t[..., None] * (other - base)
    elif kind == 2:
        theta = rng.uniform(0, np.pi)
        period = rng.uniform(6, 20)
        wave = np.sin((2 * math.pi / period) * (math.cos(theta) * xx + math.sin(theta) * yy))
        amplitude = np.float32(rng.uniform(12, 35)) * rng.choice([-1.0, 1.0], size=3).astype(np.float32)
        img = base + wave[..., None] * amplitude
    else:
        coarse = rng.normal(0, 1, size=(6, 6, 3)).astype(np.float32)
        img = base + cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC) * np.float32(rng.uniform(15, 35))
    return np.clip(img, 0, 255, out=img)


def _draw_clutter(rng: np.random.Generator, img: np.ndarray) -> None:
    """Distractor marks that are not objects: a few thin lines, partial arcs and dots."""
    size = img.shape[0]

    def colour() -> tuple[float, ...]:
        return tuple(float(c) for c in rng.uniform(0, 255, size=3))

    for _ in range(rng.integers(0, 3)):
        p = rng.uniform(0, size, size=2)
        q = p + rng.uniform(-50, 50, size=2)
        cv2.line(img, tuple(int(v) for v in p), tuple(int(v) for v in q), colour(), 1, cv2.LINE_AA)
    for _ in range(rng.integers(0, 2)):
        c = tuple(int(v) for v in rng.uniform(0, size, size=2))
        axes = tuple(int(v) for v in rng.uniform(6, 25, size=2))
        start = float(rng.uniform(0, 360))
        cv2.ellipse(img, c, axes, 0.0, start, start + float(rng.uniform(40, 160)), colour(), 1, cv2.LINE_AA)
    for _ in range(rng.integers(0, 7)):
        c = tuple(int(v) for v in rng.uniform(0, size, size=2))
        cv2.circle(img, c, int(rng.integers(1, 3)), colour(), -1, cv2.LINE_AA)


def _pick_colour(rng: np.random.Generator, bg_region: np.ndarray, others: list[np.ndarray]) -> np.ndarray:
    """A random colour whose luminance differs from the background under the box by >= 60 and
    that is far (>= 90 in BGR) from the colours of the objects it overlaps."""
    bg_lum = float(_luminance(bg_region.reshape(-1, 3)).mean())
    for _ in range(60):
        c = rng.uniform(0, 255, size=3)
        if abs(float(_luminance(c)) - bg_lum) >= 60 and all(np.linalg.norm(c - o) >= 90 for o in others):
            return c
    return np.full(3, 0.0 if bg_lum > 127 else 255.0)


def _window(box: tuple[float, float, float, float], size: int) -> tuple[slice, slice]:
    return (slice(max(int(box[1]) - 1, 0), min(int(np.ceil(box[3])) + 1, size)),
            slice(max(int(box[0]) - 1, 0), min(int(np.ceil(box[2])) + 1, size)))


def _overlaps(a: tuple[slice, slice], b: tuple[slice, slice]) -> bool:
    return a[0].start < b[0].stop and b[0].start < a[0].stop and a[1].start < b[1].stop and b[1].start < a[1].stop


def _visible_ok(placed: list[_Placed], owner: np.ndarray, mask: np.ndarray, window: tuple[slice, slice]) -> bool:
    """Would drawing `mask` on top leave every earlier object mostly visible, with a near-full visible
    box and its centre pixel uncovered? `owner` holds, per pixel, the index of the top-most object
    drawn there (-1 for background)."""
    for j, obj in enumerate(placed):
        if not _overlaps(obj.window, window):
            continue
        if mask[int((obj.box[1] + obj.box[3]) / 2), int((obj.box[0] + obj.box[2]) / 2)]:
            return False
        rows, cols = obj.window
        hidden_now = mask[rows, cols]
        mine = owner[rows, cols] == j
        if not (mine & hidden_now).any():
            continue
        visible = mine & ~hidden_now
        if visible.sum() < MIN_VISIBLE * obj.pixels:
            return False
        vr, vc = np.flatnonzero(visible.any(axis=1)), np.flatnonzero(visible.any(axis=0))
        vbox = (float(cols.start + vc[0]), float(rows.start + vr[0]),
                float(cols.start + vc[-1] + 1), float(rows.start + vr[-1] + 1))
        iou = box_iou(torch.tensor([vbox], dtype=torch.float64), torch.tensor([obj.box], dtype=torch.float64))
        if float(iou) < MIN_VISIBLE_BOX_IOU:
            return False
    return True


def _centre_cell(box: tuple[float, float, float, float]) -> tuple[int, int]:
    return int((box[0] + box[2]) / 2 // CENTRE_STRIDE), int((box[1] + box[3]) / 2 // CENTRE_STRIDE)


def _target_area(rng: np.random.Generator, scale: str) -> float:
    lo, hi = SCALE_SQRT_AREA[scale]
    return float(rng.uniform(lo, hi)) ** 2


def _try_place(rng: np.random.Generator, size: int, bg: np.ndarray, placed: list[_Placed], owner: np.ndarray,
               cls: int, area: float, near: tuple[float, float] | None) -> _Placed | None:
    """Propose shapes of polygon area `area` (capped by the image) at random positions, or around
    `near`, until one fits the occlusion and centre-cell rules."""
    cells = {_centre_cell(p.box) for p in placed}
    for _ in range(PLACEMENT_TRIES):
        unit = _rotated_outline(rng, CLASS_NAMES[cls])
        side = math.sqrt(area / _polygon_area(unit))
        aspect = math.exp(rng.uniform(math.log(0.75), math.log(1.33)))
        w, h = min(side * math.sqrt(aspect), _max_side(size)), min(side / math.sqrt(aspect), _max_side(size))
        if near is None:
            x1, y1 = rng.uniform(1, size - 1 - w), rng.uniform(1, size - 1 - h)
        else:
            cx, cy = np.array(near) + rng.normal(0, 0.9 * side, size=2)
            x1 = float(np.clip(cx - w / 2, 1, size - 1 - w))
            y1 = float(np.clip(cy - h / 2, 1, size - 1 - h))
        polygon = np.round(unit * np.array([w, h]) + np.array([x1, y1]), 2)
        box = (float(polygon[:, 0].min()), float(polygon[:, 1].min()),
               float(polygon[:, 0].max()), float(polygon[:, 1].max()))
        if _centre_cell(box) in cells:
            continue
        mask = _polygon_mask(polygon, size)
        window = _window(box, size)
        pixels = int(mask[window].sum())
        if pixels == 0 or not _visible_ok(placed, owner, mask, window):
            continue
        others = [p.colour for p in placed if _overlaps(p.window, window) and (p.mask[window] & mask[window]).any()]
        obj = _Placed(polygon, mask, window, pixels, box, cls, _pick_colour(rng, bg[window], others))
        owner[mask] = len(placed)
        return obj
    return None


def _layout(rng: np.random.Generator, size: int, bg: np.ndarray) -> list[_Placed]:
    """Choose the objects of one image: an optional large one first, an optional same-class crowd
    of small objects, then singles of random class and scale: 1-6 objects (3-7 with a crowd)."""
    placed: list[_Placed] = []
    owner = np.full((size, size), -1, np.int16)

    def add(cls: int, area: float, near: tuple[float, float] | None = None) -> None:
        obj = _try_place(rng, size, bg, placed, owner, cls, area, near)
        if obj is not None:
            placed.append(obj)

    large = _large_classes(size)
    if large and rng.random() < LARGE_PROB:
        add(large[int(rng.integers(len(large)))], _target_area(rng, "large"))
    if rng.random() < CROWD_PROB:
        cls, area = int(rng.integers(len(CLASS_NAMES))), _target_area(rng, "small")
        centre = (float(rng.uniform(0.3, 0.7) * size), float(rng.uniform(0.3, 0.7) * size))
        for _ in range(int(rng.integers(3, 6))):
            add(cls, area * float(rng.uniform(0.8, 1.25)), centre)
        extra = int(rng.integers(0, 3))
    else:
        extra = max(int(rng.integers(1, 7)) - len(placed), 0 if placed else 1)
    for _ in range(extra):
        scale = "small" if rng.random() < SMALL_PROB else "medium"
        add(int(rng.integers(len(CLASS_NAMES))), _target_area(rng, scale))
    return placed


def render_image(seed: int, split: str, index: int, size: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Draw one image (uint8 BGR) and its annotations (category_id, bbox, area, segmentation)."""
    rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
    bg = _background(rng, size)
    canvas = np.round(bg).astype(np.uint8)
    _draw_clutter(rng, canvas)
    objects = _layout(rng, size, bg)
    for obj in objects:
        _fill(canvas, obj.polygon, tuple(float(c) for c in obj.colour), anti_alias=True)
    noise = rng.standard_normal((size, size, 1), dtype=np.float32) * 3.0
    image = np.clip(np.round(canvas + noise), 0, 255).astype(np.uint8)
    anns = []
    for obj in objects:
        x1, y1, x2, y2 = obj.box
        area = _polygon_area(obj.polygon)
        anns.append({
            "category_id": obj.class_index + 1,
            "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
            "area": round(area, 2),
            "segmentation": [[float(v) for v in obj.polygon.reshape(-1)]],
        })
    return image, anns


def _area_bucket(area: float) -> str:
    return "small" if area < 32**2 else ("medium" if area <= 96**2 else "large")


def _render_split(images_dir: Path, split: str, count: int, size: int, seed: int) -> list[list[dict[str, Any]]]:
    """Render and encode (fixed JPEG quality) every image of a split; return their annotations.
    Files are written atomically by a few threads, which overlap the per-file fsync with drawing."""
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
    out = []
    with ThreadPoolExecutor(max_workers=4) as writers:
        pending = []
        for index in range(count):
            image, anns = render_image(seed, split, index, size)
            ok, buf = cv2.imencode(".jpg", image, params)
            if not ok:
                raise OSError(f"{images_dir / _file_name(index)}: JPEG encoding failed")
            pending.append(writers.submit(atomic_write_bytes, images_dir / _file_name(index), buf.tobytes()))
            out.append(anns)
        for future in pending:
            future.result()
    return out


def _file_name(index: int) -> str:
    return f"{index:06d}.jpg"


def _write_split(root: Path, split: str, count: int, size: int, seed: int) -> dict[str, Any]:
    images, annotations = [], []
    buckets = {"small": 0, "medium": 0, "large": 0}
    for index, anns in enumerate(_render_split(root / split, split, count, size, seed)):
        image_id = index + 1
        images.append({"id": image_id, "file_name": _file_name(index), "width": size, "height": size})
        for ann in anns:
            buckets[_area_bucket(ann["area"])] += 1
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **ann, "iscrowd": 0})
    doc = {
        "info": {"description": f"kpnet synthetic shapes, split {split}, seed {seed}, size {size}"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CLASS_NAMES)],
    }
    ann_path = root / "annotations" / f"instances_{split}.json"
    atomic_write_json(ann_path, doc)
    return {"images_dir": str(root / split), "annotations": str(ann_path), "images": len(images),
            "boxes": len(annotations), "sizes": buckets}


def make_shapes(out_dir: str | Path, num_train: int = 2000, num_val: int = 200,
                image_size: int = 128, seed: int = 0) -> dict[str, Any]:
    """Write the shapes set under `out_dir` (train/, val/, annotations/) and return paths and counts."""
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE}, got {image_size}")
    if num_train < 0 or num_val < 0:
        raise ValueError("num_train and num_val must be >= 0")
    root = Path(out_dir)
    start = time.perf_counter()
    splits = {split: _write_split(root, split, n, image_size, seed)
              for split, n in (("train", num_train), ("val", num_val))}
    return {"root": str(root), "classes": list(CLASS_NAMES), "image_size": image_size, "seed": seed,
            **splits, "seconds": round(time.perf_counter() - start, 3)}
