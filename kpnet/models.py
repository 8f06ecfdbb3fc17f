"""Building a detector from a recipe: a small dict maps each family name to its Detector class."""

from __future__ import annotations

from torch import nn

from kpnet.config import Recipe
from kpnet.detectors.base import Detector
from kpnet.detectors.centernet_points import CenterNetPointsDetector
from kpnet.detectors.centernet_pose import CenterNetPoseDetector
from kpnet.detectors.centernet_triplet import CenterNetTripletDetector
from kpnet.detectors.centripetalnet import CentripetalNetDetector
from kpnet.detectors.cornernet import CornerNetDetector
from kpnet.errors import KpnetError

FAMILIES: dict[str, type[Detector]] = {
    "centernet_points": CenterNetPointsDetector,
    "cornernet": CornerNetDetector,
    "centernet_triplet": CenterNetTripletDetector,
    "centripetalnet": CentripetalNetDetector,
    "centernet_pose": CenterNetPoseDetector,
}


def build_detector(recipe: Recipe) -> Detector:
    """The detector a recipe describes (an untrained network, its settings and decode)."""
    if recipe.model.num_classes == "auto":
        raise KpnetError(recipe.source or "model.num_classes", "model.num_classes is auto: the count comes from the "
                         "training annotations (kpnet train) or a checkpoint; set a number to build a model without them")
    return FAMILIES[recipe.family](recipe)


def build_model(recipe: Recipe) -> nn.Module:
    """The network a recipe describes (what training optimises and checkpoints store)."""
    return build_detector(recipe).network
