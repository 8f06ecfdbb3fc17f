"""What the heads see, drawn over the image: detections with class names and scores, ground truth
in its own colour, and each heat head (sigmoid, max over classes) mapped back to image pixels
through the test pipeline's resize-and-border mapping (REFERENCE §4.6).

Every overlay is one function `image -> image` built from `draw_boxes` or `blend_heat`, so a new
kind (e.g. the triplet central regions) is one more function beside these.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import Tensor

from kpnet.config import Recipe
from kpnet.data.poses import SKELETON
from kpnet.detectors.base import Detections, Detector
from kpnet.engine.inference import detect_with_heads

GT_COLOUR = (0, 255, 0)  # BGR green; the detection palette below has no pure green
PALETTE = (
    (0, 0, 255), (255, 128, 0), (255, 0, 255), (0, 200, 255), (255, 255, 0), (128, 0, 255),
    (0, 128, 255), (255, 0, 128), (128, 128, 255), (200, 120, 60), (60, 60, 200), (180, 0, 180),
)
FONT = cv2.FONT_HERSHEY_SIMPLEX


def class_colour(cls: int) -> tuple[int, int, int]:
    """A fixed BGR colour per contiguous class index."""
    return PALETTE[cls % len(PALETTE)]


def line_thickness(height: int, width: int) -> int:
    """Box outline width in pixels: 1 up to 480 px, growing with the image."""
    return max(1, round(max(height, width) / 480))


def draw_boxes(
    image: np.ndarray, boxes: np.ndarray, labels: Sequence[str], colours: Sequence[tuple[int, int, int]]
) -> np.ndarray:
    """A copy of a BGR image with x1, y1, x2, y2 boxes outlined and each label on a filled tag at its top-left."""
    out = image.copy()
    h, w = out.shape[:2]
    thick = line_thickness(h, w)
    scale = 0.4 * thick
    for (x1, y1, x2, y2), label, colour in zip(np.asarray(boxes, np.float64).reshape(-1, 4), labels, colours, strict=True):
        p1 = (int(round(min(x1, x2))), int(round(min(y1, y2))))
        p2 = (int(round(max(x1, x2))), int(round(max(y1, y2))))
        cv2.rectangle(out, p1, p2, colour, thick)
        if not label:
            continue
        (tw, th), base = cv2.getTextSize(label, FONT, scale, 1)
        top = p1[1] - th - base - 2 if p1[1] - th - base - 2 >= 0 else p1[1]  # above the box, or inside at the top edge
        cv2.rectangle(out, (p1[0], top), (p1[0] + tw + 2, top + th + base + 2), colour, -1)
        ink = (0, 0, 0) if sum(colour) > 380 else (255, 255, 255)
        cv2.putText(out, label, (p1[0] + 1, top + th + 1), FONT, scale, ink, 1, cv2.LINE_AA)
    return out


def draw_detections(image: np.ndarray, dets: Detections, class_names: Sequence[str]) -> np.ndarray:
    """Detections as boxes coloured by class, labelled 'name score'; a pose family's joints as skeletons."""
    classes = dets.classes.tolist()
    labels = [f"{class_names[c]} {s:.2f}" for c, s in zip(classes, dets.scores.tolist(), strict=True)]
    colours = [class_colour(c) for c in classes]
    out = draw_boxes(image, dets.boxes.numpy(), labels, colours)
    return out if dets.keypoints is None else draw_skeletons(out, dets.keypoints.numpy(), colours, confidence=True)


def draw_skeletons(image: np.ndarray, keypoints: np.ndarray, colours: Sequence[tuple[int, int, int]],
                   confidence: bool) -> np.ndarray:
    """COCO's limbs (`SKELETON`) and joints of (N, J, 3) keypoints. With `confidence` the third value is a joint's
    confidence: its dot fades to grey as it falls (limbs join joints above 0.1); otherwise it is COCO's visibility v:
    2 a filled dot, 1 (labelled, hidden) a ring, 0 not drawn."""
    out = image.copy()
    thick = line_thickness(*out.shape[:2])
    radius = max(2, 2 * thick)
    for person, colour in zip(np.asarray(keypoints, np.float64), colours, strict=True):
        shown = person[:, 2] > (0.1 if confidence else 0)
        for a, b in SKELETON:
            if shown[a - 1] and shown[b - 1]:
                cv2.line(out, tuple(int(round(v)) for v in person[a - 1, :2]),
                         tuple(int(round(v)) for v in person[b - 1, :2]), colour, thick, cv2.LINE_AA)
        for (x, y, v), on in zip(person, shown, strict=True):
            centre = (int(round(x)), int(round(y)))
            if confidence:
                c = float(np.clip(v, 0.0, 1.0))
                cv2.circle(out, centre, radius, tuple(int(c * k + (1 - c) * 128) for k in colour), -1, cv2.LINE_AA)
            elif on:
                cv2.circle(out, centre, radius, colour, -1 if v == 2 else thick, cv2.LINE_AA)
    return out


