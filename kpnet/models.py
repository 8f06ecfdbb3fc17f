"""Building a detector from a recipe: a small dict per choice, no registries or scanning."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

from torch import nn

from kpnet.backbones.dla import dla34
from kpnet.backbones.hourglass import hourglass52, hourglass104, hourglass_small
from kpnet.backbones.resnet import RESNET_LAYERS, ResNetUp
from kpnet.config import ModelConfig, Recipe
from kpnet.detectors import centernet_points, centernet_triplet, cornernet
from kpnet.errors import KpnetError


FAMILIES: dict[str, ModuleType] = {
    "centernet_points": centernet_points,
    "cornernet": cornernet,
    "centernet_triplet": centernet_triplet,
}
NETWORKS: dict[str, Callable[[nn.Module, ModelConfig], nn.Module]] = {
    "centernet_points": lambda backbone, m: centernet_points.CenterNetPoints(backbone, m.num_classes, m.head_conv),
    "cornernet": lambda backbone, m: cornernet.CornerNet(backbone, m.num_classes, m.cascade),
    "centernet_triplet": lambda backbone, m: centernet_triplet.CenterNetTriplet(
        backbone, m.num_classes, m.cascade, m.center_pool
    ),
}
BACKBONES: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "hourglass104": lambda m: hourglass104(),
    "hourglass52": lambda m: hourglass52(),
    "hourglass_small": lambda m: hourglass_small(m.stacks, m.hg_dims, m.hg_modules, m.hg_stem, m.hg_cnv),
    "dla34": lambda m: dla34(),
}


def build_backbone(recipe: Recipe) -> nn.Module:
    """The recipe's backbone; `model.backbone` names it."""
    m = recipe.model
    if m.backbone in RESNET_LAYERS:
        return ResNetUp(m.backbone, m.width, m.up_channels, m.deformable)
    if m.backbone in BACKBONES:
        return BACKBONES[m.backbone](m)
    available = ", ".join(sorted([*RESNET_LAYERS, *BACKBONES]))
    raise KpnetError(recipe.source or None, f"unknown model.backbone {m.backbone!r}; available: {available}")


def family_of(recipe: Recipe) -> ModuleType:
    """The detector family module (network, encode, loss, decode) a recipe names."""
    if recipe.family not in FAMILIES:
        raise KpnetError(recipe.source or None, f"unknown family {recipe.family!r}; available: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[recipe.family]


def build_model(recipe: Recipe) -> nn.Module:
    """Build the network a recipe describes; the recipe rides along as `model.recipe`."""
    family_of(recipe)
    model = NETWORKS[recipe.family](build_backbone(recipe), recipe.model)
    model.recipe = recipe
    return model
