"""DLA-34 with the deformable-convolution up path of CenterNet, objects as points (its §5 "DLA": iterative
deep aggregation up to stride 4 with every upsampling-path conv a 3x3 modulated deformable conv and
bilinear-initialised transposed convs), one 64-channel stride-4 feature map. No pretrained weights:
the encoder starts from random init (the paper starts it from ImageNet)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import DeformConv2d

DLA34_LEVELS = (1, 1, 1, 2, 2, 1)
DLA34_CHANNELS = (16, 32, 64, 128, 256, 512)


def conv_bn_relu(in_channels: int, out_channels: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    """Conv (no bias) -> BN -> ReLU, the DLA stem and level-0/1 unit."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a residual supplied by the enclosing tree (DLA's BasicBlock)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        residual = x if residual is None else residual
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return F.relu(self.bn2(self.conv2(y)) + residual, inplace=True)


class Root(nn.Module):
    """Aggregation node of DLA (Yu et al. 2018): 1x1 conv-BN-ReLU over the concatenated children."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, *children: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(torch.cat(children, 1))), inplace=True)


class Tree(nn.Module):
    """Hierarchical deep aggregation tree of `depth` levels (DLA, Yu et al. 2018).

    A depth-1 tree is two blocks whose outputs (with any inherited children) meet at a Root; a deeper
    tree passes its first subtree's output down to the second as a child. `level_root` also hands the
    (max-pool) downsampled input to the root, as DLA-34's stages 3-5 do.
    """

    def __init__(
        self,
        depth: int,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        level_root: bool = False,
        root_dim: int = 0,
    ) -> None:
        super().__init__()
        root_dim = root_dim or 2 * out_channels
        if level_root:
            root_dim += in_channels
        self.depth = depth
        self.level_root = level_root
        self.downsample: nn.Module = nn.MaxPool2d(stride, stride) if stride > 1 else nn.Identity()
        if depth == 1:
            self.tree1: nn.Module = BasicBlock(in_channels, out_channels, stride)
            self.tree2: nn.Module = BasicBlock(out_channels, out_channels)
            self.root = Root(root_dim, out_channels)
            self.project: nn.Module = nn.Identity()
            if in_channels != out_channels:
                self.project = nn.Sequential(
                    nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)
                )
        else:
            self.tree1 = Tree(depth - 1, in_channels, out_channels, stride)
            self.tree2 = Tree(depth - 1, out_channels, out_channels, root_dim=root_dim + out_channels)

    def forward(self, x: Tensor, children: Sequence[Tensor] = ()) -> Tensor:
        children = list(children)
        bottom = self.downsample(x)
        if self.level_root:
            children.append(bottom)
        if self.depth == 1:
            x1 = self.tree1(x, self.project(bottom))
            x2 = self.tree2(x1)
            return self.root(x2, x1, *children)
        x1 = self.tree1(x)
        return self.tree2(x1, [*children, x1])


class DLA34(nn.Module):
    """The DLA-34 encoder: stem, two conv levels, four aggregation trees; returns the six level outputs
    at strides 1, 2, 4, 8, 16, 32."""

    def __init__(self, levels: Sequence[int] = DLA34_LEVELS, channels: Sequence[int] = DLA34_CHANNELS) -> None:
        super().__init__()
        self.channels = tuple(channels)
        self.base_layer = conv_bn_relu(3, channels[0], kernel=7)
        self.level0 = nn.Sequential(*(conv_bn_relu(channels[0], channels[0]) for _ in range(levels[0])))
        self.level1 = nn.Sequential(
            conv_bn_relu(channels[0], channels[1], stride=2),
            *(conv_bn_relu(channels[1], channels[1]) for _ in range(levels[1] - 1)),
        )
        self.level2 = Tree(levels[2], channels[1], channels[2], stride=2)
        self.level3 = Tree(levels[3], channels[2], channels[3], stride=2, level_root=True)
        self.level4 = Tree(levels[4], channels[3], channels[4], stride=2, level_root=True)
        self.level5 = Tree(levels[5], channels[4], channels[5], stride=2, level_root=True)

    def forward(self, x: Tensor) -> list[Tensor]:
        outputs = []
        x = self.base_layer(x)
        for level in (self.level0, self.level1, self.level2, self.level3, self.level4, self.level5):
            x = level(x)
            outputs.append(x)
        return outputs


class DeformConvBlock(nn.Module):
    """3x3 modulated deformable conv (DCNv2) -> BN -> ReLU, the objects-as-points DLA up-path unit.
    Offsets and mask logits come from a zero-initialised 3x3 conv, so training starts on the regular
    grid with mask sigmoid(0) = 0.5, as DCNv2's initialisation does."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.offset_mask = nn.Conv2d(in_channels, 3 * 9, 3, padding=1)
        nn.init.zeros_(self.offset_mask.weight)
        nn.init.zeros_(self.offset_mask.bias)
        self.conv = DeformConv2d(in_channels, out_channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        offset_mask = self.offset_mask(x)
        offset, mask = offset_mask[:, :18], offset_mask[:, 18:].sigmoid()
        return F.relu(self.bn(self.conv(x, offset, mask)), inplace=True)


def bilinear_upsample(channels: int, factor: int) -> nn.ConvTranspose2d:
    """Depthwise transposed conv (kernel 2f, stride f) initialised to bilinear interpolation."""
    kernel = 2 * factor
    up = nn.ConvTranspose2d(
        channels, channels, kernel, stride=factor, padding=factor // 2, groups=channels, bias=False
    )
    taps = 1 - (torch.arange(kernel, dtype=torch.float32) - (kernel - 1) / 2).abs() / factor
    with torch.no_grad():
        up.weight.copy_((taps[:, None] * taps[None, :]).expand_as(up.weight))
    return up


class IDAUp(nn.Module):
    """Iterative deep aggregation (DLA §3.1) with deformable convs: out[0] = x[0] and
    out[i] = node_i(up_i(proj_i(x[i])) + out[i - 1]), every output at `out_channels` and x[0]'s stride.
    `factors[i]` is x[i]'s stride relative to x[0]."""

    def __init__(self, out_channels: int, in_channels: Sequence[int], factors: Sequence[int]) -> None:
        super().__init__()
        self.proj = nn.ModuleList(DeformConvBlock(c, out_channels) for c in in_channels[1:])
        self.up = nn.ModuleList(bilinear_upsample(out_channels, f) for f in factors[1:])
        self.node = nn.ModuleList(DeformConvBlock(out_channels, out_channels) for _ in in_channels[1:])

    def forward(self, layers: Sequence[Tensor]) -> list[Tensor]:
        outputs = [layers[0]]
        for i, (proj, up, node) in enumerate(zip(self.proj, self.up, self.node, strict=True), start=1):
            outputs.append(node(up(proj(layers[i])) + outputs[-1]))
        return outputs


class DLAUp(nn.Module):
    """The DLA up path: from the coarsest pair down to the finest level, each step re-aggregates all
    levels from level j on with an IDAUp at level j's width; returns the last output of every step
    (finest first) plus the untouched coarsest level."""

    def __init__(self, channels: Sequence[int], scales: Sequence[int]) -> None:
        super().__init__()
        in_channels, scales = list(channels), list(scales)
        steps = []
        for j in range(len(channels) - 2, -1, -1):
            steps.append(IDAUp(channels[j], in_channels[j:], [s // scales[j] for s in scales[j:]]))
            scales[j + 1 :] = [scales[j]] * (len(scales) - j - 1)
            in_channels[j + 1 :] = [channels[j]] * (len(channels) - j - 1)
        self.steps = nn.ModuleList(steps)

    def forward(self, layers: Sequence[Tensor]) -> list[Tensor]:
        layers = list(layers)
        outputs = [layers[-1]]
        for step, ida in enumerate(self.steps):
            j = len(layers) - 2 - step
            layers[j:] = ida(layers[j:])
            outputs.insert(0, layers[-1])
        return outputs


class DLA34DCN(nn.Module):
    """DLA-34 + deformable up path (objects-as-points `DLASeg`, down ratio 4): the DLA up path over
    levels 2-5, then an IDAUp of its three finest outputs to one 64-channel stride-4 map."""

    first_level = 2  # log2 of the output stride 4
    last_level = 5

    def __init__(self) -> None:
        super().__init__()
        self.base = DLA34()
        channels = self.base.channels[self.first_level :]
        scales = [2**i for i in range(len(channels))]
        self.dla_up = DLAUp(channels, scales)
        span = self.last_level - self.first_level
        self.ida_up = IDAUp(channels[0], channels[:span], scales[:span])
        self.out_channels = channels[0]
        self.num_stacks = 1

    def forward(self, images: Tensor) -> list[Tensor]:
        levels = self.base(images)[self.first_level :]
        up = self.dla_up(levels)
        return [self.ida_up(up[: self.last_level - self.first_level])[-1]]


def dla34() -> DLA34DCN:
    """DLA-34 with the deformable up path, 64 channels at stride 4 (objects as points §4), random init."""
    return DLA34DCN()


__all__ = [
    "DLA34",
    "DLA34DCN",
    "DLAUp",
    "BasicBlock",
    "DeformConvBlock",
    "IDAUp",
    "Root",
    "Tree",
    "bilinear_upsample",
    "dla34",
]
