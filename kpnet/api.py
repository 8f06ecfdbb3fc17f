"""The library API the CLI is a thin layer over: recipes, detectors, checkpoints, detection."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kpnet.config import Recipe, load_recipe
from kpnet.data.images import read_image
from kpnet.detectors.base import Detections, Detector
from kpnet.engine.checkpoint import checkpoint_classes, checkpoint_recipe, load_weights, read_checkpoint, recipe_for_weights
from kpnet.engine.inference import detect_image
from kpnet.models import build_detector, build_model

__all__ = ["Detections", "Detector", "build_detector", "build_model", "detect", "load_checkpoint", "load_recipe"]


def load_checkpoint(path: str | Path, recipe: Recipe | None = None, device: str = "cpu") -> Detector:
    """The detector stored in a checkpoint (built from its own recipe, or the given one with the checkpoint's training
    and its `auto` values resolved: `engine.checkpoint.recipe_for_weights`), weights loaded, in eval mode."""
    doc = read_checkpoint(path)
    stored = checkpoint_recipe(doc, path)
    detector = build_detector(recipe_for_weights(recipe or stored, stored))
    load_weights(detector.network, doc, path)
    detector.class_names, detector.cat_ids = checkpoint_classes(doc)
    return detector.to(device).eval()


def detect(detector: Detector, images: Sequence[np.ndarray | str | Path]) -> list[Detections]:
    """Detect objects in each image: `Detections` with boxes (x1, y1, x2, y2 in image pixels), scores and classes.

    Images are BGR uint8 arrays (as OpenCV reads them) or paths; classes are contiguous indices into the
    training set's sorted category ids (`detector.class_names` names them). Test settings are the recipe's.
    """
    detector.eval()
    return [
        detect_image(detector, read_image(Path(image)) if isinstance(image, (str, Path)) else image)
        for image in images
    ]
