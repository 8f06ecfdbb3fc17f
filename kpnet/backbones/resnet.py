"""ResNet with three up-convolution stages: the objects-as-points ResNet backbone (its §4, §5).

Each up stage is a 3x3 (deformable or plain) conv -> BN -> ReLU, then a 4x4 stride-2 transposed
conv initialised as bilinear upsampling -> BN -> ReLU, taking the stride-32 features back to
stride 4. `width` scales the ResNet channels (64 is the paper's), which gives the small CPU models.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import DeformConv2d

RESNET_LAYERS: dict[str, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
}


class ModulatedDeformConv(nn.Module):
    """3x3 modulated deformable conv (DCNv2) whose offsets and mask come from a plain conv, zero-initialised."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.offset_mask = nn.Conv2d(in_channels, 27, 3, padding=1)
        nn.init.zeros_(self.offset_mask.weight)
        nn.init.zeros_(self.offset_mask.bias)
        self.conv = DeformConv2d(in_channels, out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        om = self.offset_mask(x)
        offset, mask = om[:, :18], om[:, 18:].sigmoid()
        return self.conv(x, offset, mask)


def bilinear_init(deconv: nn.ConvTranspose2d) -> None:
    """Initialise a transposed conv as per-channel bilinear upsampling (XZ `fill_up_weights`)."""
    w = deconv.weight.data
    k = w.size(2)
    f = math.ceil(k / 2)
    c = (2 * f - 1 - f % 2) / (2.0 * f)
    grid = torch.arange(k, dtype=torch.float32)
    line = 1 - torch.abs(grid / f - c)
    kernel = line[:, None] * line[None, :]
    w.zero_()
    for ch in range(min(w.size(0), w.size(1))):
        w[ch, ch] = kernel


class ResNetUp(nn.Module):
    """ResNet-{18,34,50,101} trunk + three up-convolution stages; one stride-4 feature map out."""

    num_stacks = 1

    def __init__(
        self,
        depth: str = "resnet18",
        width: int = 64,
        up_channels: tuple[int, ...] = (256, 128, 64),
        deformable: bool = True,
    ) -> None:
        super().__init__()
        if depth not in RESNET_LAYERS:
            raise ValueError(f"unknown ResNet depth {depth!r}; choose from {sorted(RESNET_LAYERS)}")
        block, layers = RESNET_LAYERS[depth]
        self.inplanes = width
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        self.layer1 = self._make_layer(block, width, layers[0], 1)
        self.layer2 = self._make_layer(block, width * 2, layers[1], 2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], 2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], 2)
        stages: list[nn.Module] = []
        in_ch = self.inplanes
        for out_ch in up_channels:
            conv: nn.Module = ModulatedDeformConv(in_ch, out_ch) if deformable else nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)
            deconv = nn.ConvTranspose2d(out_ch, out_ch, 4, stride=2, padding=1, bias=False)
            bilinear_init(deconv)
            stages += [conv, nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True), deconv, nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]
            in_ch = out_ch
        self.up = nn.Sequential(*stages)
        self.out_channels = in_ch
        for trunk in (self.stem, self.layer1, self.layer2, self.layer3, self.layer4):
            for m in trunk.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, block: type[nn.Module], planes: int, blocks: int, stride: int) -> nn.Sequential:
        expansion = block.expansion  # type: ignore[attr-defined]
        downsample = None
        if stride != 1 or self.inplanes != planes * expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, images: Tensor) -> list[Tensor]:
        x = self.stem(images)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return [self.up(x)]
