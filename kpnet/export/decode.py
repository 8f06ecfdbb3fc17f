"""Graph forms of kpnet's decode steps (REFERENCE §4.1-4.3) for an exported detector: fixed shapes, one TopK
per selection and no loops over data, so they trace into ONNX. ONNX TopK puts the lower index first among
equal values, which is kpnet's order rule (kpnet.ops.decoding), so onnxruntime selects what kpnet selects.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from kpnet.ops.decoding import peak_scores


def export_peaks(heat: Tensor, k: int, kernel: int = 3) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Top-K positions of the max-pool peak map (REFERENCE §4.1 steps 2-3) as one TopK: (scores, classes, ys, xs),
    each (B, K); `heatmap_peaks` in graph form, for heatmaps of at least K positions."""
    b, _, h, w = heat.shape
    scores, index = peak_scores(heat, kernel).reshape(b, -1).topk(k, dim=1)
    classes = torch.div(index, h * w, rounding_mode="floor")
    in_class = index - classes * (h * w)  # not `%`: the exporter has no remainder by a symbolic size
    ys = torch.div(in_class, w, rounding_mode="floor")
    return scores, classes, ys, in_class - ys * w


class Pairs(NamedTuple):
    """The best `num_dets` corner pairs of each image, each (B, D): boxes (B, D, 4), score (−1 = rejected),
    class, and the indices of their top-left / bottom-right corners."""

    boxes: Tensor
    scores: Tensor
    classes: Tensor
    tl_index: Tensor
    br_index: Tensor


def export_pairs(tl: tuple[Tensor, ...], br: tuple[Tensor, ...], ae_threshold: float, num_dets: int) -> Pairs:
    """`group_corners` mode "ae" in graph form (CornerNet §4.1, REFERENCE §4.1 steps 5-7) on (score, class, x, y,
    embedding) corners of shape (B, K): pairs score (s_tl + s_br)/2, −1 unless the classes agree, br ≥ tl and
    |e_tl − e_br| <= ae_threshold; the best num_dets by score."""
    tl_s, tl_c, tl_x, tl_y, tl_e = (t.unsqueeze(2) for t in tl)
    br_s, br_c, br_x, br_y, br_e = (t.unsqueeze(1) for t in br)
    keep = (br_x >= tl_x) & (br_y >= tl_y) & (tl_c == br_c) & ((tl_e - br_e).abs() <= ae_threshold)
    score = torch.where(keep, (tl_s + br_s) / 2, torch.full_like(tl_s + br_s, -1.0))
    return top_pairs(score, tl[:4], br[:4], num_dets)


def top_pairs(score: Tensor, tl: tuple[Tensor, ...], br: tuple[Tensor, ...], num_dets: int) -> Pairs:
    """The best `num_dets` of a (B, K_tl, K_br) pair-score grid as one TopK, with the boxes and classes of the
    (score, class, x, y) corners of shape (B, K) they pair (REFERENCE §4.1 step 7)."""
    k_br = score.shape[-1]
    scores, order = score.flatten(1).topk(min(num_dets, score.shape[1] * k_br), dim=1)
    tl_index = torch.div(order, k_br, rounding_mode="floor")
    br_index = order % k_br
    boxes = torch.stack([torch.gather(tl[2], 1, tl_index), torch.gather(tl[3], 1, tl_index),
                         torch.gather(br[2], 1, br_index), torch.gather(br[3], 1, br_index)], dim=-1)
    return Pairs(boxes, scores, torch.gather(tl[1], 1, tl_index), tl_index, br_index)


def flip_halves(t: Tensor) -> tuple[Tensor, Tensor]:
    """A (2B, ...) decode of [images, flipped copies] split into its two (B, ...) halves."""
    b = t.shape[0] // 2
    return t[:b], t[b:]


def to_input_pixels(coords: Tensor, down: tuple[Any, Any]) -> Tensor:
    """(..., 2k) output-grid x, y pairs times the (x, y) stride: input pixels (the first step of `grid_to_image`)."""
    return torch.stack([coords[..., 0::2] * down[0], coords[..., 1::2] * down[1]], -1).flatten(-2)
