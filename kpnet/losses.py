"""Loss terms shared by the families (REFERENCE §3), with the reference normalisations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

PROB_CLAMP = 1e-4


def heat_sigmoid(logits: Tensor) -> Tensor:
    """Sigmoid clamped to [1e-4, 1 - 1e-4] as the reference's `_sigmoid` (REFERENCE §3.1); not in place.

    Computed in float32: under bfloat16 autocast 1 - 1e-4 would round to 1 and log(1 - p) to -inf.
    """
    return logits.float().sigmoid().clamp(PROB_CLAMP, 1 - PROB_CLAMP)


def focal_loss(pred: Tensor, gt: Tensor, alpha: float = 2.0, beta: float = 4.0) -> Tensor:
    """Penalty-reduced pixel-wise focal loss (CornerNet eq. 1; objects as points eq. 1).

    `pred` holds probabilities, `gt` the gaussian heatmap. Positives are cells with gt == 1 exactly;
    the sum is divided by the number of positives in the whole tensor, or not at all when there
    are none (REFERENCE §3.1).
    """
    pred = pred.float()
    pos = gt.eq(1).float()
    neg = 1.0 - pos
    pos_loss = torch.log(pred) * (1 - pred).pow(alpha) * pos
    neg_loss = torch.log(1 - pred) * pred.pow(alpha) * (1 - gt).pow(beta) * neg
    num_pos = pos.sum()
    total = pos_loss.sum() + neg_loss.sum()
    return -total / num_pos if num_pos > 0 else -neg_loss.sum()


def gather_feat(feat: Tensor, ind: Tensor) -> Tensor:
    """Gather a (B, D, H, W) map at flat indices (B, M) -> (B, M, D)."""
    b, d = feat.shape[:2]
    flat = feat.reshape(b, d, -1).permute(0, 2, 1)
    return flat.gather(1, ind.unsqueeze(-1).expand(-1, -1, d))


def reg_l1_loss(pred: Tensor, ind: Tensor, mask: Tensor, target: Tensor) -> Tensor:
    """L1 on gathered regressions, divided by 2N (the per-coordinate mean of XZ's RegL1Loss; eq. 2-3)."""
    gathered = gather_feat(pred, ind).float()
    m = mask.unsqueeze(-1).expand_as(gathered).float()
    loss = F.l1_loss(gathered * m, target.float() * m, reduction="sum")
    return loss / (m.sum() + 1e-4)


def reg_weighted_l1_loss(pred: Tensor, ind: Tensor, mask: Tensor, target: Tensor) -> Tensor:
    """L1 on gathered regressions with a per-coordinate mask (B, M, D), divided by the mask's sum (XZ's
    RegWeightedL1Loss: the joint offsets of objects as points §4.2, invisible joints masked)."""
    gathered = gather_feat(pred, ind).float()
    m = mask.float()
    loss = F.l1_loss(gathered * m, target.float() * m, reduction="sum")
    return loss / (m.sum() + 1e-4)


def reg_smooth_l1_loss(pred: Tensor, ind: Tensor, mask: Tensor, target: Tensor) -> Tensor:
    """SmoothL1 (β = 1) on gathered offsets summed over x, y, divided by N (CornerNet eq. 6, REFERENCE §3.3)."""
    gathered = gather_feat(pred, ind).float()
    m = mask.unsqueeze(-1).expand_as(gathered).float()
    loss = F.smooth_l1_loss(gathered * m, target.float() * m, reduction="sum", beta=1.0)
    return loss / (mask.float().sum() + 1e-4)


def ae_loss(tl_tag: Tensor, br_tag: Tensor, tl_ind: Tensor, br_ind: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Associative-embedding pull and push (CornerNet eq. 4-5; REFERENCE §3.2) -> (pull, push).

    Per image with N objects, e_k = (e_tl,k + e_br,k)/2; pull = Σ_k [(e_tl,k − e_k)² + (e_br,k − e_k)²] / N
    and push = Σ over ordered pairs j ≠ k of max(0, 1 − |e_k − e_j|) / (N(N−1)). Both are summed (not
    averaged) over the images of the batch; an image contributes 0 when it has no objects (pull) or
    fewer than two (push). Nothing is squeezed, so a batch of one works.
    """
    tl = gather_feat(tl_tag, tl_ind)[..., 0].float()
    br = gather_feat(br_tag, br_ind)[..., 0].float()
    m = mask.float()
    n = m.sum(1)
    mean = (tl + br) / 2
    pull = (((tl - mean) ** 2 + (br - mean) ** 2) * m).sum(1) / n.clamp(min=1)
    pairs = m.unsqueeze(2) * m.unsqueeze(1) * (1 - torch.eye(m.shape[1], device=m.device))
    gap = F.relu(1 - (mean.unsqueeze(2) - mean.unsqueeze(1)).abs())
    push = (gap * pairs).sum((1, 2)) / (n * (n - 1)).clamp(min=1)
    return pull.sum(), push.sum()