def draw_regions(image: np.ndarray, regions: np.ndarray, centres: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """Central regions (thin outlines, the box's class colour) and, as filled dots, the keypoints that validated
    each box: (N, 2) the triplet centre (CenterNet triplets §3.1), or (N, 4) CentripetalNet's two centres
    decoded from the corners (CentripetalNet eq. 1); a NaN point draws no dot."""
    out = image.copy()
    radius = 2 * line_thickness(*out.shape[:2])
    flat = np.asarray(centres, np.float64)
    points = flat.reshape(len(classes), flat.size // max(len(classes), 1) // 2, 2)  # (N, points per box, 2)
    for (x1, y1, x2, y2), row, cls in zip(np.asarray(regions, np.float64).reshape(-1, 4), points, classes, strict=True):
        colour = class_colour(int(cls))
        cv2.rectangle(out, (int(round(x1)), int(round(y1))), (int(round(x2)), int(round(y2))), colour, 1)
        for cx, cy in row:
            if np.isfinite(cx) and np.isfinite(cy):
                cv2.circle(out, (int(round(cx)), int(round(cy))), radius, colour, -1, cv2.LINE_AA)
    return out


def draw_masks(image: np.ndarray, masks: np.ndarray, classes: Sequence[int], alpha: float = 0.5) -> np.ndarray:
    """(N, H, W) bool instance masks filled in their class colour at `alpha` over the image, with outlines
    (CentripetalNet §3.3, Fig. 8); later (lower-scoring) masks are drawn under earlier ones."""
    out = image.copy()
    thick = line_thickness(*out.shape[:2])
    for mask, cls in reversed(list(zip(masks, classes, strict=True))):
        colour = np.array(class_colour(int(cls)), np.float32)
        out[mask] = (out[mask] * (1 - alpha) + colour * alpha).astype(out.dtype)
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, tuple(int(c) for c in colour), thick)
    return out


def draw_ground_truth(image: np.ndarray, boxes: np.ndarray, labels: Sequence[str],
                      keypoints: np.ndarray | None = None) -> np.ndarray:
    """Ground-truth x1, y1, x2, y2 boxes in GT_COLOUR, labelled with their class names, and their skeletons when
    the annotations have COCO keypoints (N, J, 3)."""
    out = draw_boxes(image, boxes, labels, [GT_COLOUR] * len(labels))
    return out if keypoints is None else draw_skeletons(out, keypoints, [GT_COLOUR] * len(labels), confidence=False)


def heat_to_image(heat: np.ndarray, meta: dict[str, float], down: float) -> np.ndarray:
    """An output-grid map resampled to original image pixels: image x -> grid (x·scale + border_x)/down.

    The inverse of the box mapping of `kpnet.engine.inference.to_image_coords`.
    """
    s = meta["scale"] / down
    grid_from_image = np.array([[s, 0.0, meta["border_x"] / down], [0.0, s, meta["border_y"] / down]], np.float64)
    size = (int(meta["width"]), int(meta["height"]))
    return cv2.warpAffine(heat.astype(np.float32), grid_from_image, size,
                          flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)


def blend_heat(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """A [0, 1] map of the image's size, colour-mapped (JET) and blended over the BGR image."""
    coloured = cv2.applyColorMap(np.clip(heat * 255.0 + 0.5, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)
    return cv2.addWeighted(image, 1.0 - alpha, coloured, alpha, 0.0)


def class_max_heat(logits: Tensor) -> np.ndarray:
    """A heat head's (C, H, W) logits -> (H, W) sigmoid probability, max over classes."""
    return logits.float().sigmoid().amax(dim=0).cpu().numpy()


@dataclass
class Inference:
    """One image through the test pipeline: detections in image pixels, and the heads of the
    scale nearest 1 (unflipped copy) with the meta and stride that map them back."""

    dets: Detections
    heads: dict[str, Tensor]
    meta: dict[str, float]
    down: float


@torch.no_grad()
def infer(detector: Detector, image: np.ndarray) -> Inference:
    """Run the detector's test pipeline once, keeping the raw heads for the heatmap overlays."""
    detector.eval()
    seen: list[tuple[dict[str, Tensor], dict[str, float], float]] = []

    def recording(batch: Tensor, meta: dict[str, float]) -> dict[str, Tensor]:
        outputs = detector.network_heads(batch, meta)
        seen.append(({k: v[0] for k, v in outputs.items()}, meta, batch.shape[-1] / next(iter(outputs.values())).shape[-1]))
        return outputs

    dets = detect_with_heads(recording, detector, image, detector.test)
    heads, meta, down = min(seen, key=lambda s: abs(s[1]["scale"] - 1.0))
    return Inference(dets, heads, meta, down)


def heat_overlays(image: np.ndarray, inference: Inference, heads: Sequence[str]) -> dict[str, np.ndarray]:
    """Per heat head: its class-max probability blended over the image."""
    return {
        name: blend_heat(image, heat_to_image(class_max_heat(inference.heads[name]), inference.meta, inference.down))
        for name in heads
    }


def class_names_for(recipe: Recipe) -> tuple[list[str], str | None, str]:
    """Names of the model's classes (its data's categories by sorted id), the file they came from, and
    why not: the recipe's val, then train annotation file is read; when neither is readable or the
    count differs from model.num_classes the names are 'class N', the file None and the reason given.
    """
    n = recipe.model.num_classes
    root = Path(recipe.data.root)
    tried = []
    for ann in (root / recipe.data.val_ann, root / recipe.data.train_ann):
        try:
            with open(ann, encoding="utf-8") as f:
                cats = json.load(f)["categories"]
            names = [str(c["name"]) for c in sorted(cats, key=lambda c: c["id"])]
        except (OSError, ValueError, KeyError, TypeError) as e:
            tried.append(f"{ann} ({type(e).__name__})")
            continue
        if len(names) == n:
            return names, str(ann), ""
        tried.append(f"{ann} ({len(names)} categories, the model has {n})")
    return [f"class {i}" for i in range(n)], None, "no class names in " + "; ".join(tried)
