"""Per-class soft-NMS and the weighted box merge used for multi-scale testing
(Soft-NMS, Bodla et al. 2017; the CornerNet/CenterNet `external/nms.pyx` behaviour of REFERENCE §4.5).

Semantics, shared by the reference below and the kernel in kpnet/cuda/nms.cu:
- Boxes of one class interact; classes are independent.
- Each step selects the active box with the highest current score (ties: lowest input index),
  keeps it, and decays every other active box of its class that overlaps it (intersection width and
  height > 0): linear w = 1 - IoU if IoU > iou_threshold, gaussian w = exp(-IoU²/sigma), hard w = 0
  if IoU > iou_threshold. A decayed box whose score falls below score_threshold is removed; boxes
  that do not overlap are neither decayed nor tested, as in the reference code.
- plus_one selects the +1-pixel convention: width = x2 - x1 + 1.
- `keep` is honoured: only selected boxes come back (the reference code's stale rows are not
  reproduced, REFERENCE §4.5 "Known bug").
- Merge (`soft_nms_merge`): a kept box's x1, y1 become the average of its own and the overlapping
  active boxes' x1, y1 weighted by tl_score · (1 - w)^weight_exp (x2, y2 by br_score), summed in
  index order. tl/br scores travel with their box (the reference's unswapped columns 5-6 quirk is
  not reproduced).
- All arithmetic is float32, exp and pow kpnet's (kpnet/ops/kpmath.py); scores must be finite.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from kpnet.cuda import dispatch, launch
from kpnet.errors import KpnetError
from kpnet.ops import kpmath

METHODS = {"linear": 1, "gaussian": 2, "hard": 0}


def _check(boxes: Tensor, scores: Tensor, classes: Tensor, method: str) -> None:
    if method not in METHODS:
        raise KpnetError("soft_nms", f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    n = scores.shape[0] if scores.dim() == 1 else -1
    if boxes.shape != (n, 4) or classes.shape != (n,):
        raise KpnetError("soft_nms", f"expected boxes (N, 4), scores (N,), classes (N,); got "
                         f"{tuple(boxes.shape)}, {tuple(scores.shape)}, {tuple(classes.shape)}")
    if not bool(torch.isfinite(scores).all()):
        raise KpnetError("soft_nms", "scores must be finite")


def _soft_nms_class(
    b: np.ndarray, s: np.ndarray, tl: np.ndarray | None, br: np.ndarray | None,
    method: int, sigma: float, iou_threshold: float, score_threshold: float, plus_one: bool, weight_exp: float,
) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Soft-NMS of one class in float32: (kept positions in selection order, decayed scores, merged boxes)."""
    f = np.float32
    one = f(1.0) if plus_one else f(0.0)
    s = s.copy()
    merged = b.copy()
    active = np.ones(len(s), dtype=bool)
    kept: list[int] = []
    while active.any():
        cand = np.flatnonzero(active)
        i = int(cand[np.argmax(s[cand])])
        kept.append(i)
        active[i] = False
        rest = np.flatnonzero(active)
        bi, bj = b[i], b[rest]
        iw = np.minimum(bi[2], bj[:, 2]) - np.maximum(bi[0], bj[:, 0]) + one
        ih = np.minimum(bi[3], bj[:, 3]) - np.maximum(bi[1], bj[:, 1]) + one
        hit = (iw > 0) & (ih > 0)
        rest, iw, ih, bj = rest[hit], iw[hit], ih[hit], bj[hit]
        area_i = (bi[2] - bi[0] + one) * (bi[3] - bi[1] + one)
        area_j = (bj[:, 2] - bj[:, 0] + one) * (bj[:, 3] - bj[:, 1] + one)
        inter = iw * ih
        iou = inter / (area_i + area_j - inter)
        if method == 2:
            w = kpmath.exp(torch.from_numpy(-(iou * iou) / f(sigma))).numpy()
        elif method == 1:
            w = np.where(iou > f(iou_threshold), f(1.0) - iou, f(1.0)).astype(f)
        else:
            w = np.where(iou > f(iou_threshold), f(0.0), f(1.0)).astype(f)
        if tl is not None:
            mw = kpmath.pow(torch.from_numpy(f(1.0) - w), weight_exp).numpy()
            tw = tl[rest] * mw
            bw = br[rest] * mw
            den_t = np.add.accumulate(np.concatenate([[tl[i]], tw]).astype(f))[-1]
            den_b = np.add.accumulate(np.concatenate([[br[i]], bw]).astype(f))[-1]
            for col, sc, ws, den in ((0, tl, tw, den_t), (1, tl, tw, den_t), (2, br, bw, den_b), (3, br, bw, den_b)):
                num = np.concatenate([[bi[col] * sc[i]], bj[:, col] * sc[rest] * mw]).astype(f)
                merged[i, col] = np.add.accumulate(num)[-1] / den
        s[rest] = w * s[rest]
        active[rest[s[rest] < f(score_threshold)]] = False
    return kept, s, merged


