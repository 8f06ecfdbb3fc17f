"""The stacked hourglass as modified by CornerNet (CornerNet §3.5, REFERENCE §1.1): stride-2 residual
downsampling instead of max-pooling, nearest upsampling, five reductions, per-stack `cnv` features
merged into the next stack (features only, never predictions)."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from kpnet.errors import KpnetError
from kpnet.layers import convolution

HG_DIMS = (256, 256, 384, 384, 384, 512)  # channels at strides 4, 8, 16, 32, 64, 128
HG_MODULES = (2, 2, 2, 2, 2, 4)  # residuals per level; the last entry is the innermost (4 at 512 ch)


class Residual(nn.Module):
    """CornerNet's `residual`: the ResNet BasicBlock, with a 1x1 conv + BN skip only when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.skip: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.skip = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.skip(x), inplace=True)


def residuals(in_channels: int, out_channels: int, count: int, stride: int = 1) -> nn.Sequential:
    """`count` residuals; the first changes channels/stride (CornerNet `make_layer` / `make_hg_layer`)."""
    blocks = [Residual(in_channels, out_channels, stride)]
    blocks += [Residual(out_channels, out_channels) for _ in range(count - 1)]
    return nn.Sequential(*blocks)


def residuals_reverse(in_channels: int, out_channels: int, count: int) -> nn.Sequential:
    """`count` residuals; the last changes channels (CornerNet `make_layer_revr`)."""
    blocks = [Residual(in_channels, in_channels) for _ in range(count - 1)]
    blocks.append(Residual(in_channels, out_channels))
    return nn.Sequential(*blocks)


class HourglassModule(nn.Module):
    """One recursive hourglass level (CornerNet `kp_module`): up1 + upsample(low3(low2(low1(x)))).

    low1 halves the resolution with a stride-2 residual (no max-pool). The upsample is nearest
    neighbour to up1's exact size: identical to scale_factor=2 whenever the input side is a multiple
    of 2**levels, and still defined (as in mmdetection's HourglassModule) when it is not.
    """

    def __init__(self, dims: Sequence[int], modules: Sequence[int]) -> None:
        super().__init__()
        if len(dims) < 2 or len(dims) != len(modules) or min(modules) < 1:
            raise KpnetError(
                "hourglass", f"dims {list(dims)} and modules {list(modules)} need equal lengths >= 2, modules >= 1"
            )
        curr, nxt = dims[0], dims[1]
        self.up1 = residuals(curr, curr, modules[0])
        self.low1 = residuals(curr, nxt, modules[0], stride=2)
        if len(dims) > 2:
            self.low2: nn.Module = HourglassModule(dims[1:], modules[1:])
        else:
            self.low2 = residuals(nxt, nxt, modules[1])
        self.low3 = residuals_reverse(nxt, curr, modules[0])

    def forward(self, x: Tensor) -> Tensor:
        up1 = self.up1(x)
        low = self.low3(self.low2(self.low1(x)))
        return up1 + F.interpolate(low, size=up1.shape[-2:], mode="nearest")


class Hourglass(nn.Module):
    """Stacked hourglass backbone (CornerNet §3.5): stem to stride 4, then `num_stacks` hourglasses.

    Between stacks, inter = residual(ReLU(BN(conv1x1(inter)) + BN(conv1x1(cnv)))) — the `inters_`,
    `cnvs_`, `inters` merge; predictions are never fed back. Returns every stack's `cnv` features.
    """

    def __init__(
        self,
        num_stacks: int = 2,
        dims: Sequence[int] = HG_DIMS,
        modules: Sequence[int] = HG_MODULES,
        stem_channels: int = 128,
        cnv_channels: int = 256,
    ) -> None:
        super().__init__()
        if num_stacks < 1:
            raise KpnetError("hourglass", f"num_stacks must be >= 1, got {num_stacks}")
        curr = dims[0]
        self.num_stacks = num_stacks
        self.out_channels = cnv_channels
        self.pre = nn.Sequential(convolution(7, 3, stem_channels, stride=2), Residual(stem_channels, curr, stride=2))
        self.kps = nn.ModuleList(HourglassModule(dims, modules) for _ in range(num_stacks))
        self.cnvs = nn.ModuleList(convolution(3, curr, cnv_channels) for _ in range(num_stacks))
        self.inters_ = nn.ModuleList(
            nn.Sequential(nn.Conv2d(curr, curr, 1, bias=False), nn.BatchNorm2d(curr)) for _ in range(num_stacks - 1)
        )
        self.cnvs_ = nn.ModuleList(
            nn.Sequential(nn.Conv2d(cnv_channels, curr, 1, bias=False), nn.BatchNorm2d(curr))
            for _ in range(num_stacks - 1)
        )
        self.inters = nn.ModuleList(Residual(curr, curr) for _ in range(num_stacks - 1))

    def forward(self, images: Tensor) -> list[Tensor]:
        inter = self.pre(images)
        features = []
        for stack in range(self.num_stacks):
            cnv = self.cnvs[stack](self.kps[stack](inter))
            features.append(cnv)
            if stack < self.num_stacks - 1:
                merged = self.inters_[stack](inter) + self.cnvs_[stack](cnv)
                inter = self.inters[stack](F.relu(merged, inplace=True))
        return features


def hourglass104() -> Hourglass:
    """HG-104: two stacks, channels 256/256/384/384/384/512 (CornerNet §3.5)."""
    return Hourglass(num_stacks=2)


def hourglass52() -> Hourglass:
    """HG-52: the same hourglass with one stack (CenterNet-triplets `CenterNet-52`)."""
    return Hourglass(num_stacks=1)


def hourglass_small(
    num_stacks: int = 2,
    dims: Sequence[int] = (32, 32, 48, 48, 64),
    modules: Sequence[int] = (1, 1, 1, 1, 2),
    stem_channels: int = 16,
    cnv_channels: int = 32,
) -> Hourglass:
    """A narrow, shallow hourglass (four reductions by default) with the same structure, for CPU recipes."""
    return Hourglass(num_stacks, dims, modules, stem_channels, cnv_channels)


__all__ = [
    "HG_DIMS",
    "HG_MODULES",
    "Hourglass",
    "HourglassModule",
    "Residual",
    "hourglass52",
    "hourglass104",
    "hourglass_small",
    "residuals",
    "residuals_reverse",
]
