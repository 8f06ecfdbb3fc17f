"""The library API the CLI is a thin layer over: recipes, models, checkpoints, detection."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kpnet.config import Recipe, load_recipe
from kpnet.data.dataset import read_image
from kpnet.engine.checkpoint import checkpoint_recipe, load_weights, read_checkpoint
from kpnet.engine.inference import detect_image
from kpnet.models import build_model

__all__ = ["load_recipe", "build_model", "load_checkpoint", "detect"]


def load_checkpoint(path: str | Path, recipe: Recipe | None = None, device: str = "cpu") -> nn.Module:
    """Build the model stored in a checkpoint (or the given recipe's) and load its weights, in eval mode."""
    doc = read_checkpoint(path)
    recipe = recipe or checkpoint_recipe(doc, path)
    model = build_model(recipe)
    load_weights(model, doc, path)
    model.class_names = doc.get("class_names")  # the training set's category names, when it recorded them
    return model.to(device).eval()


def detect(model: nn.Module, images: Sequence[np.ndarray | str | Path]) -> list[torch.Tensor]:
    """Detect objects: per image an (N, 6) tensor of x1, y1, x2, y2, score, class in image pixels.

    Images are BGR uint8 arrays (as OpenCV reads them) or paths; classes are contiguous indices
    into the training set's sorted category ids. Test settings come from `model.recipe.test`.
    """
    model.eval()
    out = []
    for image in images:
        array = read_image(Path(image)) if isinstance(image, (str, Path)) else image
        out.append(detect_image(model, array, model.recipe.test))
    return out
