"""Building a detector from a recipe: a small dict per choice, no registries or scanning."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

from torch import nn

from kpnet.backbones.resnet import RESNET_LAYERS, ResNetUp
from kpnet.config import ModelConfig, Recipe
from kpnet.detectors import centernet_points
from kpnet.errors import KpnetError


FAMILIES: dict[str, ModuleType] = {"centernet_points": centernet_points}
NETWORKS: dict[str, Callable[[nn.Module, ModelConfig], nn.Module]] = {
    "centernet_points": lambda backbone, m: centernet_points.CenterNetPoints(backbone, m.num_classes, m.head_conv),
}


def build_backbone(recipe: Recipe) -> nn.Module:
    """The recipe's backbone; `model.backbone` names it."""
    m = recipe.model
    if m.backbone in RESNET_LAYERS:
        return ResNetUp(m.backbone, m.width, m.up_channels, m.deformable)
    raise KpnetError(recipe.source or None, f"unknown model.backbone {m.backbone!r}; available: {', '.join(sorted(RESNET_LAYERS))}")


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
