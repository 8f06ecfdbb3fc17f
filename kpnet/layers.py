"""Layers shared by the backbones and the detector heads (REFERENCE §1.1-1.2)."""

from __future__ import annotations

import math
from collections import OrderedDict

from torch import nn

HEAT_PRIOR = 0.1
HEAT_BIAS = -math.log((1 - HEAT_PRIOR) / HEAT_PRIOR)  # -2.19: a 0.1 prior (CornerNet §3.1, focal-loss init)


def convolution(
    kernel: int, in_channels: int, out_channels: int, stride: int = 1, with_bn: bool = True
) -> nn.Sequential:
    """k x k conv (bias only without BN) -> BN -> ReLU: CornerNet's `convolution` block."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    layers["conv"] = nn.Conv2d(
        in_channels, out_channels, kernel, stride=stride, padding=(kernel - 1) // 2, bias=not with_bn
    )
    if with_bn:
        layers["bn"] = nn.BatchNorm2d(out_channels)
    layers["relu"] = nn.ReLU(inplace=True)
    return nn.Sequential(layers)


def kp_head(in_channels: int, mid_channels: int, out_channels: int, bias: float | None = None) -> nn.Sequential:
    """3x3 conv (bias, no BN) -> ReLU -> 1x1 conv: the `make_kp_layer` head of all four papers' code."""
    head = nn.Sequential(
        nn.Conv2d(in_channels, mid_channels, 3, padding=1, bias=True),
        nn.ReLU(inplace=True),
        nn.Conv2d(mid_channels, out_channels, 1, bias=True),
    )
    if bias is not None:
        nn.init.constant_(head[-1].bias, bias)
    return head