def _run(
    boxes: Tensor, scores: Tensor, classes: Tensor, tl_scores: Tensor | None, br_scores: Tensor | None,
    method: str, sigma: float, iou_threshold: float, score_threshold: float, plus_one: bool, weight_exp: float,
) -> tuple[Tensor, Tensor, Tensor]:
    _check(boxes, scores, classes, method)
    choice = dispatch.choose(scores.device)
    if choice.backend != "torch" and scores.numel() > 0:
        keep, new_scores, new_boxes = launch.soft_nms(boxes, scores, classes, tl_scores, br_scores, METHODS[method],
                                                      sigma, iou_threshold, score_threshold, plus_one, weight_exp,
                                                      choice.backend)
        return _order(keep, new_scores, new_boxes, scores.device)
    b = boxes.detach().to("cpu", torch.float32).numpy()
    s = scores.detach().to("cpu", torch.float32).numpy()
    c = classes.detach().cpu().numpy()
    tl = None if tl_scores is None else tl_scores.detach().to("cpu", torch.float32).numpy()
    br = None if br_scores is None else br_scores.detach().to("cpu", torch.float32).numpy()
    keep_all, score_all, box_all = [], [], []
    for cls in np.unique(c):
        idx = np.flatnonzero(c == cls)
        kept, new_s, merged = _soft_nms_class(
            b[idx], s[idx], None if tl is None else tl[idx], None if br is None else br[idx],
            METHODS[method], sigma, iou_threshold, score_threshold, plus_one, weight_exp)
        keep_all.append(idx[kept])
        score_all.append(new_s[kept])
        box_all.append(merged[kept])
    keep = np.concatenate(keep_all) if keep_all else np.zeros(0, dtype=np.int64)
    new_scores = np.concatenate(score_all) if score_all else np.zeros(0, dtype=np.float32)
    new_boxes = np.concatenate(box_all) if box_all else np.zeros((0, 4), dtype=np.float32)
    return _order(torch.from_numpy(keep).long(), torch.from_numpy(new_scores), torch.from_numpy(new_boxes),
                  scores.device)


def _order(keep: Tensor, new_scores: Tensor, new_boxes: Tensor, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Sort kept boxes by new score descending, ties by input index."""
    by_index = torch.argsort(keep)
    keep, new_scores, new_boxes = keep[by_index], new_scores[by_index], new_boxes[by_index]
    order = torch.sort(new_scores, descending=True, stable=True).indices
    return keep[order].to(device), new_scores[order].to(device), new_boxes[order].to(device)


def soft_nms(
    boxes: Tensor, scores: Tensor, classes: Tensor, *, method: str, sigma: float, iou_threshold: float,
    score_threshold: float = 0.001, plus_one: bool = True,
) -> tuple[Tensor, Tensor]:
    """Per-class soft-NMS (REFERENCE §4.5): (indices of kept boxes, their decayed scores), by score descending.

    boxes (N, 4) as x1, y1, x2, y2; scores (N,); classes (N,). method, sigma and iou_threshold are the
    recipe's (no defaults). Semantics in this module's docstring.
    """
    keep, new_scores, _ = _run(boxes, scores, classes, None, None, method, sigma, iou_threshold, score_threshold,
                               plus_one, 0.0)
    return keep, new_scores.to(scores.dtype)


def soft_nms_merge(
    boxes: Tensor, scores: Tensor, classes: Tensor, tl_scores: Tensor, br_scores: Tensor, *,
    method: str, sigma: float, iou_threshold: float, weight_exp: float, score_threshold: float = 0.001,
    plus_one: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Soft-NMS whose kept boxes are merged with the boxes they suppress (REFERENCE §4.5 `soft_nms_merge`).

    Returns (kept indices, decayed scores, merged boxes (M, 4)); weights (1 - w)^weight_exp × tl/br score
    (kpnet's pow: kpnet/ops/kpmath.py). method, sigma, iou_threshold and weight_exp are the recipe's.
    """
    if tl_scores.shape != scores.shape or br_scores.shape != scores.shape:
        raise KpnetError("soft_nms_merge", "tl_scores and br_scores must have the shape of scores")
    keep, new_scores, merged = _run(boxes, scores, classes, tl_scores, br_scores, method, sigma, iou_threshold,
                                    score_threshold, plus_one, weight_exp)
    return keep, new_scores.to(scores.dtype), merged.to(boxes.dtype)
