"""Pooling prediction modules: CornerNet's corner pooling module, the triplet paper's cascade corner
pooling and center pooling (REFERENCE §1.3-1.5). The pooling maths lives in `kpnet.ops`."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kpnet.layers import convolution
from kpnet.ops import corner_pool, line_max

TOP_LEFT = ("top", "left")
BOTTOM_RIGHT = ("bottom", "right")


class PoolModule(nn.Module):
    """The layers every pooling module shares (CornerNet Fig. 7): two conv-BN-ReLU branches
    `p1_conv1`/`p2_conv1` (dim -> mid) whose pooled sum goes through 3x3 conv + BN (`p_conv1`,
    `p_bn1`), added to a 1x1 conv + BN skip (`conv1`, `bn1`), then ReLU and a 3x3 conv-BN-ReLU
    (`conv2`). Subclasses compute the sum of the two pooled branches and call `merge`."""

    def __init__(self, dim: int = 256, mid: int = 128) -> None:
        super().__init__()
        self.p1_conv1 = convolution(3, dim, mid)
        self.p2_conv1 = convolution(3, dim, mid)
        self.p_conv1 = nn.Conv2d(mid, dim, 3, padding=1, bias=False)
        self.p_bn1 = nn.BatchNorm2d(dim)
        self.conv1 = nn.Conv2d(dim, dim, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(dim)
        self.conv2 = convolution(3, dim, dim)

    def merge(self, x: Tensor, pooled: Tensor) -> Tensor:
        """conv2(ReLU(BN(conv3x3(P1 + P2)) + BN(conv1x1(x))))."""
        y = self.p_bn1(self.p_conv1(pooled))
        return self.conv2(F.relu(y + self.bn1(self.conv1(x)), inplace=True))


class CornerPool(PoolModule):
    """Corner pooling module (CornerNet §3.4, Fig. 7; REFERENCE §1.3): P1 = pool1(p1), P2 = pool2(p2).

    `directions` = ("top", "left") for the top-left module, ("bottom", "right") for bottom-right.
    """

    def __init__(self, directions: tuple[str, str], dim: int = 256, mid: int = 128) -> None:
        super().__init__(dim, mid)
        self.directions = directions

    def forward(self, x: Tensor) -> Tensor:
        pool1, pool2 = self.directions
        return self.merge(x, corner_pool(self.p1_conv1(x), pool1) + corner_pool(self.p2_conv1(x), pool2))


class CascadeCornerPool(PoolModule):
    """Cascade corner pooling (CenterNet-triplets §3.3, Fig. 5b; REFERENCE §1.4).

    Each branch first looks along the other axis from a separate `look_conv`, adds that to its own
    branch, passes a plain 3x3 conv (`P1_look_conv` / `P2_look_conv`), then pools along its own axis:
    P1 = pool1(P1_look_conv(p1_conv1(x) + pool2(look_conv1(x)))),
    P2 = pool2(P2_look_conv(p2_conv1(x) + pool1(look_conv2(x)))).
    """

    def __init__(self, directions: tuple[str, str], dim: int = 256, mid: int = 128) -> None:
        super().__init__(dim, mid)
        self.directions = directions
        self.look_conv1 = convolution(3, dim, mid)
        self.look_conv2 = convolution(3, dim, mid)
        self.P1_look_conv = nn.Conv2d(mid, mid, 3, padding=1, bias=False)
        self.P2_look_conv = nn.Conv2d(mid, mid, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pool1, pool2 = self.directions
        look1 = corner_pool(self.look_conv1(x), pool2)
        p1 = corner_pool(self.P1_look_conv(self.p1_conv1(x) + look1), pool1)
        look2 = corner_pool(self.look_conv2(x), pool1)
        p2 = corner_pool(self.P2_look_conv(self.p2_conv1(x) + look2), pool2)
        return self.merge(x, p1 + p2)


class CenterPool(PoolModule):
    """Center pooling (CenterNet-triplets §3.3, Fig. 5a; REFERENCE §1.5): P1 = max over the whole
    column (Top then Bottom pooling), P2 = max over the whole row (Left then Right pooling).

    `pooling=False` keeps every layer but skips the two line maxima: the "conventional convolutions"
    centre branch of the triplet paper's Table 4 ablation (rows without CTP), with equal parameters.
    """

    def __init__(self, dim: int = 256, mid: int = 128, pooling: bool = True) -> None:
        super().__init__(dim, mid)
        self.pooling = pooling

    def forward(self, x: Tensor) -> Tensor:
        p1, p2 = self.p1_conv1(x), self.p2_conv1(x)
        if not self.pooling:
            return self.merge(x, p1 + p2)
        return self.merge(x, line_max(p1, 2) + line_max(p2, 3))


__all__ = ["BOTTOM_RIGHT", "TOP_LEFT", "CascadeCornerPool", "CenterPool", "CornerPool", "PoolModule"]
