"""Heatmap peak extraction and corner grouping (CornerNet §3.2/§4.1 decode, CentripetalNet §3.3/§4.1
matching; REFERENCE §4.1, §4.4).

Order rule: every top-K here sorts by score descending and breaks ties by the smaller flat index
(peaks: class-major (c, y, x); pairs: tl index * K_br + br index), so all backends select the same
elements. NaN rule: a NaN heat value is never a peak and makes its whole window non-peaks (the
`max_pool2d` equality test); in grouping every test is written as a keep condition, so a NaN
operand rejects the pair (score -1).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from kpnet.cuda import dispatch, launch
from kpnet.errors import KpnetError
from kpnet.ops import kpmath

GROUP_MODES = ("ae", "centripetal")
# What each mode reads besides the corners and num_dets.
_NEEDS = {
    "ae": ("tl_embed", "br_embed", "ae_threshold"),
    "centripetal": ("tl_ct_xs", "tl_ct_ys", "br_ct_xs", "br_ct_ys", "mu_area", "mu_small", "mu_large"),
}


def topk_stable(values: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of each row of a (B, N) tensor, score descending, ties by ascending index (this module's order rule)."""
    k = min(k, values.shape[1])
    if k == 0:
        empty = values.new_zeros((values.shape[0], 0))
        return empty, empty.long()
    kth = values.topk(k, dim=1).values[:, -1:]
    out_v, out_i = [], []
    for row, t in zip(values, kth):
        # Everything above the k-th value, then the lowest-index ties at it: never sorts the whole row.
        above = torch.nonzero(row > t, as_tuple=True)[0]
        ties = torch.nonzero(row == t, as_tuple=True)[0][: k - above.numel()]
        cand = torch.cat([above, ties]).sort().values
        if cand.numel() < k:  # NaN rows: fall back to the full ordering
            cand = torch.arange(row.numel(), device=row.device)
        order = torch.sort(row[cand], descending=True, stable=True).indices[:k]
        out_i.append(cand[order])
        out_v.append(row[out_i[-1]])
    return torch.stack(out_v), torch.stack(out_i)


