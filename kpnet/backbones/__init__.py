"""Backbones. Protocol: `forward(images) -> list[Tensor]`, one stride-4 feature map per stack
(the last is used at test time), with attributes `out_channels: int` and `num_stacks: int`."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from kpnet.backbones.dla import dla34
from kpnet.backbones.hourglass import hourglass52, hourglass104, hourglass_small
from kpnet.backbones.resnet import RESNET_LAYERS, ResNetUp
from kpnet.config import ModelConfig

BACKBONES: dict[str, Callable[[ModelConfig], nn.Module]] = {
    **{depth: (lambda m: ResNetUp(m.backbone, m.width, m.up_channels, m.deformable)) for depth in RESNET_LAYERS},
    "hourglass104": lambda m: hourglass104(),
    "hourglass52": lambda m: hourglass52(),
    "hourglass_small": lambda m: hourglass_small(m.stacks, m.hg_dims, m.hg_modules, m.hg_stem, m.hg_cnv),
    "dla34": lambda m: dla34(),
}


def build_backbone(model: ModelConfig) -> nn.Module:
    """The backbone `model.backbone` names (the recipe schema has already checked the name)."""
    return BACKBONES[model.backbone](model)