def peak_scores(heat: Tensor, kernel: int = 3) -> Tensor:
    """Heat where it is the maximum of its kernel×kernel window, else 0 (max-pool NMS, REFERENCE §4.1 step 2)."""
    hmax = F.max_pool2d(heat, kernel, stride=1, padding=kernel // 2)
    return torch.where(hmax == heat, heat, torch.zeros((), dtype=heat.dtype, device=heat.device))


def heatmap_peaks(heat: Tensor, k: int, kernel: int = 3) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Top-K local maxima of an already-sigmoided (B, C, H, W) heatmap: (scores, classes, ys, xs), each (B, K').

    A position is a candidate when it equals the max of its kernel×kernel window; other positions
    score 0 and can still fill the K slots (as in the reference decoders). K' = min(K, C·H·W): asking
    for more candidates than positions returns all positions, never padding. Order rule: module docstring.
    """
    if heat.dim() != 4:
        raise KpnetError("heatmap_peaks", f"expected a (B, C, H, W) heatmap, got shape {tuple(heat.shape)}")
    if kernel < 1 or kernel % 2 == 0:
        raise KpnetError("heatmap_peaks", f"kernel must be a positive odd number, got {kernel}")
    if k < 0:
        raise KpnetError("heatmap_peaks", f"k must be >= 0, got {k}")
    b, c, h, w = heat.shape
    choice = dispatch.choose(heat.device, heat.dtype in launch.PEAK_TYPES)
    if choice.backend == "torch" or heat.numel() == 0 or k == 0:
        scores, index = topk_stable(peak_scores(heat, kernel).reshape(b, c * h * w), k)
    else:  # per-block candidate lists from one pass, then the same stable top-k over them
        cand_scores, cand_index = launch.peak_candidates(heat, k, kernel, choice.backend)
        scores, order = topk_stable(cand_scores, k)
        index = torch.gather(cand_index, 1, order)
    classes = torch.div(index, h * w, rounding_mode="floor")
    ys = torch.div(index % (h * w), w, rounding_mode="floor")
    return scores, classes, ys, index % w


class CornerGroups(NamedTuple):
    """Detections from corner grouping, each (B, D): box corners, score (-1 = rejected), class, and the
    indices of the top-left / bottom-right corners that formed each box (to gather their scores)."""

    boxes: Tensor
    scores: Tensor
    classes: Tensor
    tl_index: Tensor
    br_index: Tensor


def _pair_grid(tl: Tensor, br: Tensor) -> tuple[Tensor, Tensor]:
    return tl.unsqueeze(2), br.unsqueeze(1)


def pair_scores_reference(
    mode: str,
    tl_scores: Tensor, tl_classes: Tensor, tl_xs: Tensor, tl_ys: Tensor,
    br_scores: Tensor, br_classes: Tensor, br_xs: Tensor, br_ys: Tensor,
    tl_embed: Tensor | None, br_embed: Tensor | None, ae_threshold: float | None,
    tl_ct_xs: Tensor | None, tl_ct_ys: Tensor | None, br_ct_xs: Tensor | None, br_ct_ys: Tensor | None,
    mu_area: float | None, mu_small: float | None, mu_large: float | None, centripetal_weighting: bool,
    allow_zero_size: bool,
) -> Tensor:
    """The pair score of all K_tl×K_br pairs, (B, K_tl, K_br); rejected pairs score -1 (see group_corners)."""
    s_tl, s_br = _pair_grid(tl_scores, br_scores)
    x1, x2 = _pair_grid(tl_xs, br_xs)
    y1, y2 = _pair_grid(tl_ys, br_ys)
    c_tl, c_br = _pair_grid(tl_classes, br_classes)
    score = (s_tl + s_br) / 2
    if allow_zero_size:
        keep = (x2 >= x1) & (y2 >= y1)
    else:
        keep = (x2 > x1) & (y2 > y1)
    keep = keep & (c_tl == c_br)
    if mode == "ae":
        e_tl, e_br = _pair_grid(tl_embed, br_embed)
        keep = keep & ((e_tl - e_br).abs() <= ae_threshold)
    else:
        w, h = x2 - x1, y2 - y1
        mu = torch.where((w * h).abs() <= mu_area, mu_small, mu_large).to(score.dtype)
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        rx1, rx2 = cx - mu * w / 2, cx + mu * w / 2
        ry1, ry2 = cy - mu * h / 2, cy + mu * h / 2
        tcx, bcx = _pair_grid(tl_ct_xs, br_ct_xs)
        tcy, bcy = _pair_grid(tl_ct_ys, br_ct_ys)
        keep = keep & (tcx > rx1) & (tcx < rx2) & (bcx > rx1) & (bcx < rx2)
        keep = keep & (tcy > ry1) & (tcy < ry2) & (bcy > ry1) & (bcy < ry2)
        if centripetal_weighting:
            score = score * kpmath.exp(-((tcx - bcx).abs() * (tcy - bcy).abs()) / ((rx2 - rx1) * (ry2 - ry1)))
    return torch.where(keep, score, torch.full_like(score, -1.0))


def group_corners(
    tl_scores: Tensor, tl_classes: Tensor, tl_xs: Tensor, tl_ys: Tensor,
    br_scores: Tensor, br_classes: Tensor, br_xs: Tensor, br_ys: Tensor,
    *,
    mode: str = "ae",
    tl_embed: Tensor | None = None,
    br_embed: Tensor | None = None,
    ae_threshold: float | None = None,
    tl_ct_xs: Tensor | None = None,
    tl_ct_ys: Tensor | None = None,
    br_ct_xs: Tensor | None = None,
    br_ct_ys: Tensor | None = None,
    mu_area: float | None = None,
    mu_small: float | None = None,
    mu_large: float | None = None,
    centripetal_weighting: bool = False,
    allow_zero_size: bool = True,
    num_dets: int | None = None,
) -> CornerGroups:
    """Group every top-left/bottom-right corner pair in one pass and keep the best `num_dets` (REFERENCE §4.1/4.4).

    Corners are (B, K) tensors of score, class, x, y (offsets added, in the frame the caller wants the
    boxes in). A pair scores (s_tl + s_br)/2 and is rejected (score -1) unless the classes agree and
    br ≥ tl on both axes (> with allow_zero_size=False), plus, per mode:
      - "ae" (CornerNet eq. 4-5 grouping): |e_tl - e_br| <= ae_threshold;
      - "centripetal" (CentripetalNet §3.3): all four shifted-centre coordinates (tl_ct_*, br_ct_*)
        strictly inside the central region centre ± μ·size/2, μ = mu_small if |w·h| <= mu_area else
        mu_large; centripetal_weighting multiplies the score by exp(-|dx||dy|/area(R)) (paper eq. 5,
        kpnet's exp: kpnet/ops/kpmath.py).
    The recipe's values have no defaults: ae_threshold (ae), mu_area/mu_small/mu_large (centripetal) and
    num_dets must be given. Selection order: module docstring. D = min(num_dets, K_tl·K_br).
    """
    if mode not in GROUP_MODES:
        raise KpnetError("group_corners", f"unknown mode {mode!r}; expected one of {', '.join(GROUP_MODES)}")
    given = dict(tl_embed=tl_embed, br_embed=br_embed, ae_threshold=ae_threshold, tl_ct_xs=tl_ct_xs,
                 tl_ct_ys=tl_ct_ys, br_ct_xs=br_ct_xs, br_ct_ys=br_ct_ys, mu_area=mu_area, mu_small=mu_small,
                 mu_large=mu_large, num_dets=num_dets)
    missing = [name for name in (*_NEEDS[mode], "num_dets") if given[name] is None]
    if missing:
        raise KpnetError("group_corners", f"mode {mode!r} needs {', '.join(missing)}")
    b, k_tl = tl_scores.shape
    k_br = br_scores.shape[1]
    args = (mode, tl_scores, tl_classes, tl_xs, tl_ys, br_scores, br_classes, br_xs, br_ys, tl_embed, br_embed,
            ae_threshold, tl_ct_xs, tl_ct_ys, br_ct_xs, br_ct_ys, mu_area, mu_small, mu_large, centripetal_weighting,
            allow_zero_size)
    inputs = [t for t in (tl_scores, tl_xs, tl_ys, br_scores, br_xs, br_ys, *given.values()) if isinstance(t, Tensor)]
    kernel_dtypes = (torch.float32, torch.int64, torch.int32)  # the pair kernel computes in float32
    choice = dispatch.choose(tl_scores.device, all(t.dtype in kernel_dtypes for t in inputs))
    if choice.backend == "torch" or k_tl * k_br == 0:
        pair = pair_scores_reference(*args)
    else:
        pair = launch.pair_scores(*args, backend=choice.backend)
    scores, order = topk_stable(pair.reshape(b, k_tl * k_br), num_dets)
    tl_index = torch.div(order, max(k_br, 1), rounding_mode="floor")
    br_index = order % max(k_br, 1)
    boxes = torch.stack([torch.gather(tl_xs, 1, tl_index), torch.gather(tl_ys, 1, tl_index),
                         torch.gather(br_xs, 1, br_index), torch.gather(br_ys, 1, br_index)], dim=-1)
    return CornerGroups(boxes, scores, torch.gather(tl_classes, 1, tl_index), tl_index, br_index)
